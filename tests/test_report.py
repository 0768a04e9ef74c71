"""report.html in a real headless Chromium, escaping of generated text, summary.md, compare, the CI gate."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import open_report
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.report.content import COMPILED_GRAPHS, header_facts
from mismatch.report.diagnosis import render_diagnosis_markdown
from mismatch.report.html import render_report
from mismatch.report.markdown import LIMIT, escape, render_markdown
from mismatch.runs import DiagnoseRun, ScanRun, load_scan

runner = CliRunner()
PAYLOAD = '<script>alert("x")</script><img src=x onerror="alert(1)"> & "quotes"'


def scan(*args):
    return runner.invoke(app, ["scan", *map(str, args)])


@pytest.fixture(scope="module")
def hostile_run(tiny_model, tmp_path_factory):
    """A scan whose prompts carry markup and script."""
    folder = tmp_path_factory.mktemp("hostile")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"{PAYLOAD} question {i}"}) for i in range(3)) + "\n")
    out = folder / "run"
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16,fp16",
        "--prompts",
        prompts,
        "--samples",
        2,
        "--max-tokens",
        16,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    return out


def test_scan_writes_report_and_summary_md(hostile_run):
    assert (hostile_run / "report.html").stat().st_size > 10_000
    text = (hostile_run / "summary.md").read_text()
    assert "**Verdict:**" in text and "| bf16 → bf16 |" in text
    machine = json.loads((hostile_run / "summary.json").read_text())["machine"]
    kernels = machine["trainer_kernels"]["bf16"]  # the BF16 numbers depend on how the trainer multiplied
    native = machine["cpu_flags"]["avx512_bf16"] or machine["cpu_flags"]["amx_bf16"]
    assert machine["cpu_class"] in ("AMX", "AVX512-BF16", "AVX512", "AVX2") and ("native bf16" in kernels) is native
    assert f"{machine['cpu_class']} CPU · trainer bf16: {kernels}" in (hostile_run / "report.html").read_text()


def test_generated_text_is_escaped(hostile_run):
    html = (hostile_run / "report.html").read_text()
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    markdown = (hostile_run / "summary.md").read_text()
    assert "<script>" not in markdown and "<img" not in markdown


@pytest.mark.browser
def test_report_renders_in_headless_chromium(hostile_run, tmp_path):
    seen = open_report(
        hostile_run / "report.html",
        tmp_path / "report.png",
        ("#worst", "#verdict", "#corrections", "#health", "#audit", "#buckets"),
    )
    assert seen["problems"] == [] and seen["dialogs"] == []
    assert len(seen["images"]) == 5 and all(  # the scatter, Σℓ, histogram, along the response, the buckets
        done and width > 300 and height > 100 for done, width, height in seen["images"]
    )
    assert PAYLOAD in seen["texts"]["#worst"]  # shown as text
    assert "k3" in seen["texts"]["#verdict"]
    assert "entropy" in seen["texts"]["#buckets"]
    assert (
        "trl_sequence_mask" in seen["texts"]["#corrections"]
        and "token_mult_prob_error" in seen["texts"]["#health"]
        and "truncation" in seen["texts"]["#audit"]
    )
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


def test_report_command_rebuilds_identical_numbers(hostile_run):
    before = (hostile_run / "summary.md").read_text()
    (hostile_run / "summary.md").unlink()
    result = runner.invoke(app, ["report", str(hostile_run)])
    assert result.exit_code == 0, result.output
    assert (hostile_run / "summary.md").read_text() == before


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a mismatch run folder" in result.output


def test_summary_md_stays_under_the_comment_limit_on_a_large_run(hostile_run):
    run = load_scan(hostile_run)
    rng = np.random.default_rng(0)
    n = 200_000
    huge = pd.DataFrame(
        {
            "seq_id": np.repeat(np.arange(n // 100), 100),
            "position": np.tile(np.arange(100), n // 100),
            "token": ["|<b>" + "x" * 400] * n,
            "engine_dtype": "bf16",
            "trainer_dtype": "bf16",
            "logp_engine": -rng.random(n),
            "logp_trainer": -rng.random(n),
        }
    )
    prompts = pd.DataFrame({"engine_dtype": "bf16", "seq_id": np.arange(n // 100), "prompt": "p" * 5000})
    text = render_markdown(ScanRun(run.path, run.summary, huge, prompts), worst=500)
    assert len(text) <= LIMIT
    assert "Worst tokens" in text and "<b>" not in text


@pytest.mark.parametrize("execution", ["compiled", "eager", None])
def test_the_header_notes_compiled_graphs_only(hostile_run, execution):
    """summary.json `engine_execution` (what the engine ran): report.html and summary.md note compiled graphs."""
    run = load_scan(hostile_run)
    summary = {k: v for k, v in run.summary.items() if k != "engine_execution"}
    if execution:
        summary["engine_execution"] = execution
    ran = ScanRun(run.path, summary, run.tokens, run.rollouts)
    noted = ("engine graphs", COMPILED_GRAPHS) in header_facts(ran)
    assert noted == (execution == "compiled")
    assert ("engine graphs: compiled (torch.compile" in render_markdown(ran)) == noted
    assert ("<dt>engine graphs</dt>" in render_report(ran)) == noted


@pytest.mark.parametrize("execution", ["compiled", "eager"])
def test_the_diagnose_summary_notes_compiled_graphs_only(execution):
    summary = {
        "config": {"model": "m"},
        "recommendation": {"summary": "verdict", "actions": []},
        "diagnosis": {"components": [], "topk": []},
        "engine_execution": execution,
    }
    text = render_diagnosis_markdown(DiagnoseRun(Path("run"), summary, pd.DataFrame(), pd.DataFrame()))
    assert (f"engine graphs: {escape(COMPILED_GRAPHS)}" in text) == (execution == "compiled")


@pytest.mark.slow  # three more scans (~1 min here)
def test_compare_side_by_side_and_refusals(hostile_run, tiny_model, tmp_path):
    other = tmp_path / "other"
    # no semantic probe: its FP32/FP32 pair would be shared with the fp32-only run below
    assert (
        scan(
            "--model",
            tiny_model,
            "--engine",
            "hf",
            "--dtypes",
            "fp16",
            "--num-prompts",
            3,
            "--max-tokens",
            8,
            "--semantic-probe",
            0,
            "--out",
            other,
        ).exit_code
        == 0
    )
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(hostile_run), str(other), "--out", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "compare.md").read_text()
    a = json.loads((hostile_run / "summary.json").read_text())["pairs"]
    b = json.loads((other / "summary.json").read_text())["pairs"]
    k3 = lambda pairs: next(p["k3"] for p in pairs if p["engine_dtype"] == p["trainer_dtype"] == "fp16")  # noqa: E731
    assert f"| fp16 → fp16 | k3 | {k3(a):.2e} | {k3(b):.2e} | {k3(b) / k3(a):.3g}× |" in markdown
    assert "bf16 → bf16" not in markdown  # not measured by the second run
    assert (out / "compare.html").read_text().count("data:image/png;base64,") == 2

    hot = tmp_path / "hot"
    assert (
        scan(
            "--model",
            tiny_model,
            "--engine",
            "hf",
            "--dtypes",
            "fp16",
            "--num-prompts",
            2,
            "--max-tokens",
            4,
            "--temperature",
            0.5,
            "--out",
            hot,
        ).exit_code
        == 0
    )
    refused = runner.invoke(app, ["compare", str(other), str(hot), "--out", str(tmp_path / "cmp2")])
    assert refused.exit_code == 2 and "temperature differs (1.0 vs 0.5)" in refused.output
    assert not (tmp_path / "cmp2").exists()
    fp32_only = tmp_path / "fp32"
    assert (
        scan(
            "--model",
            tiny_model,
            "--engine",
            "hf",
            "--dtypes",
            "fp32",
            "--num-prompts",
            2,
            "--max-tokens",
            4,
            "--out",
            fp32_only,
        ).exit_code
        == 0
    )
    refused = runner.invoke(app, ["compare", str(other), str(fp32_only), "--out", str(tmp_path / "cmp3")])
    assert refused.exit_code == 2 and "share no (engine dtype, trainer dtype) pair" in refused.output


def test_fail_on_gate_exits_1_after_writing_everything(tiny_model, tmp_path):
    # without the semantic probe: its fp32/fp32 pair is a pair of equal dtypes too, and would fail "k3>0" as well
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16",
        "--num-prompts",
        2,
        "--max-tokens",
        8,
        "--out",
        tmp_path,
        "--semantic-probe",
        0,
        "--fail-on",
        "k3>0",
        "--fail-on",
        "bf16/fp32:max_abs_dp>10",
    )
    assert result.exit_code == 1, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and (tmp_path / "report.html").is_file()
    assert summary["gate"]["conditions"] == ["k3>0", "bf16/fp32:max_abs_dp>10"]
    assert len(summary["gate"]["failed"]) == 1 and summary["gate"]["failed"][0].startswith("bf16/bf16:k3 = ")
    assert "gate failed: bf16/bf16:k3" in result.output


def test_fail_on_passing_gate_exits_0(tiny_model, tmp_path):
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16",
        "--num-prompts",
        2,
        "--max-tokens",
        8,
        "--out",
        tmp_path,
        "--fail-on",
        "k3>1e9",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "condition, message",
    [
        ("k3=>1", "expected [ENGINE/TRAINER:]METRIC"),
        ("kl>1", "unknown metric 'kl'"),
        ("k3>big", "'big' is not a number"),
        ("fp8/fp8:k3>1", "pair dtypes must be among"),
        ("fp32/fp32:k3>1", "does not measure fp32/fp32"),
    ],
)
def test_malformed_fail_on_is_a_usage_error(condition, message, tmp_path):
    result = scan("--engine", "hf", "--dtypes", "bf16", "--out", tmp_path / "never", "--fail-on", condition)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "never").exists()


def test_markdown_cells_show_control_characters_as_pictures():
    """A sampled byte token can be NUL or ESC: summary.md stays plain text (no control bytes)."""
    assert escape("a\x00b\x1bc\x7f\td\n|") == "a␀b␛c␡␉d⏎\\|"
