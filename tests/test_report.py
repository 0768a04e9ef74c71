"""report.html in a real headless Chromium, escaping of generated text, summary.md, compare, the CI gate."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import open_report
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.report.content import COMPILED_GRAPHS, binding_corrections, checks_line, header_facts, health_matrix
from mismatch.report.diagnosis import render_diagnosis_markdown
from mismatch.report.frameworks import settings_for
from mismatch.report.html import render_compare, render_report
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
    shown, held = seen["texts"], seen["all_texts"]
    summary = json.loads((hostile_run / "summary.json").read_text())
    # health: the matrix's marks shown, each check's name, value and source on expand
    assert all(h["framework"] in shown["#health"] for h in summary["health"])
    assert "token_mult_prob_error" in held["#health"] and "token_mult_prob_error" not in shown["#health"]
    printed = seen["printed"]  # on paper, every collapsed part is shown
    assert all("".join(held[s].split()) == "".join(printed[s].split()) for s in ("#health", "#corrections", "#audit"))
    # corrections: those that change a token or a sequence shown, the others collapsed
    idle = [c for c in summary["corrections"] if c["share_tokens_changed"] == 0 and c["share_seqs_changed"] == 0]
    binding = [c for c in summary["corrections"] if c not in idle]
    assert all(c["correction"] in shown["#corrections"] for c in binding)
    assert "trl_sequence_mask" in held["#corrections"]
    if idle:
        assert (
            f"{len(idle)} {'more ' if binding else ''}(pair, correction) rows that change nothing"
            in shown["#corrections"]
        )
    # audit: shown where it flags, else one line
    audit = [a for rows in summary["audit_by_pair"].values() for a in rows]
    flagged = [a for a in audit if a["status"] in ("warn", "fail")]
    assert "truncation" in held["#audit"]
    if flagged:
        assert all(a["detail"] in shown["#audit"] for a in flagged)
    else:  # one line: how the checks came out
        assert shown["#audit"].strip() == f"Setup audit: {audit_line(audit)}" and "truncation" not in shown["#audit"]
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


def audit_line(audit: list[dict]) -> str:
    """What the report says of an audit that flags nothing."""
    ok = sum(a["status"] == "ok" for a in audit)
    return (
        f"all {ok} checks pass"
        if ok == len(audit)
        else f"{len(audit)} checks: {ok} pass, {len(audit) - ok} not measured"
    )


def six_pairs(run: ScanRun) -> ScanRun:
    """The run with a sixth pair, bf16 → fp16 (bf16 → bf16's tokens and row again), its row as wide as a pair row
    gets (non-finite and outside-nucleus counts, a large ratio), and a failed CI gate under the verdict: the most
    pairs the first screen must hold (all the pairs of --dtypes bf16,fp16,fp32 but the FP32 engine's)."""
    same = (run.tokens["engine_dtype"] == "bf16") & (run.tokens["trainer_dtype"] == "bf16")
    tokens = pd.concat([run.tokens, run.tokens[same].assign(trainer_dtype="fp16")], ignore_index=True)
    first = next(p for p in run.pairs if p["engine_dtype"] == p["trainer_dtype"] == "bf16")
    wide = {**first, "trainer_dtype": "fp16", "n_nonfinite": 12, "n_outside_nucleus": 345, "max_ratio": 1234.5678}
    gate = {"conditions": ["k3>1e-9"], "failed": [f"bf16/bf16:k3 = {first['k3']:.3g} > 1e-09"], "not_measured": []}
    summary = {**run.summary, "pairs": [*run.pairs, wide], "gate": gate}
    return ScanRun(run.path, summary, tokens, run.rollouts)


@pytest.mark.browser
@pytest.mark.parametrize("widen", [False, True], ids=["as-scanned", "six-pairs"])
def test_the_verdict_scatter_and_pair_table_come_first_and_fit_1280_px(hostile_run, tmp_path, widen):
    """At 1,280 px the verdict and the whole scatter lie within the first 1,400 px, the pair table right under
    them, and nothing from the title to the pair table scrolls sideways (nor does the page)."""
    run = six_pairs(load_scan(hostile_run)) if widen else load_scan(hostile_run)
    page = tmp_path / "report.html"
    page.write_text(render_report(run))
    seen = open_report(page, tmp_path / "report.png", ("#verdict", "#scatter", "#pairs", "#health"), within="#overview")
    assert seen["problems"] == [] and seen["images"][0][0]
    boxes = seen["boxes"]
    assert boxes["#verdict"][0] < boxes["#verdict"][1] < boxes["#scatter"][0] < boxes["#scatter"][1] <= 1400
    assert boxes["#scatter"][1] < boxes["#pairs"][0] < boxes["#pairs"][1] < boxes["#health"][0]
    assert seen["overflowing"] == []
    assert seen["page"][0] <= seen["page"][1]
    assert all(f"{p['engine_dtype']} → {p['trainer_dtype']}" in seen["texts"]["#pairs"] for p in run.pairs)
    if widen:
        assert "1234.5678" in seen["texts"]["#pairs"] and "(+345 outside nucleus)" in seen["texts"]["#pairs"]


@pytest.mark.browser
def test_the_compare_page_fits_1280_px(hostile_run, tmp_path):
    run = load_scan(hostile_run)
    page = tmp_path / "compare.html"
    page.write_text(render_compare(run, run))
    seen = open_report(page, tmp_path / "compare.png", ("#compare",), within="main")
    assert seen["problems"] == [] and len(seen["images"]) == 2 and all(done for done, _, _ in seen["images"])
    assert seen["overflowing"] == [] and seen["page"][0] <= seen["page"][1]
    assert all(f"{p['engine_dtype']} → {p['trainer_dtype']}" in seen["texts"]["#compare"] for p in run.pairs)


def test_report_and_summary_read_top_down(hostile_run):
    """report.html: the verdict, the scatter, the pair table, then health, corrections, audit, the settings to
    paste, the other figures; summary.md the same order."""
    run = load_scan(hostile_run)
    html = (hostile_run / "report.html").read_text()
    settings = bool(settings_for(run.summary["recommendation"]["verdict"]))
    marks = ['id="verdict"', 'id="scatter"', 'id="pairs"', 'id="all-metrics"', 'id="health"', 'id="corrections"']
    marks += ['id="audit"', *(['id="settings"'] if settings else []), 'alt="Sum of log ratio', 'id="worst"']
    assert [html.index(m) for m in marks] == sorted(html.index(m) for m in marks)
    assert html.count("<details open>") == int(settings)  # the first framework's snippet only
    markdown = (hostile_run / "summary.md").read_text()
    marks = ["**Verdict:**", "| bf16 → bf16 |", "**Health:**", "**Corrections", "**Setup audit:**"]
    marks += [*(["**What to change, ready to paste:**"] if settings else []), "<summary>Worst tokens"]
    assert [markdown.index(m) for m in marks] == sorted(markdown.index(m) for m in marks)
    audit = [a for rows in run.summary["audit_by_pair"].values() for a in rows]
    if not any(a["status"] in ("warn", "fail") for a in audit):
        assert f"**Setup audit:** {audit_line(audit)}\n\n" in markdown


def health_row(pair, framework, metric, status, steps_flagged=0):
    return {
        "pair": pair,
        "framework": framework,
        "metric": metric,
        "definition": "d",
        "value": 1.0,
        "threshold": "t",
        "status": status,
        "source": "s",
        "steps": 4,
        "steps_flagged": steps_flagged,
    }


HEALTH = [
    health_row("bf16→bf16", "verl", "a", "ok"),
    health_row("bf16→bf16", "verl", "b", "warn", 1),
    health_row("bf16→bf16", "slime", "c", "not_measured"),
    health_row("fp16→fp16", "verl", "a", "ok"),
    health_row("fp16→fp16", "verl", "b", "fail", 3),
    health_row("fp16→fp16", "slime", "c", "ok"),
    health_row("fp16→fp16", "TRL", "d", "ok"),
]


def test_the_health_matrix_holds_the_worst_check_per_pair_and_framework():
    frameworks, rows = health_matrix(HEALTH)
    assert frameworks == ["verl", "slime", "TRL"]
    marks = [(pair, [c and (c["status"], c["steps_flagged"], len(c["checks"])) for c in cells]) for pair, cells in rows]
    assert marks == [
        ("bf16→bf16", [("warn", 1, 2), ("not_measured", 0, 1), None]),
        ("fp16→fp16", [("fail", 3, 2), ("ok", 0, 1), ("ok", 0, 1)]),
    ]
    assert checks_line([h["status"] for h in HEALTH]) == "2 of 7 checks flagged (1 fail, 1 warn)"
    assert checks_line(["ok", "ok", "not_measured"]) == "3 checks: 2 pass, 1 not measured"
    assert checks_line(["ok"] * 15) == "all 15 checks pass"


def test_summary_md_shows_the_health_matrix_when_a_check_flags(hostile_run):
    run = load_scan(hostile_run)
    text = render_markdown(ScanRun(run.path, {**run.summary, "health": HEALTH}, run.tokens, run.rollouts))
    assert "**Health:** 2 of 7 framework checks flagged\n\n| engine → trainer | verl | slime | TRL |\n" in text
    assert "| bf16→bf16 | ⚠ warn | – not measured | – |\n| fp16→fp16 | ✗ fail | ✓ pass | ✓ pass |\n" in text
    assert "<details><summary>The checks flagged</summary>" in text and "| fp16→fp16 | verl | b | 1 | t | fail" in text
    html = render_report(ScanRun(run.path, {**run.summary, "health": HEALTH}, run.tokens, run.rollouts))
    assert '<th class="left">slime</th><th class="left">TRL</th></tr>' in html
    assert 'class="mark-fail">✗ fail</summary>' in html and '<td class="left">–</td>' in html


def test_corrections_that_change_nothing_come_after_those_that_bind():
    rows = [
        {"correction": "a", "share_tokens_changed": 0.0, "share_seqs_changed": 0.0},
        {"correction": "b", "share_tokens_changed": 0.25, "share_seqs_changed": 0.5},
        {"correction": "c", "share_tokens_changed": 0.0, "share_seqs_changed": 0.125},
    ]
    binding, idle = binding_corrections(rows)
    assert [c["correction"] for c in binding] == ["b", "c"] and [c["correction"] for c in idle] == ["a"]


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
        ("fp8/fp8:k3>1", "a pair's sides must be among"),
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
