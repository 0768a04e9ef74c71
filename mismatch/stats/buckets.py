"""The gap by kind of position: k3 and mean |ℓ| (ℓ = log π − log μ) per bucket of the trainer's
entropy at the position, or per bucket of μ's probability of the sampled token. The second table is
conditioned on the sampled token: a bucket holds the tokens the engine happened to draw with that
probability, not positions of a kind.

Edges are fixed and absolute, so that pairs, runs and windows of steps compare bucket for bucket:
entropy in nats [0, 0.01, 0.1, 0.3, 1, 2, ∞), μ's probability [0, 0.1, 0.5, 0.9, 0.99, 1]. Each
bucket is closed below and open above, the last one closed at 1; an entropy rounded below 0 counts
in the first bucket. A bucket of fewer than MIN_TOKENS tokens joins the bucket above it, scanning
from the lowest edge up; a short last bucket joins the one below. Merged buckets stay contiguous and
the rule depends on the counts only. With several windows of steps (`stats.growth`) a bucket is merged
when it is short in any window, so that every window has the same buckets and each has a mean.

A bucket's share of the total gap is its token share × its k3 / the overall k3, which is Σ k3 terms in
the bucket / Σ k3 terms overall: k3 is a mean of per-token terms, so the shares add to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import pandas as pd

from mismatch.stats.metrics import bootstrap_totals_ci, k3_terms, log_ratio

MIN_TOKENS = 50
ENTROPY_EDGES = (0.0, 0.01, 0.1, 0.3, 1.0, 2.0, float("inf"))
ENGINE_PROB_EDGES = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)
EDGES = {"entropy": ENTROPY_EDGES, "engine_prob": ENGINE_PROB_EDGES}
LABELS = {
    "entropy": "by the trainer's entropy at the position (nats)",
    "engine_prob": "by μ's probability of the sampled token (conditioned on the sampled token)",
}
_SUMS = ("n", "k3", "abs_ratio", "value")


class BucketRow(TypedDict):
    """One bucket (after merging). An infinite `high` is null in summary.json."""

    low: float
    high: float
    n_tokens: int
    token_share: float
    k3: float
    k3_ci_low: float  # cluster bootstrap over the clusters with tokens in the bucket; NaN under 2 of them
    k3_ci_high: float
    mean_abs_log_ratio: float
    gap_share: float  # token_share × k3 / overall k3: the rows add to 1


class BucketTable(TypedDict):
    """The gap of one pair by bucket of one variable (`by`: entropy or engine_prob)."""

    by: str
    label: str
    conditioned_on_sampled_token: bool
    edges: list[float]  # after merging: len(rows) + 1 of the fixed edges
    n_tokens: int
    n_left_out: int  # tokens with a non-finite log-prob or entropy (e.g. outside the trainer's nucleus)
    k3: float
    rows: list[BucketRow]


@dataclass(frozen=True)
class ClusterSums:
    """Per cluster (rows, in sorted cluster order) and fixed bucket (columns): tokens and sums."""

    n: np.ndarray
    k3: np.ndarray  # Σ k3 terms
    abs_ratio: np.ndarray  # Σ |ℓ|
    value: np.ndarray  # Σ of the bucketed variable (entropy, or μ's probability)


def merge_buckets(counts, min_tokens: int = MIN_TOKENS) -> np.ndarray:
    """The merged bucket of each fixed bucket, from token counts [buckets] or [windows, buckets]: a
    bucket short of `min_tokens` in any window joins the one above (the last, the one below)."""
    counts = np.atleast_2d(np.asarray(counts))
    groups = [[b] for b in range(counts.shape[1])]
    i = 0
    while len(groups) > 1 and i < len(groups):
        if counts[:, groups[i]].sum(axis=1).min() >= min_tokens:
            i += 1
        elif i + 1 < len(groups):
            groups[i] += groups.pop(i + 1)
        else:
            groups[i - 1] += groups.pop(i)
    return np.repeat(np.arange(len(groups)), [len(g) for g in groups])


def merged_edges(edges, group: np.ndarray) -> list[float]:
    """The fixed edges that still bound a merged bucket."""
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    return [float(edges[s]) for s in starts] + [float(edges[-1])]


def by_group(matrix: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Columns of fixed buckets summed into merged buckets."""
    return matrix @ (group[:, None] == np.arange(group.max() + 1)).astype(np.float64)


class BucketSums:
    """Tokens, Σ k3 terms, Σ|ℓ| and Σ of the variable per cluster and fixed bucket, fed chunk by chunk
    (a cluster may span chunks: its sums add up)."""

    def __init__(self, by: str) -> None:
        self.by = by
        self.edges = EDGES[by]
        self.n_left_out = 0
        self.frames: list[pd.DataFrame] = []

    def add(self, logp_trainer, logp_engine, entropy=None, clusters=None) -> None:
        """Token rows; `entropy` (nats, per token) is needed by entropy; `clusters` (prompt or
        sequence ids) are the units of the intervals (none given: one cluster, no interval)."""
        trainer = np.asarray(logp_trainer, dtype=np.float64)
        engine = np.asarray(logp_engine, dtype=np.float64)
        if self.by == "entropy":
            if entropy is None:
                raise ValueError("the entropy buckets need the entropy per token")
            value = np.asarray(entropy, dtype=np.float64)
        else:
            value = np.exp(engine)
        units = np.zeros(len(trainer), dtype=np.int64) if clusters is None else np.asarray(clusters)
        keep = np.isfinite(trainer) & np.isfinite(engine) & np.isfinite(value)
        self.n_left_out += int((~keep).sum())
        if not keep.any():
            return
        ratio = log_ratio(trainer[keep], engine[keep])
        frame = pd.DataFrame(
            {
                "cluster": units[keep],
                "bucket": np.digitize(value[keep], self.edges[1:-1]),
                "n": np.ones(len(ratio)),
                "k3": k3_terms(trainer[keep], engine[keep]),
                "abs_ratio": np.abs(ratio),
                "value": value[keep],
            }
        )
        self.frames.append(frame.groupby(["cluster", "bucket"], sort=True).sum())
        if len(self.frames) >= 64:  # one frame instead of many small ones
            self.frames = [self._joined()]

    def merge(self, other: BucketSums) -> None:
        """Add `other`'s sums (of the same variable): a cluster in both adds up as one."""
        if other.by != self.by:
            raise ValueError(f"cannot merge {other.by} buckets into {self.by} buckets")
        self.frames += other.frames
        self.n_left_out += other.n_left_out

    def _joined(self) -> pd.DataFrame:
        return pd.concat(self.frames).groupby(level=[0, 1], sort=True).sum()

    def cluster_sums(self) -> ClusterSums:
        buckets = len(self.edges) - 1
        if not self.frames:
            return ClusterSums(*(np.zeros((0, buckets)) for _ in _SUMS))
        joined = self._joined()
        wide = joined.unstack("bucket", fill_value=0.0)
        matrices = [wide[name].reindex(columns=range(buckets), fill_value=0.0).to_numpy() for name in _SUMS]
        return ClusterSums(*matrices)

    def result(self, seed: int = 0) -> BucketTable:
        sums = self.cluster_sums()
        group = merge_buckets(sums.n.sum(axis=0))
        n = by_group(sums.n, group)
        k3 = by_group(sums.k3, group)
        abs_ratio = by_group(sums.abs_ratio, group).sum(axis=0)
        edges = merged_edges(self.edges, group)
        tokens = n.sum(axis=0)
        gap = k3.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            overall = gap.sum() / tokens.sum()
            token_share = tokens / tokens.sum()
            k3_mean = gap / tokens
            abs_mean = abs_ratio / tokens
            gap_share = gap / gap.sum()
        rows: list[BucketRow] = []
        for b in range(len(tokens)):
            present = n[:, b] > 0
            low, high = (float("nan"), float("nan"))
            if present.sum() >= 2:
                low, high = bootstrap_totals_ci(k3[present, b], n[present, b], seed=seed)
            rows.append(
                {
                    "low": edges[b],
                    "high": edges[b + 1],
                    "n_tokens": int(tokens[b]),
                    "token_share": float(token_share[b]),
                    "k3": float(k3_mean[b]),
                    "k3_ci_low": low,
                    "k3_ci_high": high,
                    "mean_abs_log_ratio": float(abs_mean[b]),
                    "gap_share": float(gap_share[b]),
                }
            )
        return {
            "by": self.by,
            "label": LABELS[self.by],
            "conditioned_on_sampled_token": self.by == "engine_prob",
            "edges": edges,
            "n_tokens": int(tokens.sum()),
            "n_left_out": self.n_left_out,
            "k3": float(overall),
            "rows": rows,
        }


def gap_by_bucket(by: str, logp_trainer, logp_engine, entropy=None, *, clusters=None, seed: int = 0) -> BucketTable:
    """The bucket table of one frame of tokens (`BucketSums` fed once)."""
    sums = BucketSums(by)
    sums.add(logp_trainer, logp_engine, entropy, clusters)
    return sums.result(seed)
