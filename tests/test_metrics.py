"""Each metric against values computed by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from mismatch.stats import metrics as m
from mismatch.stats.measures import Measures

# Three tokens in two sequences: ℓ = log π − log μ = [log 2, 0, −log 2]; sequence 0 holds the first two.
MU = np.log([0.25, 0.5, 0.8])
PI = np.log([0.5, 0.5, 0.4])
SEQ = np.array([0, 0, 1])


def test_k1_k2_k3_chi2():
    ln2 = math.log(2)
    assert m.k1(PI, MU) == pytest.approx((-ln2 + 0 + ln2) / 3, abs=1e-12)
    assert m.k2(PI, MU) == pytest.approx((ln2**2 / 2 + 0 + ln2**2 / 2) / 3)
    # exp(ℓ) − 1 − ℓ: 2 − 1 − ln2, 0, 0.5 − 1 + ln2  → sum 0.5
    assert m.k3(PI, MU) == pytest.approx(0.5 / 3)
    # exp(2ℓ): 4, 1, 0.25 → mean 1.75 → minus 1
    assert m.chi2_token(PI, MU) == pytest.approx(0.75)


def test_probability_and_ratio_metrics():
    assert m.mean_abs_dp(PI, MU) == pytest.approx((0.25 + 0 + 0.4) / 3)
    assert m.max_abs_dp(PI, MU) == pytest.approx(0.4)
    assert m.min_ratio(PI, MU) == pytest.approx(0.5)
    assert m.max_ratio(PI, MU) == pytest.approx(2.0)
    # exactly 2 and exactly 1/2 are not outside; nudge one over
    assert m.frac_outside_2(PI, MU) == 0.0
    assert m.frac_outside_2(PI + np.array([0.01, 0, 0]), MU) == pytest.approx(1 / 3)


def test_sequence_metrics():
    ln2 = math.log(2)
    # Σℓ: seq0 = ln2, seq1 = −ln2 → mean of −Σℓ = 0
    assert m.seq_kl(PI, MU, SEQ) == pytest.approx(0.0, abs=1e-12)
    assert m.seq_kl(PI[:2], MU[:2], SEQ[:2]) == pytest.approx(-ln2)
    # lengths 2 and 1, Σℓ ln2 and −ln2: slope = 2 ln2 per token
    assert m.seq_slope_per_1k(PI, MU, SEQ) == pytest.approx(2000 * ln2)
    assert math.isnan(m.seq_slope_per_1k(PI[:2], MU[:2], np.array([0, 1])))
    # mean log μ − mean log π per sequence: seq0 (log .25 + log .5 − log .5 − log .5)/2 = −ln2/2, seq1 ln2
    assert m.log_ppl_diff(PI, MU, SEQ) == pytest.approx((-ln2 / 2 + ln2) / 2)


def test_bootstrap_interval_contains_the_mean_and_degenerates_for_constant_values():
    rng = np.random.default_rng(1)
    values, seqs = rng.normal(size=400), np.repeat(np.arange(40), 10)
    low, high = m.bootstrap_mean_ci(values, seqs, seed=3)
    assert low < values.mean() < high
    assert high - low < 0.5
    assert m.bootstrap_mean_ci(np.full(10, 0.2), np.arange(10)) == pytest.approx((0.2, 0.2))


def test_pair_metrics_drops_non_finite_tokens_and_counts_them():
    out = m.pair_metrics(np.append(PI, -np.inf), np.append(MU, -1.0), np.append(SEQ, 2))
    assert out["n_nonfinite"] == 1 and out["n_tokens"] == 3 and out["n_seqs"] == 2
    assert out["k3"] == pytest.approx(0.5 / 3)
    assert out["k3_ci_low"] <= out["k3"] <= out["k3_ci_high"]
    assert set(m.METRICS) <= set(out)


def test_measures_group_by_dtype_pair():
    frame = pd.DataFrame(
        {
            "engine_dtype": ["bf16"] * 3 + ["fp16"] * 3,
            "trainer_dtype": ["bf16"] * 3 + ["fp16"] * 3,
            "seq_id": np.tile(SEQ, 2),
            "prompt_index": np.tile(SEQ, 2),
            "logp_engine": np.tile(MU, 2),
            "logp_trainer": np.concatenate([PI, MU]),
            "logp_trainer_full": np.concatenate([PI, MU]),
            "log_kept_mass": 0.0,
        }
    )
    measures = Measures()
    measures.add(frame)
    table = pd.DataFrame(measures.pair_rows()).set_index("engine_dtype")
    assert table.loc["bf16", "k3"] == pytest.approx(0.5 / 3)
    assert table.loc["fp16", "k3"] == 0.0


def test_tokens_outside_the_nucleus_are_counted_apart_from_overflow():
    trainer = np.array([-1.0, -np.inf, -0.5, np.nan])
    full = np.array([-1.2, -3.0, -0.7, np.nan])  # the last one overflowed
    kept = np.array([-0.2, -0.2, -0.2, np.nan])
    engine = np.array([-1.1, -2.0, -0.4, -1.0])
    out = m.pair_metrics(trainer, engine, [0, 0, 1, 1], logp_trainer_full=full, log_kept_mass=kept)
    assert (out["n_tokens"], out["n_outside_nucleus"], out["n_nonfinite"]) == (2, 1, 1)
    assert out["mean_kept_mass"] == pytest.approx(np.exp(-0.2)) and out["nucleus_log_bias"] == pytest.approx(0.2)
    assert out["k1"] == pytest.approx(np.mean([-(-1.0 + 1.1), -(-0.5 + 0.4)]))


def test_bootstrap_resamples_prompts_not_their_correlated_samples():
    """Two prompts × 10 samples, every token of prompt 0 at 0 and of prompt 1 at 1: resampling
    prompts draws both from prompt 0 a quarter of the time; resampling sequences almost never."""
    values = np.repeat([0.0, 1.0], 10)
    seqs, prompts = np.arange(20), np.repeat([0, 1], 10)
    assert m.bootstrap_mean_ci(values, prompts)[0] == 0.0
    assert m.bootstrap_mean_ci(values, seqs)[0] > 0.2


def test_pair_stats_fed_in_chunks_equals_pair_metrics_over_all_tokens():
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 30, size=60)
    seqs = np.repeat(np.arange(60), lengths)
    prompts = seqs // 4
    engine = np.log(rng.uniform(0.01, 1, size=len(seqs)))
    trainer = engine + rng.normal(0, 0.1, size=len(seqs))
    whole = m.pair_metrics(trainer, engine, seqs, seed=2, prompt_ids=prompts)
    stats = m.PairStats()
    for part in np.array_split(np.arange(15), 3):  # three chunks of whole prompts
        keep = np.isin(prompts, part)
        stats.add(trainer[keep], engine[keep], seqs[keep], prompts[keep])
    chunked = stats.result(seed=2)
    merged = m.PairStats()  # each chunk summed on its own (a step's metrics), then taken in whole
    for part in np.array_split(np.arange(15), 3):
        keep, step = np.isin(prompts, part), m.PairStats()
        step.add(trainer[keep], engine[keep], seqs[keep], prompts[keep])
        merged.merge(step)
    assert merged.result(seed=2) == chunked
    assert chunked.keys() == whole.keys()
    for name, value in whole.items():
        assert chunked[name] == pytest.approx(value, rel=1e-12), name
    assert whole["seq_kl"] == pytest.approx(m.seq_kl(trainer, engine, seqs), rel=1e-12)
    assert whole["seq_slope_per_1k"] == pytest.approx(m.seq_slope_per_1k(trainer, engine, seqs), rel=1e-9)
    assert whole["log_ppl_diff"] == pytest.approx(m.log_ppl_diff(trainer, engine, seqs), rel=1e-12)


def test_a_pair_without_a_finite_token_has_every_key_undefined():
    empty = m.pair_metrics([np.nan, np.nan], [-1.0, -2.0], [0, 0])
    full = m.pair_metrics([-1.0, -2.0], [-1.0, -2.0], [0, 0])
    assert empty.keys() == full.keys() and empty["n_nonfinite"] == 2
    assert all(math.isnan(empty[name]) for name in (*m.METRICS, "k3_ci_low", "mean_abs_dp_ci_high"))


def test_a_run_with_very_many_clusters_gets_the_normal_interval_the_bootstrap_approaches(monkeypatch):
    rng = np.random.default_rng(5)
    counts = rng.integers(20, 200, size=3000).astype(float)
    totals = counts * 1e-3 + rng.normal(0, 0.02, size=3000) * np.sqrt(counts)
    bootstrap = m.bootstrap_totals_ci(totals, counts, seed=1)
    monkeypatch.setattr(m, "BOOTSTRAP_MAX_CLUSTERS", 1000)
    normal = m.bootstrap_totals_ci(totals, counts, seed=1)
    assert normal != bootstrap
    assert normal[0] < totals.sum() / counts.sum() < normal[1]
    assert (normal[1] - normal[0]) == pytest.approx(bootstrap[1] - bootstrap[0], rel=0.1)
    assert normal[0] == pytest.approx(bootstrap[0], abs=0.1 * (bootstrap[1] - bootstrap[0]))
