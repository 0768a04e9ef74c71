"""This run's gap under each framework's own metric name, judged by the threshold its docs give.

Each check computes the framework's metric from (ℓ, π, μ) of the measured tokens exactly as the
framework defines it, and compares it with the documented threshold, the source cited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from mismatch.stats import metrics
from mismatch.stats.corrections import SAFETY_BOUND


@dataclass(frozen=True, kw_only=True)
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


class CheckResult(TypedDict):
    """One check on one pair (or one step): the framework's metric, its value and status."""

    framework: str
    metric: str
    definition: str
    value: float
    threshold: str
    status: str  # ok | warn | fail | not_measured
    source: str


class HealthRow(CheckResult):
    """One row of summary.json's `health`: a check on a pair, at its worst step (a scan has one step)."""

    pair: str
    steps: int
    steps_flagged: int


def _log_ratio(pi, mu) -> np.ndarray:
    """ℓ clamped to ±SAFETY_BOUND, as verl clamps it before exponentiating."""
    return np.clip(metrics.log_ratio(pi, mu), -SAFETY_BOUND, SAFETY_BOUND)


def _verl_is_weights(pi, mu, cap: float = 2.0) -> np.ndarray:
    """verl's token IS weights clamped to [1/T, T] before its std and ESS (rollout_corr_helper.py)."""
    return np.clip(np.exp(_log_ratio(pi, mu)), 1 / cap, cap)


def _verl_ess(pi, mu) -> float:
    w = _verl_is_weights(pi, mu)
    w = w / (w.mean() + 1e-8)
    return float(1 / np.mean(w**2))


_VERL_HEALTH = "verl docs/algo/rollout_corr.md, check_rollout_correction_health"

CHECKS = (
    Check(
        framework="verl",
        metric="training/rollout_probs_diff_mean",
        definition="mean |exp(log π) − exp(log μ)|",
        compute=metrics.mean_abs_dp,
        passes=lambda v: v <= 0.005,
        threshold="≤ 0.005 (> 0.01: an inference-engine precision issue)",
        source="verl docs/faq/faq.rst, 'Missmatch between inference and training sequence'",
        warn=lambda v: v <= 0.01,
    ),
    Check(
        framework="verl",
        metric="rollout_corr/kl",
        definition="mean(log μ − log π)",
        compute=metrics.k1,
        passes=lambda v: abs(v) <= 0.1,
        threshold="|kl| ≤ 0.1",
        source=_VERL_HEALTH,
        badness=abs,
    ),
    Check(
        framework="verl",
        metric="rollout_corr/chi2_token",
        definition="mean(exp(2ℓ)) − 1, ℓ clamped to ±20",
        compute=lambda pi, mu: float(np.mean(np.exp(2 * _log_ratio(pi, mu))) - 1),
        passes=lambda v: v <= 1.0,
        threshold="≤ 1.0",
        source=_VERL_HEALTH,
    ),
    Check(
        framework="verl",
        metric="rollout_corr/rollout_is_mean",
        definition="mean of token weights exp(ℓ) (before truncation)",
        compute=lambda pi, mu: float(np.mean(np.exp(_log_ratio(pi, mu)))),
        passes=lambda v: 0.5 <= v <= 2.0,
        threshold="within [0.5, 2.0]",
        source=_VERL_HEALTH,
        badness=lambda v: abs(np.log(v)),
    ),
    Check(
        framework="verl",
        metric="rollout_corr/rollout_is_std",
        definition="std of token weights clamped to [1/2, 2]",
        compute=lambda pi, mu: float(np.std(_verl_is_weights(pi, mu))),
        passes=lambda v: v <= 1.0,
        threshold="≤ 1.0",
        source=_VERL_HEALTH,
    ),
    Check(
        framework="verl",
        metric="rollout_corr/rollout_is_eff_sample_size",
        definition="1 / mean(w_n²), w clamped to [1/2, 2] and divided by its mean",
        compute=_verl_ess,
        passes=lambda v: v >= 0.3,
        threshold="≥ 0.3",
        source=f"{_VERL_HEALTH}; verl/trainer/ppo/rollout_corr_helper.py",
        badness=lambda v: -v,
    ),
    Check(
        framework="NeMo-RL",
        metric="train/token_mult_prob_error",
        definition="mean exp(|ℓ|)",
        compute=lambda pi, mu: float(np.mean(np.exp(np.abs(metrics.log_ratio(pi, mu))))),
        passes=lambda v: v <= 1.05,
        threshold="≤ 1.05 (1.0 = perfect match)",
        source="NeMo-RL docs/adding-new-models.md, 'Expected Error Threshold'",
    ),
    Check(
        framework="NeMo-RL",
        metric="train/gen_kl_error",
        definition="mean(exp(ℓ) − 1 − ℓ) (k3)",
        compute=metrics.k3,
        passes=lambda v: v <= 1e-3,
        threshold="≤ 1e-3",
        source="NeMo-RL docs/guides/grpo.md, 'KL Divergence Error'",
    ),
    Check(
        framework="prime-rl",
        metric="mismatch_kl/all/mean",
        definition="mean(exp(ℓ) − ℓ − 1)",
        compute=metrics.k3,
        passes=lambda v: v < 0.01,
        threshold="< 0.01",
        source="prime-rl src/prime_rl/trainer/model.py ('target <0.01'); tests/integration/test_reverse_text.py",
    ),
    Check(
        framework="slime",
        metric="train/train_rollout_logprob_abs_diff",
        definition="mean |log π − log μ|",
        compute=lambda pi, mu: float(np.mean(np.abs(metrics.log_ratio(pi, mu)))),
        passes=lambda v: v <= 0.1,
        threshold="≤ 0.1 (--ci-test gate)",
        source="slime --ci-train-rollout-logprob-abs-diff-threshold default "
        "(slime/utils/arguments.py, backends/megatron_utils/model.py)",
    ),
    Check(
        framework="TRL",
        metric="sampling/sampling_logp_difference/max",
        definition="max |log π − log μ|",
        compute=lambda pi, mu: float(np.max(np.abs(metrics.log_ratio(pi, mu)))),
        passes=lambda v: v <= np.log(3.0),
        threshold="≤ log 3 (no token alone exceeds the default clip 3.0)",
        source="TRL GRPOConfig vllm_importance_sampling_clip_max 3.0 (trl/trainer/grpo_config.py); "
        "TRL documents no threshold for this metric",
    ),
)


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


def evaluate(logp_trainer, logp_engine) -> list[CheckResult]:
    """Every check on the finite tokens of one pair (or one step)."""
    pi = np.asarray(logp_trainer, dtype=np.float64)
    mu = np.asarray(logp_engine, dtype=np.float64)
    finite = np.isfinite(pi) & np.isfinite(mu)
    pi = pi[finite]
    mu = mu[finite]
    rows: list[CheckResult] = []
    for check in CHECKS:
        value = check.compute(pi, mu) if len(pi) else float("nan")
        rows.append(
            {
                "framework": check.framework,
                "metric": check.metric,
                "definition": check.definition,
                "value": value,
                "threshold": check.threshold,
                "status": status(check, value),
                "source": check.source,
            }
        )
    return rows
