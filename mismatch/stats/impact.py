"""The mismatch's bias in the policy gradient against the gradient's sampling noise, on one batch.

Units are prompt groups g = 1…n (B = n·G sequences). Per group and kind of coefficient the learner
takes a gradient x_g (`learner.impact`): u (the loss with its correction weights set to 1), d = u − v
(v: u with each sequence's coefficient times the untruncated ratio ρ = Π π/μ), e^C = w^C − v per
correction C, and optionally u_fp32 (u through an FP32 model). The groups are split at random into K
folds; a fold vector X̂_k = (n/n_k) Σ_{g∈k} x_g estimates the whole batch's gradient. Everything here
is a function of the Gram array G[a, k, b, l] = ⟨X̂ᵃ_k, X̂ᵇ_l⟩:

- squared bias ‖b‖² = ‖E(u − v)‖² = Σ_{k≠l}⟨D̂_k, D̂_l⟩/(K(K−1)): unbiased, the folds being independent;
- noise at batch B, σ²_B = E‖U − EU‖² = Σ_k ‖Û_k − Ū‖²/(K(K−1));
- B* = B·σ²_B/‖b‖²: the batch size (group size fixed) at which one step's noise equals the bias.

Intervals are jackknifes over folds with Student t on K − 1 degrees of freedom: ‖b‖² on the linear
scale, σ²_B and B* on the log scale. B* compares one step's bias with one step's noise; noise averages
out over steps and a persistent bias does not, so nothing here calls a bias harmless below B*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
MIN_ESS = 0.1  # below this share of B the sequence ratio's weights are too uneven to estimate E v
RHO_TOLERANCE = 1e-3  # mean ρ's interval must miss 1 by more: each π sums to 1 only to ~1e-7 per token, so
# an FP32 engine against the FP32 trainer puts mean ρ ~1e-6 off 1 with an interval narrower still
NOT_MEASURABLE = "not measurable at this length"


class Estimate(TypedDict):
    """A number and its 95% interval (None where it cannot be computed)."""

    value: float | None
    low: float | None
    high: float | None


class CorrectionImpact(TypedDict):
    """What one correction C does to the gradient: the bias it leaves, the noise it adds."""

    correction: str  # stats.corrections name, or "loss:<algo>" for the loss's own weights
    level: str  # token | sequence: the unit its weight is computed on
    share_clamped: float  # share of units whose weight its clamp or mask changed
    bias_sq: Estimate  # ‖E(w^C − v)‖²: its bias against the exact sequence-ratio weighting
    noise: float | None  # σ²_B of w^C at batch B
    noise_ratio: float | None  # σ²_B of w^C / σ²_B of u: the noise the correction adds (1 = none)
    bias_to_noise: float | None  # ‖E(w^C − v)‖ / σ_B of w^C at batch B


class Rounding(TypedDict):
    """The trainer's own rounding: its full-batch gradient U against the FP32 model's U_fp32, same samples."""

    cosine: float | None  # ⟨U, U_fp32⟩ / (‖U‖ ‖U_fp32‖)
    relative_error: float | None  # ‖U − U_fp32‖ / ‖U_fp32‖


class ImpactResult(TypedDict):
    """summary.json `impact` for one engine dtype: the mismatch's gradient bias against one step's noise."""

    measurable: bool  # False: the numbers are flagged, `reason` says why (they are still reported)
    reason: str | None  # why not measurable, else None
    sequences: int  # B = groups × group size
    groups: int  # n, prompt groups in the batch
    group_size: int  # G, sequences per prompt
    folds: int  # K, folds the groups were split into at random
    store: str  # how the fold gradients were kept: "exact" or "count-sketch"
    store_reason: str  # why that store (their size against the memory rule)
    share_groups_with_signal: float  # share of groups with a non-zero advantage (the others add nothing)
    rho_ess: float | None  # Kish ESS of the sequence ratios ρ, as a share of B
    rho_mean: Estimate  # mean ρ (1 in expectation), t-interval over the groups' means
    bias_sq: Estimate  # ‖b‖² = ‖E(u − v)‖², the squared bias of the uncorrected gradient
    noise: Estimate  # σ²_B = E‖U − EU‖², the uncorrected gradient's noise at batch B
    batch_star: Estimate  # B* = B σ²_B / ‖b‖²: where the bias rivals one step's noise (None when ‖b‖² ≤ 0)
    batch_star_at_least: float | None  # B* > this (B σ²_B / upper end of ‖b‖²) when B* has no interval
    bias_to_noise: Estimate  # ‖b‖ / σ_B at batch B (= √(B / B*)); interval from B*'s
    user_batch: int | None  # the user's batch size B′ in sequences, when given
    bias_to_noise_at_user_batch: Estimate | None  # ‖b‖ / σ_B′ with σ²_B′ = σ²_B·B/B′ (= √(B′ / B*))
    bias_to_signal: float | None  # ‖b‖ / ‖E v‖ (cross-fold products)
    angle_degrees: float | None  # angle between E u and E v (cross-fold products); None when a norm estimate ≤ 0
    noise_ratio_v: float | None  # σ²_B of v / σ²_B of u: the noise the exact sequence ratio adds
    corrections: list[CorrectionImpact]  # per correction replayed
    rounding: Rounding | None  # against the FP32 gradient, when it was measured


@dataclass(frozen=True, kw_only=True)
class CorrectionFacts:
    """One correction as the learner applied it: its name, unit level and clamp share."""

    name: str
    level: str
    share_clamped: float


@dataclass(kw_only=True)
class BatchFacts:
    """What `impact_from_gram` needs besides the Gram array: the batch's shape and per-sequence numbers."""

    group_size: int
    fold_sizes: list[int]  # groups in each fold
    log_rho: np.ndarray  # per sequence, log ρ = Σ_t (log π − log μ), untruncated
    advantages: np.ndarray  # per sequence, group-major
    store: str
    store_reason: str
    corrections: list[CorrectionFacts] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # reasons found by the learner (e.g. non-finite gradients)

    @property
    def sequences(self) -> int:
        return len(self.advantages)

    @property
    def groups(self) -> int:
        return self.sequences // self.group_size


def fold_of_groups(n_groups: int, folds: int, seed: int) -> np.ndarray:
    """Fold index per group: a seeded random permutation dealt round-robin, so fold sizes differ by ≤ 1."""
    order = np.random.default_rng(seed).permutation(n_groups)
    fold = np.empty(n_groups, dtype=np.int64)
    fold[order] = np.arange(n_groups) % folds
    return fold


def default_folds(n_groups: int) -> int:
    return min(8, n_groups)


def _clean(value: float | None) -> float | None:
    """A plain float, or None for a missing or non-finite number (JSON-safe)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _estimate(value: float | None, low: float | None = None, high: float | None = None) -> Estimate:
    value = _clean(value)
    return {
        "value": value,
        "low": None if value is None else _clean(low),
        "high": None if value is None else _clean(high),
    }


def _t(dof: int) -> float:
    return float(scipy_stats.t.ppf((1 + LEVEL) / 2, dof))


class _Gram:
    """The Gram array of the stored kinds, read as any linear combination of them."""

    def __init__(self, gram: np.ndarray, kinds: Sequence[str]):
        self.gram = np.asarray(gram, dtype=np.float64)
        self.kinds = list(kinds)
        self.folds = self.gram.shape[1]

    def unit(self, kind: str) -> np.ndarray:
        """The stored kind as a combination (add and scale these for u − d, u − d + e …)."""
        row = np.zeros(len(self.kinds))
        row[self.kinds.index(kind)] = 1.0
        return row

    def pair(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """[K, K]: ⟨X̂_k, Ŷ_l⟩ of two combinations (only the kinds they use: another kind's non-finite
        entries stay out)."""
        a = np.flatnonzero(x)
        b = np.flatnonzero(y)
        with np.errstate(all="ignore"):
            return np.einsum("a,akbl,b->kl", x[a], self.gram[a][:, :, b], y[b])


def _subsets(folds: int) -> list[np.ndarray]:
    """Every fold, then each leave-one-out subset."""
    everything = np.arange(folds)
    return [everything, *(np.delete(everything, j) for j in range(folds))]


def _cross(products: np.ndarray, folds: np.ndarray) -> float:
    """Σ_{k≠l} P[k, l] / (s(s − 1)) over the folds given: an unbiased ⟨E x, E y⟩."""
    sub = products[np.ix_(folds, folds)]
    size = len(folds)
    with np.errstate(all="ignore"):
        return float((sub.sum() - np.trace(sub)) / (size * (size - 1)))


def _spread(products: np.ndarray, folds: np.ndarray, total_folds: int) -> float:
    """Σ_k ‖X̂_k − X̄‖² / (K (s − 1)) over s folds: the whole batch's noise σ²_B (K = all folds)."""
    sub = products[np.ix_(folds, folds)]
    size = len(folds)
    with np.errstate(all="ignore"):
        return float((np.trace(sub) - sub.sum() / size) / (total_folds * (size - 1)))


def _jackknife_se(replicates: np.ndarray) -> float:
    folds = len(replicates)
    return float(np.sqrt((folds - 1) / folds * ((replicates - replicates.mean()) ** 2).sum()))


@dataclass
class _Squared:
    """A cross-fold squared norm: its value and leave-one-out replicates (linear-scale interval)."""

    value: float
    replicates: np.ndarray  # empty below 3 folds

    def estimate(self) -> Estimate:
        if len(self.replicates) < 3 or not np.isfinite(self.replicates).all():
            return _estimate(self.value)
        half = _t(len(self.replicates) - 1) * _jackknife_se(self.replicates)
        return _estimate(self.value, self.value - half, self.value + half)


def _squared(products: np.ndarray) -> _Squared:
    folds = len(products)
    subsets = _subsets(folds) if folds >= 3 else [np.arange(folds)]
    values = np.array([_cross(products, s) for s in subsets])
    return _Squared(float(values[0]), values[1:])


@dataclass
class _Noise:
    value: float
    replicates: np.ndarray

    def estimate(self) -> Estimate:
        logs = _logs(self.replicates)
        if self.value <= 0 or logs is None:
            return _estimate(self.value)
        half = _t(len(logs) - 1) * _jackknife_se(logs)
        return _estimate(self.value, self.value * math.exp(-half), self.value * math.exp(half))


def _logs(values: np.ndarray) -> np.ndarray | None:
    """log of the replicates when there are ≥ 3, all finite and positive; else None."""
    if len(values) < 3 or not (np.isfinite(values).all() and (values > 0).all()):
        return None
    return np.log(values)


def _noise(products: np.ndarray) -> _Noise:
    folds = len(products)
    subsets = _subsets(folds) if folds >= 3 else [np.arange(folds)]
    values = np.array([_spread(products, s, folds) for s in subsets])
    return _Noise(float(values[0]), values[1:])


@dataclass
class _BatchStar:
    estimate: Estimate
    at_least: float | None


def _batch_star(bias: _Squared, noise: _Noise, sequences: int) -> _BatchStar:
    """B* with a log-scale interval when ‖b‖²'s lower end and every replicate are > 0; else a lower bound."""
    bias_interval = bias.estimate()
    value = sequences * noise.value / bias.value if bias.value > 0 and noise.value > 0 else None
    bias_logs = _logs(bias.replicates)
    noise_logs = _logs(noise.replicates)
    low_end = bias_interval["low"]
    if value is not None and bias_logs is not None and noise_logs is not None and low_end is not None and low_end > 0:
        half = _t(len(bias_logs) - 1) * _jackknife_se(noise_logs - bias_logs)
        return _BatchStar(_estimate(value, value * math.exp(-half), value * math.exp(half)), None)
    high_end = bias_interval["high"]
    at_least = sequences * noise.value / high_end if high_end is not None and high_end > 0 else None
    return _BatchStar(_estimate(value), _clean(at_least))


def _bias_to_noise(bias: float, noise: float, star: _BatchStar, *, sequences: int, batch: int) -> Estimate:
    """‖b‖/σ at `batch` sequences, σ² = σ²_B·B/batch: √(batch/B*), its interval from B*'s."""
    if not noise > 0:
        return _estimate(None)
    value = math.sqrt(max(bias, 0.0) * batch / (noise * sequences))
    low = star.estimate["low"]
    high = star.estimate["high"]
    if low is not None and high is not None:
        return _estimate(value, math.sqrt(batch / high), math.sqrt(batch / low))
    if star.at_least is not None:
        return _estimate(value, 0.0, math.sqrt(batch / star.at_least))
    return _estimate(value, 0.0, None)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return _clean(numerator / denominator)


def _rho_health(batch: BatchFacts) -> tuple[float | None, Estimate]:
    """Kish ESS of ρ as a share of B; mean ρ with a t-interval over the groups' means."""
    with np.errstate(all="ignore"):
        rho = np.exp(np.asarray(batch.log_rho, dtype=np.float64))
        ess = float(rho.sum() ** 2 / (len(rho) * (rho**2).sum()))
        means = rho.reshape(batch.groups, batch.group_size).mean(axis=1)
        mean = float(means.mean())
        if batch.groups < 2:
            return _clean(ess), _estimate(mean)
        half = _t(batch.groups - 1) * float(means.std(ddof=1)) / math.sqrt(batch.groups)
    return _clean(ess), _estimate(mean, mean - half, mean + half)


def _groups_with_signal(batch: BatchFacts) -> np.ndarray:
    return np.abs(np.asarray(batch.advantages).reshape(batch.groups, batch.group_size)).max(axis=1) > 0


def _reasons(batch: BatchFacts, ess: float | None, rho_mean: Estimate, gram: _Gram | None) -> list[str]:
    reasons = list(batch.notes)
    if batch.groups < 2:
        reasons.append("not measurable: fewer than 2 groups")
    elif _groups_with_signal(batch).sum() < 2:
        reasons.append(
            "not measurable: fewer than 2 prompt groups with a non-zero advantage (every sample of the others got the"
            " same reward)"
        )
    if ess is None or rho_mean["value"] is None:
        reasons.append(f"{NOT_MEASURABLE}: the sequence ratios ρ overflow")
    elif ess < MIN_ESS:
        reasons.append(f"{NOT_MEASURABLE}: the Kish ESS of ρ is {ess:.1%} of the batch (< {MIN_ESS:.0%})")
    low = rho_mean["low"]
    high = rho_mean["high"]
    if low is not None and high is not None and not low - RHO_TOLERANCE <= 1 <= high + RHO_TOLERANCE:
        reasons.append(f"{NOT_MEASURABLE}: mean ρ {rho_mean['value']:.4g} [{low:.4g}, {high:.4g}] excludes 1")
    if gram is not None:
        diagonal = np.einsum("akak->a", gram.gram)
        broken = [kind for kind, d in zip(gram.kinds, diagonal, strict=True) if not np.isfinite(d)]
        if set(broken) & {"u", "d"}:
            reasons.append(f"non-finite gradients ({', '.join(broken)}): their numbers are not reported")
    return reasons


def not_measured(batch: BatchFacts, reason: str) -> ImpactResult:
    """The result of a batch no gradient was taken on (e.g. fewer than 2 groups): the facts, no numbers."""
    batch = BatchFacts(**{**batch.__dict__, "notes": [*batch.notes, reason]})
    return _result(batch, None, folds=0, user_batch=None)


def impact_from_gram(
    gram: np.ndarray, kinds: Sequence[str], *, batch: BatchFacts, user_batch: int | None
) -> ImpactResult:
    """Every number of `ImpactResult` from G[a, k, b, l] = ⟨X̂ᵃ_k, X̂ᵇ_l⟩ (kinds a, b as in `kinds`:
    "u", "d", "e:<C>" per correction in `batch.corrections`, optionally "u_fp32"; folds k, l)."""
    gram_ = _Gram(gram, kinds)
    return _result(batch, gram_, folds=gram_.folds, user_batch=user_batch)


def _result(batch: BatchFacts, gram: _Gram | None, *, folds: int, user_batch: int | None) -> ImpactResult:
    ess, rho_mean = _rho_health(batch)
    reasons = _reasons(batch, ess, rho_mean, gram)
    groups_with_signal = _groups_with_signal(batch)
    result: ImpactResult = {
        "measurable": not reasons,
        "reason": "; ".join(reasons) or None,
        "sequences": batch.sequences,
        "groups": batch.groups,
        "group_size": batch.group_size,
        "folds": folds,
        "store": batch.store,
        "store_reason": batch.store_reason,
        "share_groups_with_signal": float(groups_with_signal.mean()) if batch.groups else 0.0,
        "rho_ess": ess,
        "rho_mean": rho_mean,
        "bias_sq": _estimate(None),
        "noise": _estimate(None),
        "batch_star": _estimate(None),
        "batch_star_at_least": None,
        "bias_to_noise": _estimate(None),
        "user_batch": user_batch,
        "bias_to_noise_at_user_batch": None,
        "bias_to_signal": None,
        "angle_degrees": None,
        "noise_ratio_v": None,
        "corrections": [],
        "rounding": None,
    }
    if gram is not None:
        _add_gradient_numbers(result, gram, batch)
    return result


def _add_gradient_numbers(result: ImpactResult, gram: _Gram, batch: BatchFacts) -> None:
    u = gram.unit("u")
    d = gram.unit("d")
    v = u - d
    bias = _squared(gram.pair(d, d))
    noise = _noise(gram.pair(u, u))
    star = _batch_star(bias, noise, batch.sequences)
    result["bias_sq"] = bias.estimate()
    result["noise"] = noise.estimate()
    result["batch_star"] = star.estimate
    result["batch_star_at_least"] = star.at_least
    result["bias_to_noise"] = _bias_to_noise(
        bias.value, noise.value, star, sequences=batch.sequences, batch=batch.sequences
    )
    if result["user_batch"] is not None:
        result["bias_to_noise_at_user_batch"] = _bias_to_noise(
            bias.value, noise.value, star, sequences=batch.sequences, batch=result["user_batch"]
        )
    signal = _cross(gram.pair(v, v), np.arange(gram.folds))
    if signal > 0 and math.isfinite(bias.value):
        result["bias_to_signal"] = _clean(math.sqrt(max(bias.value, 0.0) / signal))
    result["angle_degrees"] = _angle(gram, u, v)
    result["noise_ratio_v"] = _ratio(_clean(_noise(gram.pair(v, v)).value), _clean(noise.value))
    result["corrections"] = [_correction(gram, c, v, noise.value) for c in batch.corrections]
    if "u_fp32" in gram.kinds:
        result["rounding"] = _rounding(gram, batch)


def _angle(gram: _Gram, u: np.ndarray, v: np.ndarray) -> float | None:
    everything = np.arange(gram.folds)
    uu = _cross(gram.pair(u, u), everything)
    vv = _cross(gram.pair(v, v), everything)
    if not (uu > 0 and vv > 0):
        return None
    uv = _cross(gram.pair(u, v), everything)
    cosine = max(-1.0, min(1.0, uv / math.sqrt(uu * vv)))
    return _clean(math.degrees(math.acos(cosine)))


def _correction(gram: _Gram, correction: CorrectionFacts, v: np.ndarray, noise_u: float) -> CorrectionImpact:
    e = gram.unit(f"e:{correction.name}")
    bias = _squared(gram.pair(e, e))
    noise = _noise(gram.pair(v + e, v + e)).value
    bias_to_noise = math.sqrt(max(bias.value, 0.0) / noise) if noise > 0 and math.isfinite(bias.value) else None
    return {
        "correction": correction.name,
        "level": correction.level,
        "share_clamped": correction.share_clamped,
        "bias_sq": bias.estimate(),
        "noise": _clean(noise),
        "noise_ratio": _ratio(_clean(noise), _clean(noise_u)),
        "bias_to_noise": _clean(bias_to_noise),
    }


def _rounding(gram: _Gram, batch: BatchFacts) -> Rounding:
    """Full-batch U = Σ_k (n_k/n) X̂_k of u and u_fp32, compared through the Gram."""
    share = np.asarray(batch.fold_sizes, dtype=np.float64) / batch.groups
    u = gram.unit("u")
    fp32 = gram.unit("u_fp32")
    uu = float(share @ gram.pair(u, u) @ share)
    ff = float(share @ gram.pair(fp32, fp32) @ share)
    uf = float(share @ gram.pair(u, fp32) @ share)
    if not (uu > 0 and ff > 0):
        return {"cosine": None, "relative_error": None}
    return {
        "cosine": _clean(uf / math.sqrt(uu * ff)),
        "relative_error": _clean(math.sqrt(max(uu - 2 * uf + ff, 0.0) / ff)),
    }
