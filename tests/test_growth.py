"""The growth of k3 decomposed on planted windows whose answer is known."""

import math

import numpy as np
import pytest

from mismatch.stats import growth as g
from mismatch.stats.buckets import BucketSums

LOW, HIGH = 0.005, 1.5  # entropies in the buckets [0, 0.01) and [1, 2)


def window(sequences: int, per_sequence: list[tuple[float, float, int]]) -> BucketSums:
    """`sequences` alike sequences, each holding, per (entropy, ℓ, count), count/2 tokens at +ℓ and
    count/2 at −ℓ (so every sequence has the same mean k3 per bucket)."""
    entropy, ratio, seqs = [], [], []
    for seq in range(sequences):
        for value, size, count in per_sequence:
            entropy += [value] * count
            ratio += [size, -size] * (count // 2)
            seqs += [seq] * count
    engine = np.full(len(ratio), math.log(0.25))
    sums = BucketSums("entropy")
    sums.add(engine + np.array(ratio), engine, np.array(entropy), np.array(seqs))
    return sums


def mean_k3(size: float) -> float:
    """Mean k3 term of ±ℓ: (e^ℓ − 1 − ℓ + e^−ℓ − 1 + ℓ) / 2 = cosh ℓ − 1."""
    return math.cosh(size) - 1


def test_only_the_mix_changes():
    # within-bucket gaps fixed; tokens move from low to high entropy (6:2 per sequence → 2:6)
    baseline = window(50, [(LOW, 0.1, 6), (HIGH, 0.5, 2)])
    later = window(50, [(LOW, 0.1, 2), (HIGH, 0.5, 6)])
    out = g.decompose_growth(baseline, later, baseline_steps=(1, 10), later_steps=(191, 200), seed=0)
    k0 = 0.75 * mean_k3(0.1) + 0.25 * mean_k3(0.5)
    k1 = 0.25 * mean_k3(0.1) + 0.75 * mean_k3(0.5)
    assert out["k3_baseline"] == pytest.approx(k0, rel=1e-12)
    assert out["k3_later"] == pytest.approx(k1, rel=1e-12)
    assert out["ratio"]["value"] == pytest.approx(k1 / k0, rel=1e-12)
    assert out["mix"]["value"] == pytest.approx(k1 / k0, rel=1e-12)
    assert out["within"]["value"] == pytest.approx(1.0, abs=1e-12)
    assert out["additive"]["within"] == pytest.approx(0.0, abs=1e-15)
    assert out["additive"]["interaction"] == pytest.approx(0.0, abs=1e-15)
    assert out["additive"]["mix"] == pytest.approx(k1 - k0, rel=1e-12)
    # every sequence alike: each resample gives the same factors
    assert out["within"]["low"] == pytest.approx(1.0, abs=1e-12)
    assert out["mix"]["low"] == pytest.approx(out["mix"]["high"], rel=1e-12)
    assert [b["share_baseline"] for b in out["buckets"]] == pytest.approx([0.75, 0.25])
    assert out["edges"] == [0.0, 0.01, math.inf]  # the empty buckets merged
    assert g.growth_sentence(out) == (
        f"k3 rose {k1 / k0:.2g}× from steps 1–10 to 191–200: {k1 / k0:.2g}× from mix "
        "(the policy visits higher-entropy positions), 1× within"
    )


def test_only_the_gap_within_buckets_grows():
    baseline = window(50, [(LOW, 0.1, 6), (HIGH, 0.5, 2)])
    later = window(50, [(LOW, 0.2, 6), (HIGH, 1.0, 2)])
    out = g.decompose_growth(baseline, later, baseline_steps=(1, 10), later_steps=(91, 100))
    k0 = 0.75 * mean_k3(0.1) + 0.25 * mean_k3(0.5)
    k1 = 0.75 * mean_k3(0.2) + 0.25 * mean_k3(1.0)
    assert out["mix"]["value"] == 1.0
    assert out["within"]["value"] == pytest.approx(k1 / k0, rel=1e-12)
    assert out["additive"]["mix"] == 0.0
    assert out["additive"]["within"] == pytest.approx(k1 - k0, rel=1e-12)
    sentence = g.growth_sentence(out)
    assert sentence.startswith(f"k3 rose {k1 / k0:.2g}× from steps 1–10 to 91–100: 1× from mix")
    assert sentence.endswith(f"{k1 / k0:.2g}× within")


def test_a_fall_towards_low_entropy_reads_as_such():
    baseline = window(50, [(LOW, 0.1, 2), (HIGH, 0.5, 6)])
    later = window(50, [(LOW, 0.1, 6), (HIGH, 0.25, 2)])
    out = g.decompose_growth(baseline, later, baseline_steps=(1, 10), later_steps=(11, 20))
    assert out["ratio"]["value"] < out["mix"]["value"] < 1 and out["within"]["value"] < 1
    sentence = g.growth_sentence(out)
    assert sentence.startswith(f"k3 fell {1 / out['ratio']['value']:.2g}× from steps 1–10 to 11–20: ÷")
    assert "(the policy visits lower-entropy positions)" in sentence


def random_window(rng, sequences: int, entropy_scale: float, noise: float) -> BucketSums:
    lengths = rng.integers(5, 40, sequences)
    seqs = np.repeat(np.arange(sequences), lengths)
    entropy = rng.exponential(entropy_scale, len(seqs))
    engine = -rng.exponential(0.3, len(seqs))
    trainer = engine + rng.normal(scale=noise * (0.05 + entropy))
    sums = BucketSums("entropy")
    half = len(seqs) // 2  # fed in two chunks, a sequence possibly split between them
    sums.add(trainer[:half], engine[:half], entropy[:half], seqs[:half])
    sums.add(trainer[half:], engine[half:], entropy[half:], seqs[half:])
    return sums


def test_identities_hold_exactly_on_any_data():
    rng = np.random.default_rng(4)
    baseline = random_window(rng, 300, 0.3, 0.1)
    later = random_window(rng, 200, 0.8, 0.15)
    out = g.decompose_growth(baseline, later, baseline_steps=(0, 9), later_steps=(90, 99), seed=2)
    ratio, mix, within = out["ratio"]["value"], out["mix"]["value"], out["within"]["value"]
    assert mix * within == pytest.approx(ratio, rel=1e-12)
    parts = out["additive"]
    assert parts["mix"] + parts["within"] + parts["interaction"] == pytest.approx(parts["change"], rel=1e-12)
    assert parts["change"] == pytest.approx(out["k3_later"] - out["k3_baseline"], rel=1e-12)
    assert out["sequence_ratio"] == pytest.approx(out["length_ratio"]["value"] * ratio, rel=1e-12)
    for name in ("ratio", "mix", "within", "length_ratio"):
        assert out[name]["low"] < out[name]["value"] < out[name]["high"], name
    assert out["mean_entropy_later"] > out["mean_entropy_baseline"] and mix > 1
    # both windows share the buckets, each with at least 50 tokens
    assert len(out["buckets"]) == len(out["edges"]) - 1
    assert all(b["share_baseline"] > 0 and b["share_later"] > 0 for b in out["buckets"])
    again = g.decompose_growth(baseline, later, baseline_steps=(0, 9), later_steps=(90, 99), seed=2)
    assert again["mix"] == out["mix"]  # seeded


def test_growth_is_over_entropy_buckets():
    sums = BucketSums("engine_prob")
    with pytest.raises(ValueError, match="entropy"):
        g.decompose_growth(sums, sums, baseline_steps=(0, 1), later_steps=(2, 3))


def test_an_empty_window_gives_no_factor():
    empty = BucketSums("entropy")
    full = window(50, [(LOW, 0.1, 6), (HIGH, 0.5, 2)])
    out = g.decompose_growth(empty, full, baseline_steps=(1, 2), later_steps=(3, 4))
    assert math.isnan(out["ratio"]["value"]) and math.isnan(out["mix"]["low"])
    assert g.growth_sentence(out) == "k3 from steps 1–2 to 3–4: no factor (a window has no gap or no tokens)"
