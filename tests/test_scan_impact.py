"""scan's gradient impact: when it runs, what summary.json, the verdict and the reports carry."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.stats.impact import ImpactResult
from mismatch.verdict.impact import impact_sentence

runner = CliRunner()


def scan(*args):
    return runner.invoke(app, ["scan", *map(str, args)])


def prompt_file(folder, answers: bool = True):
    path = folder / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?"} | ({"answer": "987654321"} if answers else {}) for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scan_with_answers_and_samples_measures_impact_per_engine_dtype(tiny_model, tmp_path):
    out = tmp_path / "run"
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16,fp16",
        "--prompts",
        prompt_file(tmp_path),
        "--samples",
        2,
        "--max-tokens",
        8,
        "--train-batch",
        512,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    impact = summary["impact"]
    assert set(impact) == {"bf16", "fp16"}  # per engine dtype, not for the FP32 semantic probe
    for dtype, measured in impact.items():
        assert measured["sequences"] == 8 and measured["groups"] == 4 and measured["group_size"] == 2
        assert measured["user_batch"] == 512
        # a random model never writes 987654321: every group's rewards are equal, no gradient signal
        assert measured["share_groups_with_signal"] == 0.0
        assert not measured["measurable"]
        assert "non-zero advantage" in measured["reason"]
        assert "not measurable" in summary["recommendation"]["summary"]
        assert dtype.upper() + ": the gradient impact is not measurable" in summary["recommendation"]["summary"]
    html = (out / "report.html").read_text()
    assert 'id="impact"' in html and "Does the gap matter for training?" in html
    assert "Does the gap matter for training?" in (out / "summary.md").read_text()


def test_no_impact_without_answers_or_with_one_sample(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = ("--model", tiny_model, "--engine", "hf", "--dtypes", "bf16", "--max-tokens", 4, "--semantic-probe", 0)
    result = scan(*args, "--prompts", prompt_file(tmp_path, answers=False), "--samples", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert "impact" not in json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--impact", "--samples", "1"], "--impact needs --samples 2 or more"),
        (["--impact", "--samples", "2", "--no-answers"], "--impact needs an 'answer' on every prompt"),
        (["--train-batch", "0"], "--train-batch must be at least 1"),
    ],
)
def test_impact_options_refuse_in_one_line(args, message, tiny_model, tmp_path):
    answers = "--no-answers" not in args
    args = [a for a in args if a != "--no-answers"]
    prompts = prompt_file(tmp_path, answers=answers)
    result = scan("--model", tiny_model, "--engine", "hf", "--prompts", prompts, *args, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def result(**changes) -> ImpactResult:
    base: ImpactResult = {
        "measurable": True,
        "reason": None,
        "sequences": 64,
        "groups": 8,
        "group_size": 8,
        "folds": 8,
        "store": "exact",
        "store_reason": "",
        "share_groups_with_signal": 0.75,
        "rho_ess": 0.99,
        "rho_mean": {"value": 1.0, "low": 0.99, "high": 1.01},
        "bias_sq": {"value": 1e-4, "low": 5e-5, "high": 2e-4},
        "noise": {"value": 4e-3, "low": 2e-3, "high": 8e-3},
        "batch_star": {"value": 2560.0, "low": 1200.0, "high": 5100.0},
        "batch_star_at_least": None,
        "bias_to_noise": {"value": 0.158, "low": 0.112, "high": 0.231},
        "user_batch": None,
        "bias_to_noise_at_user_batch": None,
        "bias_to_signal": 0.05,
        "angle_degrees": 3.0,
        "noise_ratio_v": 1.01,
        "corrections": [],
        "rounding": None,
    }
    return {**base, **changes}  # type: ignore[typeddict-item]


def test_sentence_with_an_interval_names_the_batch_the_share_and_b_star():
    text = impact_sentence("bf16", result())
    assert text.startswith("At a batch of 64 sequences the BF16 gradient's bias from the mismatch is 16% of one")
    assert "(95% interval 11%–23%)" in text
    assert "B* ≈ 2,560 sequences (95% interval 1,200–5,100)" in text
    assert "a persistent bias does not" in text and "harmless" not in text


def test_sentence_speaks_of_the_users_batch_when_given():
    user = {"value": 1.0, "low": 0.7, "high": 1.4}
    text = impact_sentence("bf16", result(user_batch=4096, bias_to_noise_at_user_batch=user))
    assert text.startswith("At a batch of 4,096 sequences the BF16 gradient's bias from the mismatch is 100% of")


def test_sentence_without_an_interval_gives_the_bound():
    bounded = result(
        bias_sq={"value": -1e-5, "low": -4e-5, "high": 2e-5},
        batch_star={"value": None, "low": None, "high": None},
        batch_star_at_least=12800.0,
        bias_to_noise={"value": 0.0, "low": 0.0, "high": 0.0707},
    )
    text = impact_sentence("fp16", bounded)
    assert "FP16 gradient's bias from the mismatch is not distinguishable from 0 (at most 7.1% of" in text
    assert "B* > 12,800 sequences" in text


def test_sentence_of_a_batch_that_is_not_measurable_gives_the_reason():
    text = impact_sentence("bf16", result(measurable=False, reason="not measurable at this length: ESS 3%"))
    assert text == "BF16: the gradient impact is not measurable on this batch (not measurable at this length: ESS 3%)."
