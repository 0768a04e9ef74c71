"""Why the gap grows: between a baseline window of steps and a later one, how much of the change in k3
comes from where the policy goes (the mix of positions by the trainer's entropy) and how much from the
gap at equal entropy (within buckets).

With the entropy buckets b of `stats.buckets` (merged so that both windows share them), w_b a bucket's
share of a window's tokens and m_b its mean k3 term, K = Σ_b w_b·m_b is the window's k3. Superscript 0
is the baseline window, 1 the later one.

- mix = exp(½[ln(Σw¹m⁰ / Σw⁰m⁰) + ln(Σw¹m¹ / Σw⁰m¹)]): the change the shares alone make, priced at
  either window's bucket gaps and averaged on the log scale (Fisher's index);
- within = (K¹/K⁰) / mix, so mix × within = K¹/K⁰ exactly. Bucket means equal in both windows give
  mix = K¹/K⁰ and within = 1; shares equal in both give mix = 1;
- the additive table: K¹ − K⁰ = Σ(w¹ − w⁰)m⁰ (mix) + Σw⁰(m¹ − m⁰) (within) + Σ(w¹ − w⁰)(m¹ − m⁰)
  (interaction), exactly;
- the sequence-level k3 (a sum over the response) has the mean length × K as its mean per sequence,
  so its change is the length ratio × K¹/K⁰, exactly.

Intervals are percentile bootstraps over sequences, each window resampled on its own (seeded); a draw
that empties a bucket of either window is left out.

The windows of a run (`growth_windows`, `StepBuckets`): the later one is the final window of
`stats.validation` (the last max(5, ⌈n/5⌉) of n steps), the baseline as many first steps; a run of
fewer than 10 steps is cut into two halves instead (the middle step of an odd count left out), so the
windows never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import pandas as pd

from mismatch.stats.buckets import BucketSums, by_group, merge_buckets, merged_edges
from mismatch.stats.impact import Estimate
from mismatch.stats.metrics import BOOTSTRAP_DRAWS
from mismatch.stats.validation import final_window

LEVEL = 0.95
_BLOCK = 50  # bootstrap draws held at once


class GrowthBucket(TypedDict):
    """One merged entropy bucket in both windows. An infinite `high` is null in summary.json."""

    low: float
    high: float
    share_baseline: float  # w⁰
    share_later: float  # w¹
    k3_baseline: float  # m⁰
    k3_later: float  # m¹


class Additive(TypedDict):
    """K¹ − K⁰ split into parts that add up to it exactly."""

    change: float  # K¹ − K⁰
    mix: float  # Σ(w¹ − w⁰)m⁰
    within: float  # Σw⁰(m¹ − m⁰)
    interaction: float  # Σ(w¹ − w⁰)(m¹ − m⁰)


class Growth(TypedDict):
    """summary.json's growth of k3 from a baseline window of steps to a later one."""

    baseline_steps: list[int]  # first and last step of the window
    later_steps: list[int]
    k3_baseline: float  # K⁰
    k3_later: float  # K¹
    ratio: Estimate  # K¹/K⁰
    mix: Estimate
    within: Estimate  # ratio / mix
    additive: Additive
    length_ratio: Estimate  # mean response length (tokens measured), later / baseline
    sequence_ratio: float  # mean per-sequence Σ k3 terms, later / baseline = length_ratio × ratio
    mean_entropy_baseline: float
    mean_entropy_later: float
    edges: list[float]  # the merged buckets' edges
    buckets: list[GrowthBucket]


@dataclass(frozen=True)
class _Factors:
    ratio: np.ndarray
    mix: np.ndarray
    within: np.ndarray


def _factors(n0: np.ndarray, t0: np.ndarray, n1: np.ndarray, t1: np.ndarray) -> _Factors:
    """K¹/K⁰, mix and within from each window's tokens and Σ k3 terms per bucket ([..., buckets])."""
    with np.errstate(invalid="ignore", divide="ignore"):
        w0 = n0 / n0.sum(axis=-1, keepdims=True)
        w1 = n1 / n1.sum(axis=-1, keepdims=True)
        m0 = t0 / n0
        m1 = t1 / n1
        k0 = np.sum(w0 * m0, axis=-1)
        k1 = np.sum(w1 * m1, axis=-1)
        mix = np.exp(0.5 * (np.log(np.sum(w1 * m0, axis=-1) / k0) + np.log(k1 / np.sum(w0 * m1, axis=-1))))
        ratio = k1 / k0
        return _Factors(ratio, mix, ratio / mix)


def _resampled(rng: np.random.Generator, per_seq: np.ndarray, n_boot: int) -> np.ndarray:
    """[n_boot, columns]: the columns summed over sequences drawn with replacement."""
    seqs = len(per_seq)
    if not seqs:
        return np.full((n_boot, per_seq.shape[1]), np.nan)
    blocks = []
    for start in range(0, n_boot, _BLOCK):  # memory: _BLOCK × sequences, not n_boot × sequences
        draws = rng.multinomial(seqs, np.full(seqs, 1 / seqs), size=min(_BLOCK, n_boot - start))
        blocks.append(draws.astype(np.float64) @ per_seq)
    return np.concatenate(blocks)


def _estimate(value: float, draws: np.ndarray) -> Estimate:
    finite = draws[np.isfinite(draws)]
    if not len(finite):
        return {"value": value, "low": float("nan"), "high": float("nan")}
    tail = (1 - LEVEL) / 2
    return {"value": value, "low": float(np.quantile(finite, tail)), "high": float(np.quantile(finite, 1 - tail))}


def decompose_growth(
    baseline: BucketSums,
    later: BucketSums,
    *,
    baseline_steps: tuple[int, int],
    later_steps: tuple[int, int],
    n_boot: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
) -> Growth:
    """The growth of k3 between two windows, each a `BucketSums` by entropy fed with the window's
    tokens and their sequence ids as clusters."""
    if baseline.by != "entropy" or later.by != "entropy":
        raise ValueError("the growth is decomposed over entropy buckets")
    sums = (baseline.cluster_sums(), later.cluster_sums())
    group = merge_buckets(np.stack([s.n.sum(axis=0) for s in sums]))
    n0, n1 = (by_group(s.n, group) for s in sums)
    t0, t1 = (by_group(s.k3, group) for s in sums)
    point = _factors(n0.sum(axis=0), t0.sum(axis=0), n1.sum(axis=0), t1.sum(axis=0))
    rng = np.random.default_rng(seed)
    buckets = n0.shape[1]
    drawn0 = _resampled(rng, np.hstack([n0, t0]), n_boot)
    drawn1 = _resampled(rng, np.hstack([n1, t1]), n_boot)
    draws = _factors(drawn0[:, :buckets], drawn0[:, buckets:], drawn1[:, :buckets], drawn1[:, buckets:])
    seqs0 = len(n0)
    seqs1 = len(n1)
    with np.errstate(invalid="ignore", divide="ignore"):
        length_draws = (drawn1[:, :buckets].sum(axis=1) / seqs1) / (drawn0[:, :buckets].sum(axis=1) / seqs0)
        length_ratio = (n1.sum() / seqs1) / (n0.sum() / seqs0)
        sequence_ratio = (t1.sum() / seqs1) / (t0.sum() / seqs0)
        w0 = n0.sum(axis=0) / n0.sum()
        w1 = n1.sum(axis=0) / n1.sum()
        m0 = t0.sum(axis=0) / n0.sum(axis=0)
        m1 = t1.sum(axis=0) / n1.sum(axis=0)
        k0 = float(np.sum(w0 * m0))
        k1 = float(np.sum(w1 * m1))
        entropy0 = float(sums[0].value.sum() / sums[0].n.sum())
        entropy1 = float(sums[1].value.sum() / sums[1].n.sum())
    edges = merged_edges(baseline.edges, group)
    return {
        "baseline_steps": list(baseline_steps),
        "later_steps": list(later_steps),
        "k3_baseline": k0,
        "k3_later": k1,
        "ratio": _estimate(float(point.ratio), draws.ratio),
        "mix": _estimate(float(point.mix), draws.mix),
        "within": _estimate(float(point.within), draws.within),
        "additive": {
            "change": k1 - k0,
            "mix": float(np.sum((w1 - w0) * m0)),
            "within": float(np.sum(w0 * (m1 - m0))),
            "interaction": float(np.sum((w1 - w0) * (m1 - m0))),
        },
        "length_ratio": _estimate(float(length_ratio), length_draws),
        "sequence_ratio": float(sequence_ratio),
        "mean_entropy_baseline": entropy0,
        "mean_entropy_later": entropy1,
        "edges": edges,
        "buckets": [
            {
                "low": edges[b],
                "high": edges[b + 1],
                "share_baseline": float(w0[b]),
                "share_later": float(w1[b]),
                "k3_baseline": float(m0[b]),
                "k3_later": float(m1[b]),
            }
            for b in range(buckets)
        ],
    }


def growth_windows(n_steps: int) -> tuple[range, range] | None:
    """Indexes into a run's `n_steps` steps (in order) of the baseline window and the later one; None
    under 2 steps."""
    if n_steps < 2:
        return None
    size = min(len(final_window(n_steps)), n_steps // 2)
    return range(size), range(n_steps - size, n_steps)


class StepBuckets:
    """One pair's entropy `BucketSums` per training step, fed chunk by chunk; `growth` decomposes the
    change of k3 from the run's baseline window to its later one, sequences the resampled unit."""

    def __init__(self) -> None:
        self.steps: dict[int, BucketSums] = {}

    def add(self, step: int, logp_trainer, logp_engine, entropy, seq_ids) -> None:
        """Token rows of `step`; `seq_ids` tell its sequences apart (they may restart every step)."""
        keys = pd.DataFrame({"step": step, "seq": np.asarray(seq_ids)})
        clusters = pd.util.hash_pandas_object(keys, index=False).to_numpy().view(np.int64)  # one per (step, sequence)
        self.steps.setdefault(step, BucketSums("entropy")).add(logp_trainer, logp_engine, entropy, clusters)

    def growth(self, *, n_boot: int = BOOTSTRAP_DRAWS, seed: int = 0) -> Growth | None:
        """The growth between the windows of `growth_windows`; None under 2 steps."""
        steps = sorted(self.steps)
        windows = growth_windows(len(steps))
        if windows is None:
            return None
        chosen = [[steps[i] for i in window] for window in windows]
        sums = []
        for window in chosen:
            whole = BucketSums("entropy")
            for step in window:
                whole.merge(self.steps[step])
            sums.append(whole)
        return decompose_growth(
            sums[0],
            sums[1],
            baseline_steps=(chosen[0][0], chosen[0][-1]),
            later_steps=(chosen[1][0], chosen[1][-1]),
            n_boot=n_boot,
            seed=seed,
        )


def _number(factor: float) -> str:
    return f"{factor:.0f}" if factor >= 10 else f"{factor:.2g}"


def _factor(factor: float) -> str:
    """9× for a rise, ÷2 for a fall, 1× for what rounds to no change either way."""
    if factor >= 1 or _number(1 / factor) == "1":
        return f"{_number(factor)}×"
    return f"÷{_number(1 / factor)}"


def growth_sentence(growth: Growth) -> str:
    """One line: "k3 rose 12× from steps 1–10 to 191–200: 9× from mix (the policy visits higher-entropy
    positions), 1.3× within"."""
    first, last = growth["baseline_steps"]
    later_first, later_last = growth["later_steps"]
    steps = f"from steps {first}–{last} to {later_first}–{later_last}"
    ratio = growth["ratio"]["value"]
    mix = growth["mix"]["value"]
    within = growth["within"]["value"]
    if ratio is None or mix is None or within is None or not np.isfinite([ratio, mix, within]).all() or ratio <= 0:
        return f"k3 {steps}: no factor (a window has no gap or no tokens)"
    if _number(max(ratio, 1 / ratio)) == "1":
        change = "k3 held (1×)"
    else:
        change = f"k3 {'rose' if ratio > 1 else 'fell'} {_number(max(ratio, 1 / ratio))}×"
    shift = growth["mean_entropy_later"] - growth["mean_entropy_baseline"]
    if shift > 0:
        visits = "the policy visits higher-entropy positions"
    elif shift < 0:
        visits = "the policy visits lower-entropy positions"
    else:
        visits = "the same mean entropy"
    return f"{change} {steps}: {_factor(mix)} from mix ({visits}), {_factor(within)} within"
