"""This run's gap under each framework's own metric name, judged by the threshold its docs give.

Each check computes the framework's metric from (ℓ, π, μ) of the measured tokens exactly as the
framework defines it, and compares it with the documented threshold, the source cited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mismatch.stats import metrics
from mismatch.stats.corrections import SAFETY_BOUND


@dataclass(frozen=True)
class Check:
    framework: str
    metric: str
    definition: str
    compute: Callable[[np.ndarray, np.ndarray], float]  # (log π, log μ) of finite tokens → value
    passes: Callable[[float], bool]
    threshold: str
    source: str
    warn: Callable[[float], bool] | None = None  # between pass and fail, where the docs give two levels
    badness: Callable[[float], float] = lambda v: v  # orders steps from best to worst (default: larger is worse)


def _verl_is_weights(pi, mu, cap: float = 2.0) -> np.ndarray:
    """verl's token IS weights clamped to [1/T, T] before its std and ESS (rollout_corr_helper.py)."""
    return np.clip(np.exp(np.clip(metrics.log_ratio(pi, mu), -SAFETY_BOUND, SAFETY_BOUND)), 1 / cap, cap)


def _verl_ess(pi, mu) -> float:
    w = _verl_is_weights(pi, mu)
    w = w / (w.mean() + 1e-8)
    return float(1 / np.mean(w**2))


CHECKS = (
    Check(
        "verl", "training/rollout_probs_diff_mean", "mean |exp(log π) − exp(log μ)|",
        metrics.mean_abs_dp, lambda v: v <= 0.005, "≤ 0.005 (> 0.01: an inference-engine precision issue)",
        "verl docs/faq/faq.rst, 'Missmatch between inference and training sequence'", warn=lambda v: v <= 0.01,
    ),
    Check(
        "verl", "rollout_corr/kl", "mean(log μ − log π)",
        metrics.k1, lambda v: abs(v) <= 0.1, "|kl| ≤ 0.1", "verl docs/algo/rollout_corr.md, check_rollout_correction_health",
        badness=abs,
    ),
    Check(
        "verl", "rollout_corr/chi2_token", "mean(exp(2ℓ)) − 1, ℓ clamped to ±20",
        lambda pi, mu: float(np.mean(np.exp(2 * np.clip(metrics.log_ratio(pi, mu), -SAFETY_BOUND, SAFETY_BOUND))) - 1), lambda v: v <= 1.0, "≤ 1.0",
        "verl docs/algo/rollout_corr.md, check_rollout_correction_health",
    ),
    Check(
        "verl", "rollout_corr/rollout_is_mean", "mean of token weights exp(ℓ) (before truncation)",
        lambda pi, mu: float(np.mean(np.exp(np.clip(metrics.log_ratio(pi, mu), -SAFETY_BOUND, SAFETY_BOUND)))), lambda v: 0.5 <= v <= 2.0, "within [0.5, 2.0]",
        "verl docs/algo/rollout_corr.md, check_rollout_correction_health", badness=lambda v: abs(np.log(v)),
    ),
    Check(
        "verl", "rollout_corr/rollout_is_std", "std of token weights clamped to [1/2, 2]",
        lambda pi, mu: float(np.std(_verl_is_weights(pi, mu))), lambda v: v <= 1.0, "≤ 1.0", "verl docs/algo/rollout_corr.md, check_rollout_correction_health",
    ),
    Check(
        "verl", "rollout_corr/rollout_is_eff_sample_size", "1 / mean(w_n²), w clamped to [1/2, 2] and divided by its mean",
        _verl_ess, lambda v: v >= 0.3, "≥ 0.3", "verl docs/algo/rollout_corr.md, check_rollout_correction_health; verl/trainer/ppo/rollout_corr_helper.py",
        badness=lambda v: -v,
    ),
    Check(
        "NeMo-RL", "train/token_mult_prob_error", "mean exp(|ℓ|)",
        lambda pi, mu: float(np.mean(np.exp(np.abs(metrics.log_ratio(pi, mu))))), lambda v: v <= 1.05, "≤ 1.05 (1.0 = perfect match)", "NeMo-RL docs/adding-new-models.md, 'Expected Error Threshold'",
    ),
    Check(
        "NeMo-RL", "train/gen_kl_error", "mean(exp(ℓ) − 1 − ℓ) (k3)",
        metrics.k3, lambda v: v <= 1e-3, "≤ 1e-3", "NeMo-RL docs/guides/grpo.md, 'KL Divergence Error'",
    ),
    Check(
        "prime-rl", "mismatch_kl/all/mean", "mean(exp(ℓ) − ℓ − 1)",
        metrics.k3, lambda v: v < 0.01, "< 0.01",
        "prime-rl src/prime_rl/trainer/model.py ('target <0.01'); tests/integration/test_reverse_text.py",
    ),
    Check(
        "slime", "train/train_rollout_logprob_abs_diff", "mean |log π − log μ|",
        lambda pi, mu: float(np.mean(np.abs(metrics.log_ratio(pi, mu)))), lambda v: v <= 0.1, "≤ 0.1 (--ci-test gate)",
        "slime --ci-train-rollout-logprob-abs-diff-threshold default (slime/utils/arguments.py, backends/megatron_utils/model.py)",
    ),
    Check(
        "TRL", "sampling/sampling_logp_difference/max", "max |log π − log μ|",
        lambda pi, mu: float(np.max(np.abs(metrics.log_ratio(pi, mu)))), lambda v: v <= np.log(3.0), "≤ log 3 (no token alone exceeds the default clip 3.0)",
        "TRL GRPOConfig vllm_importance_sampling_clip_max 3.0 (trl/trainer/grpo_config.py); TRL documents no threshold for this metric",
    ),
)  # fmt: skip


def status(check: Check, value: float) -> str:
    if not np.isfinite(value):
        return "not_measured"
    if check.passes(value):
        return "ok"
    return "warn" if check.warn is not None and check.warn(value) else "fail"


def worst(check_name: str, values: list[float]) -> float:
    """The value, of several steps', furthest on the unhealthy side of the check named."""
    check = next(c for c in CHECKS if c.metric == check_name)
    return max((v for v in values if np.isfinite(v)), key=check.badness, default=float("nan"))


def evaluate(logp_trainer, logp_engine) -> list[dict]:
    """Every check on the finite tokens of one pair (or one step)."""
    pi, mu = np.asarray(logp_trainer, dtype=np.float64), np.asarray(logp_engine, dtype=np.float64)
    finite = np.isfinite(pi) & np.isfinite(mu)
    pi, mu = pi[finite], mu[finite]
    rows = []
    for check in CHECKS:
        value = check.compute(pi, mu) if len(pi) else float("nan")
        rows.append({"framework": check.framework, "metric": check.metric, "definition": check.definition, "value": value,
                     "threshold": check.threshold, "status": status(check, value), "source": check.source})  # fmt: skip
    return rows
