"""Mismatch metrics: pure functions of trainer and engine log-probabilities of sampled tokens.

With ℓ = log π − log μ for response tokens sampled from μ (engine) and scored by π (trainer),
pooled over tokens unless a name says "seq". These are Monte-Carlo estimators under μ:
k1, k2, k3 estimate KL[μ‖π] (k3 is unbiased and never negative: Schulman's "approximating KL");
`chi2_token` estimates χ²(π‖μ) = E_μ[(π/μ)²] − 1, which governs importance-weight variance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CI_METRICS = ("k3", "mean_abs_dp")
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
    return np.abs(np.exp(np.asarray(logp_trainer, dtype=np.float64)) - np.exp(np.asarray(logp_engine, dtype=np.float64)))


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
        ratio=("ratio", "sum"), logp_engine=("logp_engine", "sum"), logp_trainer=("logp_trainer", "sum"), length=("ratio", "size")
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


def bootstrap_mean_ci(values, clusters, n_boot: int = BOOTSTRAP_DRAWS, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the token-pooled mean of `values`, resampling whole clusters (the
    independent units: prompts, whose samples are correlated, or sequences)."""
    frame = pd.DataFrame({"seq": np.asarray(clusters), "v": np.asarray(values, dtype=np.float64)})
    per_seq = frame.groupby("seq").agg(total=("v", "sum"), count=("v", "size"))
    totals, counts = per_seq["total"].to_numpy(), per_seq["count"].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(totals), np.full(len(totals), 1 / len(totals)), size=n_boot)
    means = (draws @ totals) / (draws @ counts)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


NUCLEUS_METRICS = ("n_outside_nucleus", "mean_kept_mass", "nucleus_log_bias")


def pair_metrics(logp_trainer, logp_engine, seq_ids, seed: int = 0, prompt_ids=None, logp_trainer_full=None, log_kept_mass=None) -> dict[str, float | int]:
    """Every metric for one (engine dtype, trainer dtype) pair, over its measurable tokens.

    `logp_trainer` is log π under the trainer's nucleus. A token the engine sampled outside that
    nucleus (−inf there, finite under the full distribution `logp_trainer_full`) is counted in
    `n_outside_nucleus` and left out; `n_nonfinite` counts only non-finite engine or full trainer
    log-probs (overflow). `mean_kept_mass` is the mean probability S the nucleus keeps and
    `nucleus_log_bias` = mean(−log S), what renormalising to the nucleus adds to ℓ. Intervals
    resample prompts (with all their samples) when `prompt_ids` is given, else sequences.
    """
    trainer, engine, seqs = np.asarray(logp_trainer, dtype=np.float64), np.asarray(logp_engine, dtype=np.float64), np.asarray(seq_ids)
    full = trainer if logp_trainer_full is None else np.asarray(logp_trainer_full, dtype=np.float64)
    kept = np.zeros_like(trainer) if log_kept_mass is None else np.asarray(log_kept_mass, dtype=np.float64)
    clusters = seqs if prompt_ids is None else np.asarray(prompt_ids)
    valid = np.isfinite(full) & np.isfinite(engine)
    finite = valid & np.isfinite(trainer)
    out: dict[str, float | int] = {
        "n_tokens": int(finite.sum()),
        "n_seqs": int(len(np.unique(seqs[finite]))),
        "n_nonfinite": int((~valid).sum()),
        "n_outside_nucleus": int((valid & ~np.isfinite(trainer)).sum()),
        "mean_kept_mass": float(np.mean(np.exp(kept[finite]))) if finite.any() else float("nan"),
        "nucleus_log_bias": float(np.mean(-kept[finite])) if finite.any() else float("nan"),
    }
    trainer, engine, seqs, clusters = trainer[finite], engine[finite], seqs[finite], clusters[finite]
    if not len(trainer):
        return out | {name: float("nan") for name in METRICS}
    token_level = (k1, k2, k3, chi2_token, mean_abs_dp, max_abs_dp, min_ratio, max_ratio, frac_outside_2)
    seq_level = (seq_kl, seq_slope_per_1k, log_ppl_diff)
    out |= {f.__name__: f(trainer, engine) for f in token_level}
    out |= {f.__name__: f(trainer, engine, seqs) for f in seq_level}
    for name, values in (("k3", k3_terms(trainer, engine)), ("mean_abs_dp", abs_dp(trainer, engine))):
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bootstrap_mean_ci(values, clusters, seed=seed)
    return out


def pair_table(tokens: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One row of metrics per (engine_dtype, trainer_dtype) in a `tokens.parquet` frame."""
    rows = []
    for (engine_dtype, trainer_dtype), group in tokens.groupby(["engine_dtype", "trainer_dtype"], sort=False):
        metrics = pair_metrics(
            group["logp_trainer"], group["logp_engine"], group["seq_id"], seed=seed,
            prompt_ids=group["prompt_index"], logp_trainer_full=group["logp_trainer_full"], log_kept_mass=group["log_kept_mass"],
        )  # fmt: skip
        rows.append({"engine_dtype": engine_dtype, "trainer_dtype": trainer_dtype} | metrics)
    return pd.DataFrame(rows)
