"""The gap by bucket against values computed by hand; the merge rule; the shares add up."""

import math

import numpy as np
import pytest

from mismatch.stats import buckets as b

LN2 = math.log(2)
K3_UP = 1 - LN2  # k3 term of ℓ = ln 2: e^ℓ − 1 − ℓ
K3_DOWN = LN2 - 0.5  # ℓ = −ln 2


def test_merge_scans_up_and_a_short_last_bucket_joins_the_one_below():
    assert b.merge_buckets([10, 100, 30, 60, 5, 70]).tolist() == [0, 0, 1, 1, 2, 2]
    assert b.merge_buckets([100, 100, 10]).tolist() == [0, 1, 1]
    assert b.merge_buckets([10, 10]).tolist() == [0, 0]
    assert b.merge_buckets([50, 50, 50]).tolist() == [0, 1, 2]
    # short in one window only: merged for both
    assert b.merge_buckets([[100, 100, 100], [100, 10, 100]]).tolist() == [0, 1, 1]
    assert b.merged_edges(b.ENTROPY_EDGES, np.array([0, 1, 1, 1, 1, 1])) == [0.0, 0.01, math.inf]
    assert b.merged_edges(b.ENGINE_PROB_EDGES, np.array([0, 0, 1, 2, 2])) == [0.0, 0.5, 0.9, 1.0]


def planted():
    """60 tokens at entropy 0.005 with ℓ = ln 2; 30 at 0.5 with ℓ = ln 2 and 30 with ℓ = 0; 10 at 5 with
    ℓ = −ln 2. μ = 1/2 throughout."""
    ratio = np.concatenate([np.full(90, LN2), np.zeros(30), np.full(10, -LN2)])
    entropy = np.concatenate([np.full(60, 0.005), np.full(60, 0.5), np.full(10, 5.0)])
    engine = np.full(130, math.log(0.5))
    return engine + ratio, engine, entropy


def test_entropy_buckets_by_hand():
    trainer, engine, entropy = planted()
    table = b.gap_by_bucket("entropy", trainer, engine, entropy)
    # [0.01, 0.1), [0.1, 0.3) and [1, 2) are empty: they join upwards into [0.3, 1); [2, ∞) holds 10
    # tokens and, last, joins the one below: two buckets [0, 0.01) and [0.01, ∞)
    assert table["edges"] == [0.0, 0.01, math.inf]
    first, second = table["rows"]
    assert (first["n_tokens"], second["n_tokens"]) == (60, 70)
    assert first["token_share"] == pytest.approx(60 / 130)
    assert first["k3"] == pytest.approx(K3_UP)
    assert second["k3"] == pytest.approx((30 * K3_UP + 10 * K3_DOWN) / 70)
    assert first["mean_abs_log_ratio"] == pytest.approx(LN2)
    assert second["mean_abs_log_ratio"] == pytest.approx(40 * LN2 / 70)
    total = 90 * K3_UP + 10 * K3_DOWN
    assert table["k3"] == pytest.approx(total / 130)
    assert first["gap_share"] == pytest.approx(60 * K3_UP / total)
    assert first["gap_share"] + second["gap_share"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(first["k3_ci_low"])  # no clusters given: no interval
    assert table["label"].startswith("by the trainer's entropy") and not table["conditioned_on_sampled_token"]


def test_engine_probability_buckets_are_labelled_and_their_edges_hold():
    # each edge value opens its bucket; 1.0 falls in the closed last bucket
    probs = np.repeat([0.05, 0.1, 0.5, 0.95, 1.0], 50)
    engine = np.log(probs)
    table = b.gap_by_bucket("engine_prob", engine, engine)
    assert table["conditioned_on_sampled_token"]
    assert "conditioned on the sampled token" in table["label"]
    assert table["edges"] == list(b.ENGINE_PROB_EDGES)
    assert [row["n_tokens"] for row in table["rows"]] == [50] * 5
    assert table["k3"] == 0.0 and all(row["k3"] == 0.0 for row in table["rows"])
    # an empty bucket joins the one above: [0.1, 0.5) with [0.5, 0.9)
    table = b.gap_by_bucket("engine_prob", engine[probs != 0.1], engine[probs != 0.1])
    assert table["edges"] == [0.0, 0.1, 0.9, 0.99, 1.0]


def test_shares_add_to_one_and_intervals_cover_the_bucket_k3():
    rng = np.random.default_rng(2)
    tokens = 5000
    entropy = rng.exponential(0.5, tokens)
    engine = -rng.exponential(0.3, tokens)
    trainer = engine + rng.normal(scale=0.05 + 0.1 * entropy)
    prompts = np.repeat(np.arange(250), 20)
    table = b.gap_by_bucket("entropy", trainer, engine, entropy, clusters=prompts, seed=1)
    rows = table["rows"]
    assert len(rows) >= 4 and all(row["n_tokens"] >= b.MIN_TOKENS for row in rows)
    assert sum(row["gap_share"] for row in rows) == pytest.approx(1.0, abs=1e-12)
    assert sum(row["token_share"] for row in rows) == pytest.approx(1.0, abs=1e-12)
    assert sum(row["n_tokens"] for row in rows) == tokens
    for row in rows:
        assert row["k3_ci_low"] <= row["k3"] <= row["k3_ci_high"]
    # the gap grows with entropy here, so the high buckets carry more than their token share
    assert rows[-1]["gap_share"] > rows[-1]["token_share"]


def test_chunks_add_up_to_one_frame_and_non_finite_tokens_are_left_out():
    trainer, engine, entropy = planted()
    trainer = trainer.copy()
    trainer[0] = -np.inf  # outside the trainer's nucleus
    clusters = np.arange(130) % 7
    whole = b.gap_by_bucket("entropy", trainer, engine, entropy, clusters=clusters)
    chunked = b.BucketSums("entropy")
    for part in np.array_split(np.arange(130), 3):
        chunked.add(trainer[part], engine[part], entropy[part], clusters[part])
    result = chunked.result()
    assert result["edges"] == whole["edges"]
    for mine, theirs in zip(result["rows"], whole["rows"], strict=True):
        assert mine == pytest.approx(theirs, rel=1e-12)
    assert whole["n_left_out"] == 1 and whole["n_tokens"] == 129


def test_entropy_buckets_need_the_entropy():
    with pytest.raises(ValueError, match="entropy"):
        b.BucketSums("entropy").add([0.0], [0.0])


def test_no_measurable_token_gives_one_empty_bucket():
    table = b.gap_by_bucket("entropy", [-np.inf, -np.inf], [-1.0, -1.0], [0.5, 0.5])
    assert table["n_left_out"] == 2 and table["n_tokens"] == 0
    assert table["edges"] == [0.0, math.inf]
    assert math.isnan(table["rows"][0]["k3"])
