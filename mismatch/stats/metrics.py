"""Mismatch metrics: pure functions of trainer and engine log-probabilities of sampled tokens.

With ℓ = log π − log μ for response tokens sampled from μ (engine) and scored by π (trainer),
pooled over tokens unless a name says "seq". These are Monte-Carlo estimators under μ:
k1, k2, k3 estimate KL[μ‖π] (k3 is unbiased and never negative: Schulman's "approximating KL");
`chi2_token` estimates χ²(π‖μ) = E_μ[(π/μ)²] − 1, which governs importance-weight variance.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import TypedDict

import numpy as np
import pandas as pd

CI_METRICS = ("k3", "mean_abs_dp")
INTERVALS = tuple(f"{name}_ci_{end}" for name in CI_METRICS for end in ("low", "high"))
METRICS = (
    "k1",
    "k2",
    "k3",
    "chi2_token",
    "mean_abs_dp",
    "max_abs_dp",
    "min_ratio",
    "max_ratio",
    "frac_outside_2",
    "seq_kl",
    "seq_slope_per_1k",
    "log_ppl_diff",
)


def log_ratio(logp_trainer, logp_engine) -> np.ndarray:
    """ℓ = log π − log μ."""
    return np.asarray(logp_trainer, dtype=np.float64) - np.asarray(logp_engine, dtype=np.float64)


def k1(logp_trainer, logp_engine) -> float:
    """mean(−ℓ)."""
    return float(np.mean(-log_ratio(logp_trainer, logp_engine)))


def k2(logp_trainer, logp_engine) -> float:
    """mean(ℓ² / 2)."""
    return float(np.mean(log_ratio(logp_trainer, logp_engine) ** 2 / 2))


def k3_terms(logp_trainer, logp_engine) -> np.ndarray:
    """Per-token exp(ℓ) − 1 − ℓ (≥ 0)."""
    ratio = log_ratio(logp_trainer, logp_engine)
    return np.expm1(ratio) - ratio


def k3(logp_trainer, logp_engine) -> float:
    """mean(exp(ℓ) − 1 − ℓ)."""
    return float(np.mean(k3_terms(logp_trainer, logp_engine)))


def chi2_token(logp_trainer, logp_engine) -> float:
    """mean(exp(2ℓ)) − 1."""
    return float(np.mean(np.exp(2 * log_ratio(logp_trainer, logp_engine))) - 1)


def abs_dp(logp_trainer, logp_engine) -> np.ndarray:
    """Per-token |π − μ| in probability space."""
    return np.abs(
        np.exp(np.asarray(logp_trainer, dtype=np.float64)) - np.exp(np.asarray(logp_engine, dtype=np.float64))
    )


def mean_abs_dp(logp_trainer, logp_engine) -> float:
    """mean |exp(log π) − exp(log μ)|."""
    return float(np.mean(abs_dp(logp_trainer, logp_engine)))


def max_abs_dp(logp_trainer, logp_engine) -> float:
    """max |exp(log π) − exp(log μ)|."""
    return float(np.max(abs_dp(logp_trainer, logp_engine)))


def min_ratio(logp_trainer, logp_engine) -> float:
    """min exp(ℓ)."""
    return float(np.exp(np.min(log_ratio(logp_trainer, logp_engine))))


def max_ratio(logp_trainer, logp_engine) -> float:
    """max exp(ℓ)."""
    return float(np.exp(np.max(log_ratio(logp_trainer, logp_engine))))


def frac_outside_2(logp_trainer, logp_engine) -> float:
    """Share of tokens with exp(ℓ) > 2 or exp(ℓ) < 1/2."""
    return float(np.mean(np.abs(log_ratio(logp_trainer, logp_engine)) > np.log(2)))


def _per_sequence(logp_trainer, logp_engine, seq_ids) -> pd.DataFrame:
    """Per sequence: Σℓ, Σ log μ, Σ log π and the token count."""
    frame = pd.DataFrame(
        {
            "seq": np.asarray(seq_ids),
            "ratio": log_ratio(logp_trainer, logp_engine),
            "logp_engine": np.asarray(logp_engine, dtype=np.float64),
            "logp_trainer": np.asarray(logp_trainer, dtype=np.float64),
        }
    )
    # (not `engine=`: that keyword is groupby.agg's own)
    return frame.groupby("seq", sort=True).agg(
        ratio=("ratio", "sum"),
        logp_engine=("logp_engine", "sum"),
        logp_trainer=("logp_trainer", "sum"),
        length=("ratio", "size"),
    )


def seq_kl(logp_trainer, logp_engine, seq_ids) -> float:
    """Mean over sequences of Σ(−ℓ): the sequence-level KL[μ‖π] estimate."""
    return float(np.mean(-_per_sequence(logp_trainer, logp_engine, seq_ids)["ratio"]))


def seq_slope_per_1k(logp_trainer, logp_engine, seq_ids) -> float:
    """Least-squares slope of Σℓ against response length, per 1000 tokens (NaN if lengths are equal)."""
    seqs = _per_sequence(logp_trainer, logp_engine, seq_ids)
    length = seqs["length"].to_numpy(dtype=np.float64)
    if len(seqs) < 2 or np.all(length == length[0]):
        return float("nan")
    centred = length - length.mean()
    return float(1000 * np.sum(centred * (seqs["ratio"] - seqs["ratio"].mean())) / np.sum(centred**2))


def log_ppl_diff(logp_trainer, logp_engine, seq_ids) -> float:
    """Mean over sequences of (mean log μ − mean log π): log perplexity under π minus under μ."""
    seqs = _per_sequence(logp_trainer, logp_engine, seq_ids)
    return float(np.mean((seqs["logp_engine"] - seqs["logp_trainer"]) / seqs["length"]))


BOOTSTRAP_DRAWS = 1000


def bootstrap_mean_ci(
    values, clusters, *, n_boot: int = BOOTSTRAP_DRAWS, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the token-pooled mean of `values`, resampling whole clusters (the
    independent units: prompts, whose samples are correlated, or sequences)."""
    frame = pd.DataFrame({"seq": np.asarray(clusters), "v": np.asarray(values, dtype=np.float64)})
    per_cluster = frame.groupby("seq").agg(total=("v", "sum"), count=("v", "size"))
    return bootstrap_totals_ci(
        per_cluster["total"].to_numpy(),
        per_cluster["count"].to_numpy(dtype=np.float64),
        n_boot=n_boot,
        seed=seed,
        level=level,
    )


BOOTSTRAP_MAX_CLUSTERS = 20_000  # beyond: the normal interval (the bootstrap would cost clusters × draws)
_BLOCK = 50  # draws held at once


def bootstrap_totals_ci(
    totals, counts, *, n_boot: int = BOOTSTRAP_DRAWS, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """`bootstrap_mean_ci` from each cluster's sum and token count, in cluster order. With more than
    BOOTSTRAP_MAX_CLUSTERS clusters (a long training run) the ratio estimator's normal interval,
    which the bootstrap approaches there."""
    totals = np.asarray(totals, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    tail = (1 - level) / 2
    if len(totals) > BOOTSTRAP_MAX_CLUSTERS:
        mean = totals.sum() / counts.sum()
        se = np.sqrt(np.sum((totals - mean * counts) ** 2) * len(totals) / (len(totals) - 1)) / counts.sum()
        z = NormalDist().inv_cdf(1 - tail)
        return float(mean - z * se), float(mean + z * se)
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_boot, _BLOCK):  # memory: _BLOCK × clusters, not n_boot × clusters
        draws = rng.multinomial(
            len(totals), np.full(len(totals), 1 / len(totals)), size=min(_BLOCK, n_boot - start)
        ).astype(np.float64)
        blocks.append((draws @ totals) / (draws @ counts))
    means = np.concatenate(blocks)
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


NUCLEUS_METRICS = ("n_outside_nucleus", "mean_kept_mass", "nucleus_log_bias")
_TOKEN_SUMS = ("neg_ratio", "half_sq", "k3", "exp2", "abs_dp", "outside_2", "kept_mass", "neg_log_kept")


class PairCounts(TypedDict):
    """What was measured of a pair, and what the trainer's nucleus did (NUCLEUS_METRICS)."""

    n_tokens: int
    n_seqs: int
    n_nonfinite: int
    n_outside_nucleus: int
    mean_kept_mass: float
    nucleus_log_bias: float


class PairEstimates(TypedDict):
    """METRICS, then the INTERVALS of CI_METRICS (all NaN when no token was measurable)."""

    k1: float
    k2: float
    k3: float
    chi2_token: float
    mean_abs_dp: float
    max_abs_dp: float
    min_ratio: float
    max_ratio: float
    frac_outside_2: float
    seq_kl: float
    seq_slope_per_1k: float
    log_ppl_diff: float
    k3_ci_low: float
    k3_ci_high: float
    mean_abs_dp_ci_low: float
    mean_abs_dp_ci_high: float


class PairMetrics(PairCounts, PairEstimates):
    """Every number of one (engine dtype, trainer dtype) pair: `pair_metrics`, `PairStats.result`."""


class PairRow(PairMetrics):
    """One row of summary.json's `pairs` (and metrics.csv): the pair's dtypes, then its `PairMetrics`.
    Read back from summary.json, a NaN metric is None."""

    engine_dtype: str
    trainer_dtype: str


_NAN = float("nan")
_UNMEASURED: PairEstimates = {
    "k1": _NAN,
    "k2": _NAN,
    "k3": _NAN,
    "chi2_token": _NAN,
    "mean_abs_dp": _NAN,
    "max_abs_dp": _NAN,
    "min_ratio": _NAN,
    "max_ratio": _NAN,
    "frac_outside_2": _NAN,
    "seq_kl": _NAN,
    "seq_slope_per_1k": _NAN,
    "log_ppl_diff": _NAN,
    "k3_ci_low": _NAN,
    "k3_ci_high": _NAN,
    "mean_abs_dp_ci_low": _NAN,
    "mean_abs_dp_ci_high": _NAN,
}


class PairStats:
    """`pair_metrics` fed chunk by chunk: memory holds running sums and one (sum, count) per cluster
    for the intervals, never the tokens, so a dump of any number of steps streams through.

    Each chunk must hold whole sequences, and a cluster (prompt) must not span chunks.
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self.n_nonfinite = 0
        self.n_outside = 0
        self.n_seqs = 0
        self.sums = dict.fromkeys(_TOKEN_SUMS, 0.0)
        self.max_abs_dp = -np.inf
        self.min_ratio = np.inf  # min and max of ℓ (the ratios are their exp)
        self.max_ratio = -np.inf
        self.seq_sums = dict.fromkeys(("x", "y", "xy", "xx", "log_ppl"), 0.0)  # x: length, y: Σℓ per sequence
        self.lengths: set[float] = set()
        self.clusters: list[pd.DataFrame] = []

    def add(
        self, logp_trainer, logp_engine, seq_ids, clusters=None, *, logp_trainer_full=None, log_kept_mass=None
    ) -> None:
        """Token rows of whole sequences; `clusters` are the units the intervals resample (default: sequences)."""
        trainer = np.asarray(logp_trainer, dtype=np.float64)
        engine = np.asarray(logp_engine, dtype=np.float64)
        seqs = np.asarray(seq_ids)
        full = trainer if logp_trainer_full is None else np.asarray(logp_trainer_full, dtype=np.float64)
        kept = np.zeros_like(trainer) if log_kept_mass is None else np.asarray(log_kept_mass, dtype=np.float64)
        units = seqs if clusters is None else np.asarray(clusters)
        valid = np.isfinite(full) & np.isfinite(engine)
        finite = valid & np.isfinite(trainer)
        self.n_nonfinite += int((~valid).sum())
        self.n_outside += int((valid & ~np.isfinite(trainer)).sum())
        trainer = trainer[finite]
        engine = engine[finite]
        seqs = seqs[finite]
        units = units[finite]
        kept = kept[finite]
        if not len(trainer):
            return
        ratio = log_ratio(trainer, engine)
        k3_values = k3_terms(trainer, engine)
        dp = abs_dp(trainer, engine)
        self.n_tokens += len(ratio)
        for name, values in (
            ("neg_ratio", -ratio),
            ("half_sq", ratio**2 / 2),
            ("k3", k3_values),
            ("exp2", np.exp(2 * ratio)),
            ("abs_dp", dp),
            ("outside_2", np.abs(ratio) > np.log(2)),
            ("kept_mass", np.exp(kept)),
            ("neg_log_kept", -kept),
        ):
            self.sums[name] += float(np.sum(values))
        self.max_abs_dp = max(self.max_abs_dp, dp.max())
        self.min_ratio = min(self.min_ratio, ratio.min())
        self.max_ratio = max(self.max_ratio, ratio.max())
        per_seq = (
            pd.DataFrame({"seq": seqs, "ratio": ratio, "diff": engine - trainer})
            .groupby("seq", sort=True)
            .agg(y=("ratio", "sum"), diff=("diff", "sum"), x=("ratio", "size"))
        )
        x = per_seq["x"].to_numpy(dtype=np.float64)
        y = per_seq["y"].to_numpy()
        self.n_seqs += len(per_seq)
        self.lengths.update(np.unique(x).tolist())
        for name, values in (
            ("x", x),
            ("y", y),
            ("xy", x * y),
            ("xx", x * x),
            ("log_ppl", per_seq["diff"].to_numpy() / x),
        ):
            self.seq_sums[name] += float(np.sum(values))
        self.clusters.append(
            pd.DataFrame({"cluster": units, "k3": k3_values, "mean_abs_dp": dp})
            .groupby("cluster", sort=True)
            .agg(k3=("k3", "sum"), mean_abs_dp=("mean_abs_dp", "sum"), count=("k3", "size"))
        )
        if len(self.clusters) >= 64:  # one frame instead of many small ones: a long run stays small
            self.clusters = [self._cluster_sums()]

    def merge(self, other: PairStats) -> None:
        """Take in the chunks `other` was fed, as if they had been added here (a step's own
        statistics join the run's without the tokens being summed twice)."""
        self.n_tokens += other.n_tokens
        self.n_nonfinite += other.n_nonfinite
        self.n_outside += other.n_outside
        self.n_seqs += other.n_seqs
        for mine, theirs in ((self.sums, other.sums), (self.seq_sums, other.seq_sums)):
            for name, value in theirs.items():
                mine[name] += value
        self.max_abs_dp = max(self.max_abs_dp, other.max_abs_dp)
        self.min_ratio = min(self.min_ratio, other.min_ratio)
        self.max_ratio = max(self.max_ratio, other.max_ratio)
        self.lengths |= other.lengths
        self.clusters += other.clusters
        if len(self.clusters) >= 64:
            self.clusters = [self._cluster_sums()]

    def _cluster_sums(self) -> pd.DataFrame:
        return pd.concat(self.clusters).groupby(level=0, sort=True).sum()

    def result(self, seed: int = 0) -> PairMetrics:
        n = self.n_tokens
        counts: PairCounts = {
            "n_tokens": n,
            "n_seqs": self.n_seqs,
            "n_nonfinite": self.n_nonfinite,
            "n_outside_nucleus": self.n_outside,
            "mean_kept_mass": self.sums["kept_mass"] / n if n else _NAN,
            "nucleus_log_bias": self.sums["neg_log_kept"] / n if n else _NAN,
        }
        if not n:
            return {**counts, **_UNMEASURED}
        s = self.sums
        q = self.seq_sums
        centred_xx = q["xx"] - q["x"] ** 2 / self.n_seqs
        clusters = self._cluster_sums()
        sizes = clusters["count"].to_numpy(dtype=np.float64)
        k3_low, k3_high = bootstrap_totals_ci(clusters["k3"].to_numpy(), sizes, seed=seed)
        dp_low, dp_high = bootstrap_totals_ci(clusters["mean_abs_dp"].to_numpy(), sizes, seed=seed)
        return {
            **counts,
            "k1": s["neg_ratio"] / n,
            "k2": s["half_sq"] / n,
            "k3": s["k3"] / n,
            "chi2_token": s["exp2"] / n - 1,
            "mean_abs_dp": s["abs_dp"] / n,
            "max_abs_dp": float(self.max_abs_dp),
            "min_ratio": float(np.exp(self.min_ratio)),
            "max_ratio": float(np.exp(self.max_ratio)),
            "frac_outside_2": s["outside_2"] / n,
            "seq_kl": -q["y"] / self.n_seqs,
            "seq_slope_per_1k": _NAN
            if len(self.lengths) < 2
            else 1000 * (q["xy"] - q["x"] * q["y"] / self.n_seqs) / centred_xx,
            "log_ppl_diff": q["log_ppl"] / self.n_seqs,
            "k3_ci_low": k3_low,
            "k3_ci_high": k3_high,
            "mean_abs_dp_ci_low": dp_low,
            "mean_abs_dp_ci_high": dp_high,
        }


def pair_metrics(
    logp_trainer,
    logp_engine,
    seq_ids,
    *,
    seed: int = 0,
    prompt_ids=None,
    logp_trainer_full=None,
    log_kept_mass=None,
) -> PairMetrics:
    """Every metric for one (engine dtype, trainer dtype) pair, over its measurable tokens.

    `logp_trainer` is log π under the trainer's nucleus. A token the engine sampled outside that
    nucleus (−inf there, finite under the full distribution `logp_trainer_full`) is counted in
    `n_outside_nucleus` and left out; `n_nonfinite` counts only non-finite engine or full trainer
    log-probs (overflow). `mean_kept_mass` is the mean probability S the nucleus keeps and
    `nucleus_log_bias` = mean(−log S), what renormalising to the nucleus adds to ℓ. Intervals
    resample prompts (with all their samples) when `prompt_ids` is given, else sequences.
    The token-level functions above are the definitions; `PairStats` sums them.
    """
    stats = PairStats()
    stats.add(
        logp_trainer,
        logp_engine,
        seq_ids,
        prompt_ids,
        logp_trainer_full=logp_trainer_full,
        log_kept_mass=log_kept_mass,
    )
    return stats.result(seed)
