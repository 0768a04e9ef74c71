"""A tiny random Qwen2 with its own BPE tokenizer and chat template, built once per session (no
network); and the guard of the test tiers (`engine`, `browser`, `slow`: markers in pyproject.toml)."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TIERS = ("engine", "browser", "slow")  # the markers (pyproject.toml); `make test-fast` deselects all three
VLLM = pytest.param("vllm", marks=pytest.mark.engine)  # the vLLM case of a test parametrized by engine
SLOW_S = 20.0  # an unmarked test over this is named at the end of the run, as one to mark `slow`


_VLLM_BEFORE = pytest.StashKey[bool]()  # whether vLLM was imported in this process before the test


def _refuse(what: str, marker: str):
    def refuse(*args, **kwargs):
        pytest.fail(f"{what} in a test not marked `{marker}`: add @pytest.mark.{marker}", pytrace=False)

    return refuse


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test that starts vLLM or Chromium without its tier marker fails, so `make test-fast` stays
    fast and `make test` keeps the markers right. The guard covers the test's fixtures too: a
    session fixture such as `shared_scan` runs inside the first test that asks for it."""
    with pytest.MonkeyPatch.context() as patch:
        if not item.get_closest_marker("engine"):
            from mismatch.engines import isolated, vllm_engine

            refuse = _refuse("a vLLM engine started", "engine")
            patch.setattr(isolated._Child, "__init__", refuse)  # a new engine process
            patch.setattr(isolated.IsolatedEngine, "__init__", refuse)  # an engine in the spare process
            patch.setattr(isolated, "refused_dtypes", refuse)  # vLLM's dtype check, in an engine process
            patch.setattr(vllm_engine.VLLMEngine, "__init__", refuse)  # an engine in this process
            item.stash[_VLLM_BEFORE] = "vllm" in sys.modules
        if not item.get_closest_marker("browser"):
            try:
                from playwright import sync_api
            except ImportError:  # no test extras: the browser tests cannot run anyway
                pass
            else:
                patch.setattr(sync_api, "sync_playwright", _refuse("Chromium launched", "browser"))
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """vLLM imported into this process by an unmarked test (its own code, not an engine start)."""
    result = yield
    if _VLLM_BEFORE in item.stash and not item.stash[_VLLM_BEFORE] and "vllm" in sys.modules:
        pytest.fail("vLLM was imported in a test not marked `engine`: add @pytest.mark.engine", pytrace=False)
    return result


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if not any(tier in report.keywords for tier in TIERS):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    slow = {nodeid: s for nodeid, s in _durations.items() if s > SLOW_S}
    if slow:
        terminalreporter.section(f"unmarked tests over {SLOW_S:g} s: mark them `slow` (pyproject.toml, tiers)")
        for nodeid, seconds in sorted(slow.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


AVX2_ONLY = {
    "avx2": True,
    "avx512_f": False,
    "avx512_bf16": False,
    "avx512_fp16": False,
    "amx_bf16": False,
    "amx_fp16": False,
}


@pytest.fixture(params=["this cpu", "avx2 only"])
def cpu_class(request, monkeypatch):
    """Run a test on this CPU's kernel choice, then as a CPU without native 16-bit arithmetic would
    choose (`precision.cpu_flags` answered as on an AVX2-only machine): both paths are tested anywhere."""
    if request.param == "avx2 only":
        from mismatch.model import precision

        monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_ONLY)
    return request.param


def _corpus() -> list[str]:
    words = "the model answers what is plus minus times step think final number equals sum of".split()
    lines = [f"What is {a} + {b}? {a + b}" for a in range(0, 100, 7) for b in range(0, 100, 11)]
    return (
        lines + [" ".join(words[i:] + words[:i]) for i in range(len(words))] + ['<script>alert(1)</script> & "quoted"']
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-qwen2")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        initializer_range=0.1,  # peakier than the default: sampled tokens are not all near-uniform
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    return folder


SHARED_SCAN = ("--dtypes", "bf16,fp16", "--num-prompts", "8", "--max-tokens", "32")


@pytest.fixture(scope="session")
def shared_scan(tiny_model, tmp_path_factory):
    """`shared_scan(engine)`: (run folder, terminal output, vLLM engine processes used) of the tiny
    model's bf16,fp16 scan (SHARED_SCAN), run once a session per engine for every test that reads it.
    A test that asks for the "vllm" scan starts vLLM (the first one does): mark it `engine`."""
    from typer.testing import CliRunner

    from mismatch.cli import app
    from mismatch.engines import isolated

    done = {}

    def scan(engine: str):
        if engine not in done:
            out = tmp_path_factory.mktemp(f"run-{engine}")
            used = set()  # the engine processes the scan called (a spare left by an earlier test counts once)
            call = isolated._Child.call
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(
                    isolated._Child,
                    "call",
                    lambda self, *args, **kwargs: used.add(id(self)) or call(self, *args, **kwargs),
                )
                result = CliRunner().invoke(
                    app,
                    [
                        "scan",
                        "--model",
                        str(tiny_model),
                        "--engine",
                        engine,
                        *SHARED_SCAN,
                        "--out",
                        str(out),
                        "--force",
                    ],
                )
            assert result.exit_code == 0, result.output
            done[engine] = (out, result.output, len(used))
        return done[engine]

    return scan
