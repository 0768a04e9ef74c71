"""`mismatch analyze` end to end: a scan's own tokens, μ-only dumps rescored with --model,
multi-step dumps (drift), planted setup bugs (audit), the frameworks' dumps and hooks, bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from browser import open_report
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.dumps.writer import StepWriter
from mismatch.errors import ConfigError
from mismatch.stats import health
from mismatch.stats.audit import Audit
from mismatch.stats.corrections import CORRECTIONS, Replay, with_thresholds

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def scan_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    result = cli(
        "scan",
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16,fp16",
        "--num-prompts",
        6,
        "--samples",
        2,
        "--max-tokens",
        16,
        "--temperature",
        0.8,
        "--seed",
        3,
        "--out",
        out,
        "--force",
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("given", ["tokens.parquet", "the run folder"])
def test_analyze_of_a_scan_reproduces_its_metrics_exactly(scan_run, given, tmp_path):
    result = cli(
        "analyze", scan_run / "tokens.parquet" if given == "tokens.parquet" else scan_run, "--out", tmp_path / "a"
    )
    assert result.exit_code == 0, result.output
    scanned, analyzed = summary_of(scan_run), summary_of(tmp_path / "a")
    assert analyzed["seed"] == 3  # the scan's own: its bootstrap intervals come out the same
    assert analyzed["kind"] == "analyze" and analyzed["complete"] and analyzed["format"] == "open"
    assert analyzed["pairs"] == scanned["pairs"]  # every metric, interval and count, bit for bit
    assert analyzed["corrections"] == scanned["corrections"]
    assert [h["value"] for h in analyzed["health"]] == [h["value"] for h in scanned["health"]]
    assert {a["check"]: a["status"] for a in scanned["audit"]} == {
        "truncation": "ok",
        "temperature": "ok",
        "raw_logprobs": "ok",
    }
    assert {a["check"] for a in analyzed["audit"]} >= {"temperature", "truncation"}
    assert {"report.html", "summary.md", "tokens.parquet", "metrics.csv", "summary.json"} <= {
        p.name for p in (tmp_path / "a").iterdir()
    }


def _mu_only_dump(scan_run, path, engine_dtype="bf16"):
    rollouts = pd.read_parquet(scan_run / "rollouts.parquet").query("engine_dtype == @engine_dtype")
    with path.open("w") as handle:
        for r in rollouts.itertuples():
            record = {
                "seq_id": int(r.seq_id),
                "prompt_index": int(r.prompt_index),
                "prompt_ids": [int(i) for i in r.prompt_ids],
                "token_id": [int(i) for i in r.response_ids],
                "logp_engine": [float(x) for x in r.logp_engine],
                "temperature": 0.8,
            }
            handle.write(json.dumps(record) + "\n")
    return path


def test_mu_only_dump_is_rescored_by_model_as_the_scan_rescored_it(scan_run, tiny_model, tmp_path):
    dump = _mu_only_dump(scan_run, tmp_path / "rollouts.jsonl")
    result = cli("analyze", dump)
    assert result.exit_code == 2 and "carries only μ" in result.output and "--model" in result.output

    result = cli("analyze", dump, "--model", tiny_model, "--dtypes", "bf16,fp32", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "a")
    assert (
        summary["temperature"] == 0.8
        and summary["temperature_source"] == "the dump"
        and summary["dump_has_trainer"] is False
    )
    ours = pd.read_parquet(tmp_path / "a" / "tokens.parquet")
    scanned = pd.read_parquet(scan_run / "tokens.parquet").query("engine_dtype == 'bf16'")
    for trainer in ("bf16", "fp32"):
        a = ours[ours["trainer_dtype"] == trainer].sort_values(["seq_id", "position"])
        b = scanned[scanned["trainer_dtype"] == trainer].sort_values(["seq_id", "position"])
        assert a["token_id"].tolist() == b["token_id"].tolist()
        np.testing.assert_array_equal(a["logp_trainer"].to_numpy(), b["logp_trainer"].to_numpy())
    assert [p["trainer_dtype"] for p in summary["pairs"]] == ["bf16", "fp32"]


def _steps_dump(folder, steps=12, grow_from=7, seed=0):
    """Sequences of random μ with π = μ + noise whose scale grows ×4 from `grow_from` on."""
    rng = np.random.default_rng(seed)
    writer = StepWriter(folder)
    for step in range(1, steps + 1):
        lengths = rng.integers(5, 20, size=16)
        mu = [np.log(rng.uniform(0.05, 1, n)) for n in lengths]
        scale = 0.02 if step < grow_from else 0.08
        pi = [np.minimum(m + rng.normal(0, scale, len(m)), 0) for m in mu]
        writer.add(
            step,
            [[1, 2]] * 16,
            [list(rng.integers(3, 50, n)) for n in lengths],
            mu,
            logp_trainer=pi,
            prompt_index=np.arange(16) // 4,
        )
    writer.flush()
    return folder


@pytest.mark.browser
def test_steps_are_measured_one_by_one_and_the_drift_is_found(tmp_path):
    dump = _steps_dump(tmp_path / "dump")
    result = cli("analyze", dump, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "a")
    steps = pd.read_parquet(tmp_path / "a" / "steps.parquet")
    assert summary["n_steps"] == 12 and steps["step"].tolist() == list(range(1, 13))
    tokens = pd.read_parquet(tmp_path / "a" / "tokens.parquet")
    step5 = tokens.query("step == 5")
    assert steps.set_index("step").loc[5, "k3"] == pytest.approx(
        float(np.mean(np.expm1(step5.logp_trainer - step5.logp_engine) - (step5.logp_trainer - step5.logp_engine))),
        rel=1e-12,
    )
    k3 = next(d for d in summary["drift"] if d["metric"] == "k3")
    assert k3["departs_at"] == 7 and k3["trend"] > 2  # the noise quadruples: k3 ×16 from the 7th of 12 steps
    assert any("departs from its start at step 7" in a for a in summary["recommendation"]["actions"])
    seen = open_report(
        tmp_path / "a" / "report.html", tmp_path / "report.png", ("#drift", "#health", "#corrections", "#worst")
    )
    assert seen["problems"] == [] and seen["dialogs"] == []
    assert len(seen["images"]) == 5 and all(
        done and width > 300 for done, width, _ in seen["images"]
    )  # over training + the scan's four
    assert "k3" in seen["texts"]["#drift"] and "0 / 12" in seen["texts"]["#health"]  # steps flagged per check
    assert (tmp_path / "a" / "summary.md").read_text().count("departs from its start at step 7") >= 1


def test_the_gate_fails_an_analysed_dump_after_writing_it_all(tmp_path):
    """`analyze --fail-on`: every pair by default; the run folder is complete, then exit 1 naming the value."""
    dump = _steps_dump(tmp_path / "dump", steps=2)
    result = cli("analyze", dump, "--out", tmp_path / "a", "--fail-on", "k3>1e-6", "--fail-on", "k3>1")
    assert result.exit_code == 1, result.output
    summary = summary_of(tmp_path / "a")
    assert summary["complete"] and summary["gate"]["conditions"] == ["k3>1e-6", "k3>1"]
    (failed,) = summary["gate"]["failed"]
    assert failed.startswith("engine/trainer:k3 = ") and failed in result.output
    assert cli("analyze", dump, "--out", tmp_path / "b", "--fail-on", "k3>1").exit_code == 0
    refused = cli("analyze", dump, "--out", tmp_path / "c", "--fail-on", "k3=>1")
    assert refused.exit_code == 2 and "expected [ENGINE/TRAINER:]METRIC" in refused.output
    assert not (tmp_path / "c").exists()


def _logits_dump(
    path, temperature_mu=1.0, temperature_pi=1.0, top_p_mu=None, noise=0.0, recorded_temperature=None, seed=0
):
    """Tokens sampled from μ = softmax(z / T_μ) (renormalised to a top-p nucleus if asked), scored
    by π = softmax(z / T_π) with optional precision-like noise: planted setup bugs."""
    rng = np.random.default_rng(seed)
    n_seqs, length, vocab = 150, 40, 64
    z = rng.normal(0, 3, (n_seqs * length, vocab))

    def log_softmax(a):
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    log_mu, log_pi = log_softmax(z / temperature_mu), log_softmax(z / temperature_pi)
    if top_p_mu:
        order = np.argsort(-log_mu, axis=1)
        sorted_p = np.take_along_axis(np.exp(log_mu), order, 1)
        keep = np.zeros_like(log_mu, dtype=bool)
        np.put_along_axis(keep, order, np.cumsum(sorted_p, 1) - sorted_p < top_p_mu, 1)
        log_mu = log_softmax(np.where(keep, log_mu, -np.inf))
    cumulative = np.cumsum(np.exp(log_mu), 1)
    tokens = (cumulative < rng.random((len(z), 1)) * cumulative[:, -1:]).sum(1)
    rows = np.arange(len(z))
    frame = pd.DataFrame(
        {
            "seq_id": np.repeat(np.arange(n_seqs), length),
            "position": np.tile(np.arange(length), n_seqs),
            "token_id": tokens,
            "logp_engine": log_mu[rows, tokens],
            "logp_trainer": log_pi[rows, tokens] + rng.normal(0, noise, len(z)),
        }
    )
    if recorded_temperature is not None:
        frame["temperature"] = recorded_temperature
    frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize(
    "planted, expected",
    [
        (dict(noise=0.03), {"truncation": "ok", "temperature": "ok"}),
        (dict(temperature_mu=1.0, temperature_pi=0.9, noise=0.03), {"truncation": "ok", "temperature": "fail"}),
        (dict(top_p_mu=0.9, noise=0.03), {"truncation": "fail"}),
        (
            dict(temperature_mu=1.0, temperature_pi=0.7, recorded_temperature=0.7),
            {"temperature": "fail", "raw_logprobs": "fail"},
        ),
        (
            dict(temperature_mu=0.7, temperature_pi=0.7, recorded_temperature=0.7, noise=0.03),
            {"truncation": "ok", "temperature": "ok", "raw_logprobs": "ok"},
        ),
    ],
    ids=["clean", "temperature", "truncation", "raw-mu", "clean-at-0.7"],
)
def test_audit_flags_planted_setup_bugs_and_stays_quiet_on_clean_data(planted, expected, tmp_path):
    dump = _logits_dump(tmp_path / "dump.parquet", **planted)
    result = cli("analyze", dump, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "a")
    audit = {a["check"]: a["status"] for a in summary["audit"]}
    assert {check: audit[check] for check in expected} == expected
    if "fail" in expected.values():
        assert summary["recommendation"]["verdict"] == "setup_bug"
    assert all(set(a) >= {"check", "status", "detail"} for a in summary["audit"])


def test_audit_measures_the_offset_and_slope_it_reports():
    audit = Audit()
    pi, mu = np.log([0.5, 0.25, 0.2, 0.9]), np.log([0.4, 0.25, 0.25, 0.9])
    audit.add(pi, mu, [0, 0, 1, 1])
    m, se = audit.offset()
    assert m == pytest.approx(np.mean([0.5 / 0.4, 1, 0.2 / 0.25, 1]) - 1)
    # per sequence Σ(w − m): seq 0: (0.25 − m) + (0 − m), seq 1: (−0.2 − m) + (0 − m)
    assert se == pytest.approx(np.sqrt((0.25 - 2 * m) ** 2 + (-0.2 - 2 * m) ** 2) / 4)
    b, _ = audit.slope()
    assert b == pytest.approx(np.polyfit(mu, pi - mu, 1)[0])


def test_correction_replay_by_hand():
    # two sequences: ℓ = [ln 2.9, 0, 0] and [−ln 4, ln 1.5]
    ell = np.log([2.9, 1, 1, 0.25, 1.5])
    replay = Replay(CORRECTIONS)
    replay.add(ell[:3], [0, 0, 0])
    replay.add(ell[3:], [7, 7])  # a second chunk
    rows = {r["correction"]: r for r in replay.result()}
    tis = rows["token_tis"]  # min(ρ, 2)
    assert tis["share_tokens_changed"] == pytest.approx(1 / 5) and tis["share_seqs_changed"] == pytest.approx(1 / 2)
    after = np.array([2, 1, 1, 0.25, 1.5])
    assert tis["ess_after"] == pytest.approx(after.sum() ** 2 / (5 * (after**2).sum()))
    before = np.array([2.9, 1, 1, 0.25, 1.5])
    assert tis["ess_before"] == pytest.approx(before.sum() ** 2 / (5 * (before**2).sum()))
    assert tis["max_weight_before"] == pytest.approx(2.9) and tis["max_weight_after"] == pytest.approx(2)
    icepop = rows["icepop"]  # ρ outside [0.5, 5] → 0: only the 0.25
    assert icepop["share_tokens_changed"] == pytest.approx(1 / 5) and icepop["share_units_zeroed"] == pytest.approx(
        1 / 5
    )
    mis = rows["seq_mis"]  # sequence ratios 2.9 and 0.375: both outside [0.5, 2] → masked
    assert (
        mis["units"] == 2
        and mis["share_seqs_changed"] == 1
        and mis["share_tokens_changed"] == 1
        and mis["ess_after"] == 0
    )
    geometric = rows["geometric"]  # geometric means 2.9^(1/3), 0.375^(1/2): both outside [0.999, 1.001]
    assert geometric["share_units_zeroed"] == 1
    trl = rows["trl_sequence_mask"]  # ρ_seq ≤ 3 kept: 2.9 and 0.375
    assert trl["share_seqs_changed"] == 0 and trl["mean_weight_after"] == pytest.approx((2.9 + 0.375) / 2)
    assert tis["quantiles_before"]["p50"] == pytest.approx(1, rel=1e-3)
    assert rows["trl_token_truncate"]["quantiles_after"]["p99"] == pytest.approx(
        2.9, rel=1e-3
    )  # the largest of 5: the 99% point

    custom = {c.name: c for c in with_thresholds(["token_tis=1.2", "icepop=0.2,4", "trl=2.5"])}
    assert custom["token_tis"].high == 1.2 and (custom["icepop"].low, custom["icepop"].high) == (0.2, 4)
    assert custom["trl_sequence_mask"].high == 2.5 and custom["trl_token_truncate"].high == 2.5
    for bad in (
        "nope=2",
        "token_tis",
        "icepop=5,1",
        "token_tis=x",
        "icepop=0.4",
    ):  # the last: HIGH under icepop's LOW 0.5
        with pytest.raises(ConfigError, match="--correction"):
            with_thresholds([bad])


def test_health_checks_by_hand():
    pi, mu = np.log([0.5, 0.9]), np.log([0.4, 0.9])
    rows = {r["metric"]: r for r in health.evaluate(pi, mu, [0, 1])}  # one token per sequence
    assert (
        rows["training/rollout_probs_diff_mean"]["value"] == pytest.approx(0.05)
        and rows["training/rollout_probs_diff_mean"]["status"] == "fail"
    )
    assert (
        rows["train/token_mult_prob_error"]["value"] == pytest.approx((1.25 + 1) / 2)
        and rows["train/token_mult_prob_error"]["status"] == "fail"
    )
    assert (
        rows["train/train_rollout_logprob_abs_diff"]["value"] == pytest.approx(np.log(1.25) / 2)
        and rows["train/train_rollout_logprob_abs_diff"]["status"] == "fail"
    )
    assert (
        rows["mismatch_kl/all/mean"]["value"] == pytest.approx((0.25 - np.log(1.25)) / 2)
        and rows["mismatch_kl/all/mean"]["status"] == "fail"
    )  # 0.0134 ≥ 0.01
    assert (
        rows["rollout_corr/kl"]["value"] == pytest.approx(-np.log(1.25) / 2)
        and rows["rollout_corr/kl"]["status"] == "fail"
    )  # |−0.112| > 0.1
    assert (
        rows["rollout_corr/chi2_token"]["value"] == pytest.approx((1.25**2 + 1) / 2 - 1)
        and rows["rollout_corr/chi2_token"]["status"] == "ok"
    )
    w = np.array([1.25, 1.0]) / np.mean([1.25, 1.0])
    assert rows["rollout_corr/rollout_is_eff_sample_size"]["value"] == pytest.approx(1 / np.mean(w**2), rel=1e-6)
    assert all(r["source"] for r in rows.values())


def test_prime_rl_and_slime_dumps_analyze_end_to_end(tiny_model, tmp_path):
    import torch

    export = tmp_path / "run" / "token_exports"
    rng = np.random.default_rng(0)
    for step in (1, 2):
        (export / f"step_{step}").mkdir(parents=True)
        records = []
        for i in range(6):
            ids = [int(t) for t in rng.integers(3, 300, 20)]
            mask = [False] * 8 + [True] * 12
            mu = [0.0] * 8 + [float(x) for x in np.log(rng.uniform(0.1, 1, 12))]
            pi = [-5.0] * 8 + [m + float(rng.normal(0, 0.01)) for m in mu[8:]]
            records.append(
                {
                    "schema_version": 1,
                    "step": step,
                    "rank": 0,
                    "micro_step": 0,
                    "micro_sequence_idx": i,
                    "export_sequence_idx": i,
                    "env_name": "x",
                    "token_ids": ids,
                    "position_ids": list(range(20)),
                    "loss_mask": mask,
                    "inference_logprobs": mu,
                    "trainer_logprobs": pi,
                }
            )
        (export / f"step_{step}" / "rank_0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = cli("analyze", tmp_path / "run", "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "p")
    assert summary["format"] == "prime-rl" and summary["n_steps"] == 2 and summary["pairs"][0]["n_tokens"] == 2 * 6 * 12
    mismatch_kl = next(h for h in summary["health"] if h["metric"] == "mismatch_kl/all/mean")
    assert mismatch_kl["steps"] == 2

    samples = [
        {
            "tokens": [5, 6, 7, 10 + i, 11 + i, 12 + i],
            "response_length": 3,
            "rollout_log_probs": [-0.5, -1.0, -0.2],
            "loss_mask": [1, 1, 1],
            "group_index": i // 2,
            "index": i,
        }
        for i in range(4)
    ]
    (tmp_path / "slime").mkdir()
    torch.save({"rollout_id": 0, "samples": samples}, tmp_path / "slime" / "0.pt")
    result = cli("analyze", tmp_path / "slime", "--model", tiny_model, "--dtypes", "fp32", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "s")
    assert (
        summary["format"] == "slime"
        and summary["pairs"][0]["trainer_dtype"] == "fp32"
        and summary["pairs"][0]["n_tokens"] == 12
    )


def test_hostile_token_text_from_a_dump_is_escaped(tmp_path):
    frame = pd.DataFrame(
        {
            "seq_id": [0, 0, 1],
            "position": [0, 1, 0],
            "token_id": [1, 2, 3],
            "token": ["<script>alert(1)</script>", "|*_", "ok"],
            "logp_engine": [-1.0, -0.5, -0.2],
            "logp_trainer": [-3.0, -0.5, -0.2],
        }
    )
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    assert cli("analyze", tmp_path / "d.parquet", "--out", tmp_path / "a").exit_code == 0
    html = (tmp_path / "a" / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>" not in (tmp_path / "a" / "summary.md").read_text()


@pytest.mark.parametrize(
    "content, message",
    [
        ("a,b\n1,2\n", "in no format analyze reads"),
        ('{"foo": 1}\n', "in no format analyze reads"),
    ],
)
def test_unknown_input_is_one_line_naming_the_expected_fields(content, message, tmp_path):
    path = tmp_path / ("x.csv" if "," in content else "x.jsonl")
    path.write_text(content)
    result = cli("analyze", path, "--out", tmp_path / "a")
    assert (
        result.exit_code == 2
        and message in result.output
        and "seq_id" in result.output
        and "Traceback" not in result.output
    )


def test_bad_options_and_missing_paths_exit_2(tmp_path):
    assert "no such file" in cli("analyze", tmp_path / "missing.parquet").output
    result = cli("analyze", tmp_path, "--correction", "icepop=5,1", "--out", tmp_path / "a")
    assert result.exit_code == 2 and "--correction" in result.output
    rows = pd.DataFrame(
        {"seq_id": [0], "position": [0], "token_id": [1], "logp_engine": [-1.0], "logp_trainer": [-1.0], "step": [1]}
    )
    rows.to_parquet(tmp_path / "one.parquet", index=False)
    pd.concat([rows, rows.assign(step=2), rows]).to_parquet(tmp_path / "unsorted.parquet", index=False)
    result = cli("analyze", tmp_path / "unsorted.parquet", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "not together" in result.output


def test_dumps_in_the_wild_string_ids_null_pi_and_probabilities(tmp_path):
    rows = pd.DataFrame(
        {
            "seq_id": ["u-1", "u-1", "u-2"],
            "prompt_index": ["g", "g", "h"],
            "position": [0, 1, 0],
            "token_id": [1, 2, 3],
            "logp_engine": [-1.0, -0.5, -0.2],
            "logp_trainer": [-1.1, -0.5, -0.25],
        }
    )
    rows.to_json(tmp_path / "ids.jsonl", orient="records", lines=True)
    assert cli("analyze", tmp_path / "ids.jsonl", "--out", tmp_path / "a").exit_code == 0
    pair = summary_of(tmp_path / "a")["pairs"][0]
    assert (pair["n_seqs"], pair["n_tokens"]) == (2, 3)
    assert pair["k3"] == pytest.approx(np.mean([np.expm1(x) - x for x in (-0.1, 0.0, -0.05)]))

    rows.assign(logp_trainer=None).to_json(tmp_path / "null.jsonl", orient="records", lines=True)
    result = cli("analyze", tmp_path / "null.jsonl", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "carries only μ" in result.output  # an all-null π column is no π

    rows.assign(logp_engine=[0.37, 0.6, 0.8]).to_parquet(tmp_path / "probs.parquet", index=False)
    result = cli("analyze", tmp_path / "probs.parquet", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "log-probabilities" in result.output


def test_the_same_top_p_on_both_sides_is_no_setup_bug(tiny_model, tmp_path):
    """Engine and trainer both apply top-p 0.9: a few sampled tokens fall just outside the
    trainer's nucleus in another dtype, which is not a one-sided truncation."""
    result = cli(
        "scan",
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16",
        "--num-prompts",
        6,
        "--samples",
        2,
        "--max-tokens",
        16,
        "--top-p",
        0.9,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path)
    assert {a["check"]: a["status"] for a in summary["audit"]}["truncation"] == "ok"
    assert summary["recommendation"]["verdict"] != "setup_bug"


def test_drift_by_hand():
    from mismatch.stats.drift import drift

    steps = np.arange(1, 13)
    k3 = np.array([1e-3] * 6 + [4e-3] * 6)
    found = drift(steps, k3, "k3")
    assert found["departs_at"] == 7 and found["baseline"] == 1e-3 and found["trend_kind"] == "factor"
    assert found["trend"] == pytest.approx(np.exp(np.polyfit(steps, np.log(k3), 1)[0] * 11))
    assert drift(steps, np.r_[[1e-3] * 11, 1.0], "k3")["departs_at"] is None  # one step at the end does not depart
    zeros = drift(steps, np.r_[[0.0] * 10, 1e-4, 0.0], "frac_outside_2")  # a share of 0 with one blip
    assert zeros["trend_kind"] == "difference" and np.isfinite(zeros["trend"]) and zeros["departs_at"] is None
    assert drift(steps, np.r_[[0.9] * 6, [0.4] * 6], "min_ratio")["departs_at"] == 7
