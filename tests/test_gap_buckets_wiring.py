"""The gap by kind of position and why it grows, end to end: the trainer's entropy in tokens.parquet
(scan, train, the open format), summary.json `buckets` and `growth`, their report sections and terminal
lines; diagnose's k3 ratio to the total named as what it is."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.commands.diagnose import dominant_components, recommend_diagnosis
from mismatch.report.html import figures
from mismatch.runs import load_analyze
from mismatch.stats.buckets import gap_by_bucket
from mismatch.stats.growth import growth_windows
from mismatch.stats.metrics import k3_terms

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


# --- scan: the entropy column and the buckets ---------------------------------------------------


def test_scan_tokens_carry_the_trainers_entropy_as_an_independent_forward_computes_it(shared_scan, tiny_model):
    from transformers import AutoModelForCausalLM

    out, _, _ = shared_scan("hf")
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert tokens["entropy"].dtype == np.float64 and tokens["entropy"].notna().all()
    temperature = summary_of(out)["config"]["sampling"]["temperature"]
    rollouts = pd.read_parquet(out / "rollouts.parquet").query("engine_dtype == 'bf16'")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ours = tokens.query("engine_dtype == 'bf16' and trainer_dtype == 'fp32'").sort_values(["seq_id", "position"])
    expected = []
    for row in rollouts.sort_values("seq_id").itertuples():
        ids = torch.tensor([[*row.prompt_ids, *row.response_ids]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double() / temperature
        rows = logits[len(row.prompt_ids) - 1 : ids.shape[1] - 1]
        expected.append(torch.distributions.Categorical(logits=rows).entropy().numpy())
    assert ours["entropy"].to_numpy() == pytest.approx(np.concatenate(expected), abs=1e-4)
    # the bf16 trainer's entropy is its own, close to FP32's but not equal
    bf16 = tokens.query("engine_dtype == 'bf16' and trainer_dtype == 'bf16'").sort_values(["seq_id", "position"])
    assert not np.array_equal(bf16["entropy"].to_numpy(), ours["entropy"].to_numpy())
    assert bf16["entropy"].to_numpy() == pytest.approx(ours["entropy"].to_numpy(), abs=0.05)


def test_scan_summary_has_both_bucket_tables_per_pair_whose_shares_add_up(shared_scan):
    out, _, _ = shared_scan("hf")
    summary = summary_of(out)
    tokens = pd.read_parquet(out / "tokens.parquet")
    pairs = {(p["engine_dtype"], p["trainer_dtype"]): p for p in summary["pairs"]}
    assert [(b["engine_dtype"], b["trainer_dtype"]) for b in summary["buckets"]] == list(pairs)
    for bucket in summary["buckets"]:
        pair = pairs[bucket["engine_dtype"], bucket["trainer_dtype"]]
        for by in ("entropy", "engine_prob"):
            table = bucket[by]
            assert table["by"] == by and table["conditioned_on_sampled_token"] == (by == "engine_prob")
            rows = table["rows"]
            assert sum(r["token_share"] for r in rows) == pytest.approx(1, abs=1e-12)
            assert sum(r["gap_share"] for r in rows) == pytest.approx(1, abs=1e-9)
            assert sum(r["n_tokens"] for r in rows) == table["n_tokens"] == pair["n_tokens"]
            assert table["k3"] == pytest.approx(pair["k3"], rel=1e-9)  # the buckets cut the pair's k3, nothing else
            assert all(r["n_tokens"] >= 50 for r in rows) or len(rows) == 1
        # the plotted numbers: recomputed from tokens.parquet alone
        rows = tokens.query(
            f"engine_dtype == '{bucket['engine_dtype']}' and trainer_dtype == '{bucket['trainer_dtype']}'"
        )
        again = gap_by_bucket("entropy", rows["logp_trainer"], rows["logp_engine"], rows["entropy"])
        assert [r["gap_share"] for r in again["rows"]] == pytest.approx(
            [r["gap_share"] for r in bucket["entropy"]["rows"]]
        )
        assert again["edges"][:-1] == bucket["entropy"]["edges"][:-1]
    html = (out / "report.html").read_text()
    assert 'id="buckets"' in html and "Share of tokens and share of k3 per bucket" in html
    assert "conditioned on the sampled token" in html


def test_analyze_of_a_scan_gives_the_scans_buckets_exactly(shared_scan, tmp_path):
    out, _, _ = shared_scan("hf")
    result = cli("analyze", out, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    analyzed = summary_of(tmp_path / "a")
    assert analyzed["buckets"] == summary_of(out)["buckets"]
    assert analyzed["growth"] == []  # one chunk, no steps


def test_a_run_folder_without_entropy_still_reports(shared_scan, tmp_path):
    """A dump without the column: no entropy table, the μ-probability one still; the report builds."""
    out, _, _ = shared_scan("hf")
    tokens = pd.read_parquet(out / "tokens.parquet").drop(columns=["entropy"])
    tokens.to_parquet(tmp_path / "dump.parquet")
    result = cli("analyze", tmp_path / "dump.parquet", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    buckets = summary_of(tmp_path / "a")["buckets"]
    assert all(b["entropy"] is None and b["engine_prob"]["n_tokens"] > 0 for b in buckets)
    html = (tmp_path / "a" / "report.html").read_text()
    assert 'id="buckets"' in html and "Share of tokens and share of k3 per bucket" not in html


# --- why it grows: planted dumps ----------------------------------------------------------------

LOW, HIGH = 0.005, 1.5  # entropies in the buckets [0, 0.01) and [1, 2)


def planted_steps(steps: int, per_step) -> pd.DataFrame:
    """Token rows of `steps` steps, 8 sequences each; `per_step(step)` gives (entropy, ℓ, count) per
    sequence: count/2 tokens at +ℓ and count/2 at −ℓ, so a bucket's mean k3 term is cosh ℓ − 1 exactly."""
    rows = []
    for step in range(steps):
        for seq in range(8):
            position = 0
            for entropy, size, count in per_step(step):
                for sign in [1, -1] * (count // 2):
                    rows.append(
                        (step, seq, seq // 2, position, 7, math.log(0.25), math.log(0.25) + sign * size, entropy)
                    )
                    position += 1
    columns = ["step", "seq_id", "prompt_index", "position", "token_id", "logp_engine", "logp_trainer", "entropy"]
    return pd.DataFrame(rows, columns=columns)


def mean_k3(size: float) -> float:
    return math.cosh(size) - 1


def test_analyze_a_dump_where_only_the_mix_changes(tmp_path):
    # 10 steps: windows 0–4 and 5–9; the high-entropy share goes from 1/4 to 3/4, each bucket's gap fixed
    dump = planted_steps(10, lambda s: [(LOW, 0.1, 12), (HIGH, 0.5, 4)] if s < 5 else [(LOW, 0.1, 4), (HIGH, 0.5, 12)])
    dump.to_parquet(tmp_path / "dump.parquet")
    result = cli("analyze", tmp_path / "dump.parquet", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    (growth,) = summary_of(tmp_path / "a")["growth"]
    k0 = 0.75 * mean_k3(0.1) + 0.25 * mean_k3(0.5)
    k1 = 0.25 * mean_k3(0.1) + 0.75 * mean_k3(0.5)
    assert growth["baseline_steps"] == [0, 4] and growth["later_steps"] == [5, 9]
    assert growth["ratio"]["value"] == pytest.approx(k1 / k0, rel=1e-9)
    assert growth["mix"]["value"] == pytest.approx(k1 / k0, rel=1e-9)
    assert growth["within"]["value"] == pytest.approx(1, abs=1e-9)
    assert growth["mix"]["value"] * growth["within"]["value"] == pytest.approx(growth["ratio"]["value"], rel=1e-12)
    assert growth["additive"]["within"] == pytest.approx(0, abs=1e-12)
    assert growth["length_ratio"]["value"] == pytest.approx(1)
    assert growth["mean_entropy_later"] > growth["mean_entropy_baseline"]
    line = f"engine→trainer: k3 rose {k1 / k0:.2g}× from steps 0–4 to 5–9: {k1 / k0:.2g}× from mix"
    assert line in result.output and "1× within" in result.output
    html = (tmp_path / "a" / "report.html").read_text()
    assert 'id="growth"' in html and "(the policy visits higher-entropy positions)" in html
    assert "**Why the gap grew:** engine→trainer: k3 rose" in (tmp_path / "a" / "summary.md").read_text()
    # a dump too large to plot whole: the plots' every k-th token keeps the entropy
    sampled = load_analyze(tmp_path / "a", limit=100)
    assert sampled.sampled and sampled.tokens["entropy"].notna().all() and "gap_by_entropy" in figures(sampled)


def test_analyze_a_sequence_row_dump_where_only_the_gap_within_buckets_grows(tmp_path):
    # the open format's sequence rows, entropy as a list; shares fixed, the high-entropy gap doubles from step 6
    tokens = planted_steps(12, lambda s: [(LOW, 0.1, 8), (HIGH, 0.5 if s < 6 else 1.0, 8)])
    sequences = (
        tokens.groupby(["step", "seq_id", "prompt_index"], sort=True)
        .agg({c: list for c in ("token_id", "logp_engine", "logp_trainer", "entropy")})
        .reset_index()
    )
    with (tmp_path / "dump.jsonl").open("w") as handle:
        for record in sequences.to_dict("records"):
            handle.write(json.dumps(record) + "\n")
    result = cli("analyze", tmp_path / "dump.jsonl", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    (growth,) = summary_of(tmp_path / "a")["growth"]
    k0 = 0.5 * mean_k3(0.1) + 0.5 * mean_k3(0.5)
    k1 = 0.5 * mean_k3(0.1) + 0.5 * mean_k3(1.0)
    assert growth["baseline_steps"] == [0, 4] and growth["later_steps"] == [7, 11]  # 12 steps: windows of 5
    assert growth["mix"]["value"] == pytest.approx(1, abs=1e-9)
    assert growth["within"]["value"] == pytest.approx(k1 / k0, rel=1e-9)
    assert growth["additive"]["mix"] == pytest.approx(0, abs=1e-12)
    parts = growth["additive"]
    assert parts["mix"] + parts["within"] + parts["interaction"] == pytest.approx(parts["change"], rel=1e-12)
    assert "1× from mix" in result.output


def test_growth_windows_are_the_final_window_and_as_many_first_steps():
    assert growth_windows(1) is None
    assert growth_windows(2) == (range(0, 1), range(1, 2))
    assert growth_windows(9) == (range(0, 4), range(5, 9))  # halves, the middle step left out
    assert growth_windows(10) == (range(0, 5), range(5, 10))
    assert growth_windows(200) == (range(0, 40), range(160, 200))  # ⌈200/5⌉, as stats.validation.final_window


# --- train: entropy per token and the growth ----------------------------------------------------


def test_train_writes_entropy_and_decomposes_the_growth(tiny_model, tmp_path):
    result = cli(
        "train",
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtype",
        "bf16",
        "--steps",
        4,
        "--prompts-per-step",
        2,
        "--group-size",
        2,
        "--max-tokens",
        8,
        "--no-step0-check",
        "--impact-every",
        0,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    tokens = pd.read_parquet(tmp_path / "tokens.parquet")
    steps = pd.read_parquet(tmp_path / "metrics.parquet")
    assert tokens["entropy"].notna().all() and (tokens["entropy"] >= 0).all()
    # the tokens' entropy is what the step logged as its mean
    assert tokens.groupby("step")["entropy"].mean().to_numpy() == pytest.approx(steps["entropy"].to_numpy(), rel=1e-6)
    growth = summary_of(tmp_path)["growth"]
    assert growth["baseline_steps"] == [0, 1] and growth["later_steps"] == [2, 3]
    ratio = growth["ratio"]["value"]
    assert growth["mix"]["value"] * growth["within"]["value"] == pytest.approx(ratio, rel=1e-12)

    def k3(window):
        chosen = tokens[tokens["step"].isin(window)]
        return float(np.mean(k3_terms(chosen["logp_trainer"].to_numpy(), chosen["logp_engine"].to_numpy())))

    assert growth["k3_baseline"] == pytest.approx(k3([0, 1]), rel=1e-9)
    assert ratio == pytest.approx(k3([2, 3]) / k3([0, 1]), rel=1e-9)
    assert "bf16: k3 " in result.output and " within" in result.output
    assert 'id="growth"' in (tmp_path / "report.html").read_text()
    # the train folder analysed: the same growth from its tokens.parquet
    analyzed = cli("analyze", tmp_path, "--out", tmp_path / "analyzed")
    assert analyzed.exit_code == 0, analyzed.output
    (again,) = summary_of(tmp_path / "analyzed")["growth"]
    assert again["ratio"]["value"] == pytest.approx(ratio, rel=1e-12)
    assert again["mix"]["value"] == pytest.approx(growth["mix"]["value"], rel=1e-12)


# --- diagnose: the dominant component's k3 against the total's ----------------------------------


def test_diagnose_names_the_ratio_to_the_total_as_a_ratio():
    components = [
        {"name": "total", "engine_dtype": "fp16", "k3": 1.0e-5},
        {"name": "trainer_precision", "engine_dtype": "fp16", "k3": 1.81e-5},
        {"name": "engine_precision", "engine_dtype": "fp16", "k3": 1.2e-5},
        {"name": "semantic", "engine_dtype": "fp16", "k3": 1e-12},
    ]
    top = dominant_components(components)["fp16"]
    assert "share_of_total" not in top and top["k3_ratio_to_total"] == pytest.approx(1.81)
    summary = recommend_diagnosis(components)["summary"]
    assert "trainer_precision dominates (k3 1.81e-05, 1.8× the total's)" in summary
    assert "%" not in summary


def test_entropy_of_logit_rows_by_hand():
    from mismatch.model.rescore import entropy, top_p_filter

    uniform = torch.zeros(1, 1000)
    one_hot = torch.full((1, 1000), -1e4).index_fill_(1, torch.tensor([3]), 30.0)
    two = torch.full((1, 1000), -5.0).index_fill_(1, torch.tensor([1, 2]), 5.0)  # 2 tokens hold 98% of the mass
    rows = torch.cat([uniform, one_hot, two])
    got = entropy(rows)
    exact_two = float(torch.distributions.Categorical(logits=two.double()).entropy()[0])
    assert got.tolist() == pytest.approx([math.log(1000), 0.0, exact_two], abs=1e-5)
    nucleus = top_p_filter(two, 0.9)  # the nucleus: the two tokens, renormalised
    assert float(entropy(nucleus)[0]) == pytest.approx(math.log(2), abs=1e-6)
    random = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0)) * 4
    exact = torch.distributions.Categorical(logits=random.double()).entropy()
    assert entropy(random).double().numpy() == pytest.approx(exact.numpy(), rel=1e-5)
