"""The tiny random Qwen2 of `mismatch.model.tiny` (its own BPE tokenizer and chat template, no
network), built once per session; and the guard of the test tiers (`engine`, `browser`, `slow`:
markers in pyproject.toml)."""

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from mismatch.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-qwen2"))


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
