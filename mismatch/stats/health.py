"""This run's gap under each framework's own metric name, judged by the threshold its docs give.

Each check computes the framework's metric from (log π, log μ, sequence) of the measured tokens
exactly as the framework's code at a named release computes it (`version`: tag and commit), and
compares it with the documented threshold, the source cited. The reduction is the framework's:
pooled over tokens, or (slime's default) a mean per sample, then over samples. Where an older
release still in use would show a different number, its definition is a separate check, labelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from mismatch.stats import metrics
from mismatch.stats.corrections import SAFETY_BOUND

# The releases read (tag and commit); verl's repository is now verl-project/verl.
VERL = "verl v0.9.0 (483b8a009ba3)"
VERL_08 = f"{VERL}; the same since v0.8.0 (7aed6b230776)"  # weights truncated before their statistics (verl #5722)
VERL_07 = "verl v0.6.1 (d62da4950573) to v0.7.1 (bec9ef74768d)"  # read at both; v0.7.0 (f9c855f7cf04) the same
NEMO_RL = "NeMo-RL v0.7.0 (81aa43dda476)"
PRIME_RL = "prime-rl v0.8.0 (60bc29547a88)"
SLIME = "slime v0.3.1 (a6272da0d4f3)"
TRL = "TRL v1.9.0 (35def3ee000a); the same in v1.16.0 (installed here)"
VERL_TIS_CAP = 2.0  # rollout_is_threshold's default: the checks read verl's metrics of rollout_is=token at 2.0


@dataclass(frozen=True)
class Tokens:
    """The finite tokens of one pair (or one step): log π, log μ, and each token's sequence numbered 0…n−1."""

    pi: np.ndarray
    mu: np.ndarray
    seq: np.ndarray
    n_seqs: int

    @property
    def log_ratio(self) -> np.ndarray:
        """ℓ = log π − log μ."""
        return self.pi - self.mu

    def per_sample_mean(self, values: np.ndarray) -> float:
        """Each sequence's mean, then the mean over sequences (slime's default `sum_of_sample_mean`)."""
        sums = np.bincount(self.seq, weights=values, minlength=self.n_seqs)
        counts = np.bincount(self.seq, minlength=self.n_seqs)
        return float(np.mean(sums / counts))


@dataclass(frozen=True, kw_only=True)
class Check:
    framework: str
    metric: str
    definition: str
    compute: Callable[[Tokens], float]
    passes: Callable[[float], bool]
    threshold: str
    source: str
    version: str  # the release whose code `compute` transcribes: tag and commit
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
    version: str


class HealthRow(CheckResult):
    """One row of summary.json's `health`: a check on a pair, at its worst step (a scan has one step)."""

    pair: str
    steps: int
    steps_flagged: int


def _masked_mean(values: np.ndarray) -> float:
    """verl's `masked_mean` and NeMo-RL's over all tokens: Σx / (n + 1e-8)."""
    return float(values.sum() / (len(values) + 1e-8))


def _verl_raw_weights(t: Tokens) -> np.ndarray:
    """verl's token IS weights before truncation: exp(ℓ), ℓ clamped to ±SAFETY_BOUND (rollout_corr_helper.py)."""
    return np.exp(np.clip(t.log_ratio, -SAFETY_BOUND, SAFETY_BOUND))


def _verl_weights(t: Tokens) -> np.ndarray:
    """The weights verl ≥ v0.8.0 reports on: truncated to ≤ rollout_is_threshold, i.e. within [0, 2]."""
    return np.minimum(_verl_raw_weights(t), VERL_TIS_CAP)


def _verl_std(weights: np.ndarray) -> float:
    """`rollout_is_std`: sqrt(max(mean(w²) − mean(w)², 0)), 0 for a single token."""
    if len(weights) <= 1:
        return 0.0
    return float(np.sqrt(max(_masked_mean(weights**2) - _masked_mean(weights) ** 2, 0.0)))


def _verl_ess(weights: np.ndarray) -> float:
    """`rollout_is_eff_sample_size`: 1 / mean(w_n²), w_n = w / (mean(w) + 1e-8)."""
    normalized = weights / (_masked_mean(weights) + 1e-8)
    return float(1 / _masked_mean(normalized**2))


def _clamped_07(t: Tokens) -> np.ndarray:
    """verl v0.7.x's weights for std and ESS: exp(ℓ) clamped to [1/threshold, threshold] = [1/2, 2]."""
    return np.clip(_verl_raw_weights(t), 1 / VERL_TIS_CAP, VERL_TIS_CAP)


_VERL_HEALTH = "docs/algo/rollout_corr.md, check_rollout_correction_health"
_VERL_IS = (
    f"{_VERL_HEALTH}; verl/trainer/ppo/rollout_corr_helper.py compute_is_metrics (rollout_is=token, threshold 2.0)"
)
_SLIME = (
    "slime/backends/megatron_utils/loss.py policy_loss_function, cp_utils.py get_sum_of_sample_mean and "
    "reduce_train_step_metrics; the --ci-test gate ≤ 0.1 in model.py train_one_step"
)
_SLIME_POOLED = "train/train_rollout_logprob_abs_diff (--calculate-per-token-loss)"
_ROLLOUT_IS_MEAN = "rollout_corr/rollout_is_mean"
_ROLLOUT_IS_STD = "rollout_corr/rollout_is_std"
_ROLLOUT_IS_ESS = "rollout_corr/rollout_is_eff_sample_size"

CHECKS = (
    Check(
        framework="verl",
        metric="training/rollout_probs_diff_mean",
        definition="mean |exp(log π) − exp(log μ)| over tokens",
        compute=lambda t: float(np.mean(np.abs(np.exp(t.pi) - np.exp(t.mu)))),
        passes=lambda v: v <= 0.005,
        threshold="≤ 0.005 (> 0.01: an inference-engine precision issue)",
        source="docs/faq/faq.rst, 'Missmatch between inference and training sequence'; "
        "verl/utils/debug/metrics.py calculate_debug_metrics",
        version=VERL,
        warn=lambda v: v <= 0.01,
    ),
    Check(
        framework="verl",
        metric="rollout_corr/kl",
        definition="mean(log μ − log π) over tokens",
        compute=lambda t: _masked_mean(t.mu - t.pi),
        passes=lambda v: abs(v) <= 0.1,
        threshold="|kl| ≤ 0.1",
        source=f"{_VERL_HEALTH}; verl/trainer/ppo/rollout_corr_helper.py compute_offpolicy_metrics",
        version=VERL,
        badness=abs,
    ),
    Check(
        framework="verl",
        metric="rollout_corr/chi2_token",
        definition="mean(exp(2ℓ)) − 1 over tokens, ℓ clamped to ±20",
        compute=lambda t: _masked_mean(_verl_raw_weights(t) ** 2) - 1,
        passes=lambda v: v <= 1.0,
        threshold="≤ 1.0",
        source=f"{_VERL_HEALTH}; verl/trainer/ppo/rollout_corr_helper.py compute_offpolicy_metrics",
        version=VERL,
    ),
    Check(
        framework="verl",
        metric=_ROLLOUT_IS_MEAN,
        definition="mean of the truncated token weights w = min(exp(ℓ), 2)",
        compute=lambda t: _masked_mean(_verl_weights(t)),
        passes=lambda v: 0.5 <= v <= 2.0,
        threshold="within [0.5, 2.0]",
        source=_VERL_IS,
        version=VERL_08,
        badness=lambda v: abs(np.log(v)),
    ),
    Check(
        framework="verl",
        metric=_ROLLOUT_IS_STD,
        definition="std of the truncated token weights w = min(exp(ℓ), 2)",
        compute=lambda t: _verl_std(_verl_weights(t)),
        passes=lambda v: v <= 1.0,
        threshold="≤ 1.0",
        source=_VERL_IS,
        version=VERL_08,
    ),
    Check(
        framework="verl",
        metric=_ROLLOUT_IS_ESS,
        definition="1 / mean(w_n²), w = min(exp(ℓ), 2), w_n = w / mean(w)",
        compute=lambda t: _verl_ess(_verl_weights(t)),
        passes=lambda v: v >= 0.3,
        threshold="≥ 0.3",
        source=_VERL_IS,
        version=VERL_08,
        badness=lambda v: -v,
    ),
    Check(
        framework="verl",
        metric=f"{_ROLLOUT_IS_MEAN} (v0.7.x)",
        definition="mean of the token weights exp(ℓ) before truncation",
        compute=lambda t: _masked_mean(_verl_raw_weights(t)),
        passes=lambda v: 0.5 <= v <= 2.0,
        threshold="within [0.5, 2.0]",
        source=_VERL_IS,
        version=VERL_07,
        badness=lambda v: abs(np.log(v)),
    ),
    Check(
        framework="verl",
        metric=f"{_ROLLOUT_IS_STD} (v0.7.x)",
        definition="std of the token weights exp(ℓ) clamped to [1/2, 2]",
        compute=lambda t: _verl_std(_clamped_07(t)),
        passes=lambda v: v <= 1.0,
        threshold="≤ 1.0",
        source=_VERL_IS,
        version=VERL_07,
    ),
    Check(
        framework="verl",
        metric=f"{_ROLLOUT_IS_ESS} (v0.7.x)",
        definition="1 / mean(w_n²), w = exp(ℓ) clamped to [1/2, 2], w_n = w / mean(w)",
        compute=lambda t: _verl_ess(_clamped_07(t)),
        passes=lambda v: v >= 0.3,
        threshold="≥ 0.3",
        source=_VERL_IS,
        version=VERL_07,
        badness=lambda v: -v,
    ),
    Check(
        framework="NeMo-RL",
        metric="train/token_mult_prob_error",
        definition="mean exp(|ℓ|) over tokens",
        compute=lambda t: _masked_mean(np.exp(np.abs(t.log_ratio))),
        passes=lambda v: v <= 1.05,
        threshold="≤ 1.05 (1.0 = perfect match)",
        source="docs/adding-new-models.md, 'Expected Error Threshold'; "
        "nemo_rl/algorithms/loss/loss_functions.py ClippedPGLossFn",
        version=NEMO_RL,
    ),
    Check(
        framework="NeMo-RL",
        metric="train/gen_kl_error",
        definition="mean(exp(ℓ) − 1 − ℓ) over tokens (k3, unclamped)",
        compute=lambda t: _masked_mean(metrics.k3_terms(t.pi, t.mu)),
        passes=lambda v: v <= 1e-3,
        threshold="≤ 1e-3",
        source="docs/guides/grpo.md, 'KL Divergence Error'; nemo_rl/algorithms/loss/loss_functions.py, "
        "nemo_rl/algorithms/utils.py calculate_kl",
        version=NEMO_RL,
    ),
    Check(
        framework="prime-rl",
        metric="mismatch_kl/all/mean",
        definition="mean(exp(ℓ) − ℓ − 1) over tokens",
        compute=lambda t: metrics.k3(t.pi, t.mu),
        passes=lambda v: v < 0.01,
        threshold="< 0.01",
        source="src/prime_rl/trainer/model.py ('target <0.01'), tests/integration/test_reverse_text.py; "
        "src/prime_rl/trainer/rl/loss.py compute_importance_ratio_and_mismatch_kl",
        version=PRIME_RL,
    ),
    Check(
        framework="slime",
        metric="train/train_rollout_logprob_abs_diff",
        definition="mean over samples of each sample's mean |log π − log μ| (slime's default reduction, "
        "a sequence being one rollout)",
        compute=lambda t: t.per_sample_mean(np.abs(t.log_ratio)),
        passes=lambda v: v <= 0.1,
        threshold="≤ 0.1 (--ci-test gate)",
        source=_SLIME,
        version=SLIME,
    ),
    Check(
        framework="slime",
        metric=_SLIME_POOLED,
        definition="mean |log π − log μ| over all tokens (with --calculate-per-token-loss)",
        compute=lambda t: float(np.mean(np.abs(t.log_ratio))),
        passes=lambda v: v <= 0.1,
        threshold="≤ 0.1 (--ci-test gate)",
        source=_SLIME,
        version=SLIME,
    ),
    Check(
        framework="TRL",
        metric="sampling/sampling_logp_difference/max",
        definition="max |log π − log μ| over tokens",
        compute=lambda t: float(np.max(np.abs(t.log_ratio))),
        passes=lambda v: v <= np.log(3.0),
        threshold="≤ log 3 (no token alone exceeds the default clip 3.0)",
        source="GRPOConfig vllm_importance_sampling_clip_max 3.0 (trl/trainer/grpo_config.py), the metric in "
        "trl/trainer/grpo_trainer.py; TRL documents no threshold for this metric",
        version=TRL,
    ),
)


def status(check: Check, value: float) -> str:
    if not np.isfinite(value):
        return "not_measured"
    if check.passes(value):
        return "ok"
    return "warn" if check.warn is not None and check.warn(value) else "fail"


def worst(check_name: str, values: list[float]) -> float:
    """The value, of several steps', furthest on the unhealthy side of the check named (its metric)."""
    check = next(c for c in CHECKS if c.metric == check_name)
    return max((v for v in values if np.isfinite(v)), key=check.badness, default=float("nan"))


def evaluate(logp_trainer, logp_engine, seq_ids) -> list[CheckResult]:
    """Every check on the finite tokens of one pair (or one step); `seq_ids` names each token's sequence
    (a framework's sample), for the checks that average per sample."""
    pi = np.asarray(logp_trainer, dtype=np.float64)
    mu = np.asarray(logp_engine, dtype=np.float64)
    finite = np.isfinite(pi) & np.isfinite(mu)
    _, seq = np.unique(np.asarray(seq_ids)[finite], return_inverse=True)
    tokens = Tokens(pi=pi[finite], mu=mu[finite], seq=seq.reshape(-1), n_seqs=int(seq.max()) + 1 if len(seq) else 0)
    rows: list[CheckResult] = []
    for check in CHECKS:
        value = check.compute(tokens) if tokens.n_seqs else float("nan")
        rows.append(
            {
                "framework": check.framework,
                "metric": check.metric,
                "definition": check.definition,
                "value": value,
                "threshold": check.threshold,
                "status": status(check, value),
                "source": check.source,
                "version": check.version,
            }
        )
    return rows
