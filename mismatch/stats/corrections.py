"""Correction replay: on the very tokens measured, what each framework's correction would do.

Every correction turns the per-token log-ratio ℓ = log π − log μ into a weight the policy
gradient is multiplied by. ρ is e^ℓ per token (`token`), e^Σℓ per sequence (`sum`: the
sequence ratio, a product of token ratios) or e^mean ℓ (`mean`: the geometric mean). Then
`truncate` clamps ρ to [low, high], `mask` zeroes it outside, `reject` keeps weight 1 inside and
0 outside (rejection sampling, no reweighting). Log-ratios are clamped to ±20 first, as verl does
(SAFETY_BOUND in verl/trainer/ppo/rollout_corr_helper.py), so weights stay finite.

verl's sequence rejections (`rollout_rs=seq_sum_k1` / `seq_mean_k1`, v0.7.1 to v0.9.0) band k1 = log μ − log π,
not ℓ: the sum or mean over the sequence of each token's −ℓ clamped to ±20, kept when log low ≤ k1 ≤ log high.
Their band bounds μ/π, the inverse of ρ (`bound="k1"`): "0.999_1.001" keeps e^{mean ℓ} within
[1/1.001, 1/0.999], not [0.999, 1.001].

The defaults are each framework's own, with the file they are read from. `Replay` streams: it
keeps sums and a log-weight histogram, never the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypedDict

import numpy as np

from mismatch.errors import ConfigError

SAFETY_BOUND = 20.0
QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
BIN = 1e-3  # log-weight histogram resolution: quantiles within ±0.05% of the weight
_EDGES = np.arange(-SAFETY_BOUND, SAFETY_BOUND + BIN, BIN)


@dataclass(frozen=True, kw_only=True)
class Correction:
    name: str
    ratio: str  # token | sum | mean
    action: str  # truncate | mask | reject
    low: float | None
    high: float | None
    source: str
    bound: str = "ratio"  # ratio: the band bounds ρ = π/μ; k1: it bounds μ/π, as verl's *_k1 rejection

    @property
    def level(self) -> str:
        return "token" if self.ratio == "token" else "sequence"

    def band(self) -> str:
        low = "—" if self.low is None else f"{self.low:g}"
        high = "—" if self.high is None else f"{self.high:g}"
        return f"μ/π ∈ [{low}, {high}]" if self.bound == "k1" else f"[{low}, {high}]"


_VERL_CONFIG = "(verl/trainer/config/algorithm.py, verl/trainer/ppo/rollout_corr_helper.py @ v0.9.0 483b8a009ba3)"
CORRECTIONS = (
    Correction(
        name="token_tis",
        ratio="token",
        action="truncate",
        low=None,
        high=2.0,
        source="verl rollout_is=token, rollout_is_threshold 2.0 (trainer/config/algorithm/rollout_correction.yaml); "
        "slime --use-tis --tis-clip 2.0 --tis-clip-low 0 (slime/utils/arguments.py @ v0.3.1 a6272da0d4f3), whose "
        "tis_clipfrac is share_tokens_changed_per_seq (share_tokens_changed with --calculate-per-token-loss)",
    ),
    Correction(
        name="icepop",
        ratio="token",
        action="mask",
        low=0.5,
        high=5.0,
        source="NeMo-RL truncated_importance_sampling_type=icepop, 'ref bounds: 0.5–5' "
        "(nemo_rl/algorithms/loss/loss_functions.py); examples/configs/prorlv2.v2.yaml",
    ),
    Correction(
        name="seq_mis",
        ratio="sum",
        action="mask",
        low=0.5,
        high=2.0,
        source=f"verl decoupled_seq_is_rs: sequence IS 2.0 with seq_sum_k1 rejection '0.5_2.0' {_VERL_CONFIG}",
        bound="k1",
    ),
    Correction(
        name="geometric",
        ratio="mean",
        action="reject",
        low=0.999,
        high=1.001,
        source=f"verl decoupled_geo_rs: seq_mean_k1 rejection '0.999_1.001' on mean(log μ − log π) {_VERL_CONFIG}",
        bound="k1",
    ),
    Correction(
        name="trl_token_truncate",
        ratio="token",
        action="truncate",
        low=None,
        high=3.0,
        source="TRL GRPOConfig vllm_importance_sampling_mode='token_truncate', clip_max 3.0 "
        "(trl/trainer/grpo_config.py)",
    ),
    Correction(
        name="trl_token_mask",
        ratio="token",
        action="mask",
        low=None,
        high=3.0,
        source="TRL vllm_importance_sampling_mode='token_mask', clip_max 3.0",
    ),
    Correction(
        name="trl_sequence_truncate",
        ratio="sum",
        action="truncate",
        low=None,
        high=3.0,
        source="TRL vllm_importance_sampling_mode='sequence_truncate', clip_max 3.0",
    ),
    Correction(
        name="trl_sequence_mask",
        ratio="sum",
        action="mask",
        low=None,
        high=3.0,
        source="TRL's default: vllm_importance_sampling_mode='sequence_mask', clip_max 3.0",
    ),
)
TRL_MODES = tuple(c.name for c in CORRECTIONS if c.name.startswith("trl_"))


def with_thresholds(settings: list[str]) -> tuple[Correction, ...]:
    """The default corrections with the user's `--correction NAME=HIGH` or `NAME=LOW,HIGH`
    (`trl=…` sets TRL's four modes at once)."""
    chosen = {c.name: c for c in CORRECTIONS}
    for setting in settings:
        name, _, value = setting.partition("=")
        names = TRL_MODES if name == "trl" else (name,)
        if not value or any(n not in chosen for n in names):
            raise ConfigError(
                f"--correction {setting!r}: use NAME=HIGH or NAME=LOW,HIGH with NAME one of "
                f"{', '.join([*chosen, 'trl'])}"
            )
        try:
            bounds = [float(part) for part in value.split(",")]
        except ValueError:
            raise ConfigError(f"--correction {setting!r}: the thresholds must be numbers") from None
        if len(bounds) > 2 or any(b <= 0 for b in bounds) or (len(bounds) == 2 and bounds[0] >= bounds[1]):
            raise ConfigError(f"--correction {setting!r}: give HIGH, or LOW,HIGH with 0 < LOW < HIGH")
        for n in names:
            if len(bounds) == 2:
                corrected = replace(chosen[n], low=bounds[0], high=bounds[1])
            else:
                corrected = replace(chosen[n], high=bounds[0])
            if corrected.low is not None and corrected.high is not None and corrected.low >= corrected.high:
                raise ConfigError(
                    f"--correction {setting!r}: {n}'s band would be {corrected.band()}; give LOW,HIGH with LOW < HIGH"
                )
            chosen[n] = corrected
    return tuple(chosen.values())


def ratios(correction: Correction, log_ratio: np.ndarray, seq_index: np.ndarray, n_seqs: int) -> np.ndarray:
    """log ρ of each unit: per token, or per sequence (`seq_index` numbers the sequences 0…n−1). verl's k1
    rejection clamps each token's ℓ before the sum, and its mean divides by (n + 1e-8) (`masked_mean`)."""
    clamped = np.clip(log_ratio, -SAFETY_BOUND, SAFETY_BOUND)
    if correction.ratio == "token":
        return clamped
    k1 = correction.bound == "k1"
    total: np.ndarray = np.bincount(seq_index, weights=clamped if k1 else log_ratio, minlength=n_seqs)
    if correction.ratio == "mean":
        total = total / (np.bincount(seq_index, minlength=n_seqs) + (1e-8 if k1 else 0.0))
    return np.clip(total, -SAFETY_BOUND, SAFETY_BOUND)


def weights(correction: Correction, log_rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weight after the correction, whether the correction changed it) per unit."""
    rho = np.exp(log_rho)
    low = -np.inf if correction.low is None else correction.low
    high = np.inf if correction.high is None else correction.high
    if correction.bound == "k1":  # verl keeps log low ≤ k1 = −log ρ ≤ log high
        k1_low = -np.inf if correction.low is None else np.log(correction.low)
        k1_high = np.inf if correction.high is None else np.log(correction.high)
        outside = (-log_rho < k1_low) | (-log_rho > k1_high)
    else:
        outside = (rho < low) | (rho > high)
    if correction.action == "truncate":
        return np.clip(rho, low, high), outside
    if correction.action == "mask":
        return np.where(outside, 0.0, rho), outside
    return np.where(outside, 0.0, 1.0), outside


class CorrectionResult(TypedDict):
    """What one correction would do on the tokens replayed (`Replay.result`)."""

    correction: str
    level: str  # token | sequence
    action: str  # truncate | mask | reject
    band: str
    low: float | None
    high: float | None
    source: str
    units: int  # tokens or sequences, by level
    share_tokens_changed: float
    share_tokens_changed_per_seq: float  # each sequence's share, then their mean: slime's tis_clipfrac for token_tis
    share_seqs_changed: float
    share_units_zeroed: float
    mean_weight_before: float
    mean_weight_after: float
    ess_before: float
    ess_after: float
    min_weight_before: float
    max_weight_before: float
    max_weight_after: float
    quantiles_before: dict[str, float]  # p1, p10, p50, p90, p99
    quantiles_after: dict[str, float]


class CorrectionRow(CorrectionResult):
    """One row of summary.json's `corrections`: the pair (`engine→trainer`), then its `CorrectionResult`."""

    pair: str


class _Tally:
    """Streaming sums of one correction: changed units, Σw and Σw² before and after, histograms."""

    def __init__(self) -> None:
        self.units = 0
        self.changed_units = 0
        self.tokens = 0
        self.changed_tokens = 0
        self.seqs = 0
        self.changed_seqs = 0
        self.seq_shares = 0.0  # Σ over sequences of the share of its tokens changed
        self.sums = dict.fromkeys(("before", "before_sq", "after", "after_sq"), 0.0)
        self.hist = {
            "before": np.zeros(len(_EDGES) + 1, dtype=np.int64),
            "after": np.zeros(len(_EDGES) + 1, dtype=np.int64),
        }
        self.zeros_after = 0
        self.extremes = {"before": [np.inf, -np.inf], "after": [np.inf, -np.inf]}

    def add(
        self,
        log_before: np.ndarray,
        after: np.ndarray,
        changed: np.ndarray,
        *,
        changed_tokens: int,
        changed_seqs: int,
        seq_shares: float,
        tokens: int,
        seqs: int,
    ) -> None:
        before = np.exp(log_before)
        self.units += len(before)
        self.changed_units += int(changed.sum())
        self.tokens += tokens
        self.changed_tokens += changed_tokens
        self.seqs += seqs
        self.changed_seqs += changed_seqs
        self.seq_shares += seq_shares
        for name, values in (("before", before), ("after", after)):
            self.sums[name] += float(values.sum())
            self.sums[name + "_sq"] += float((values**2).sum())
            positive = values[values > 0]
            self.hist[name] += np.bincount(np.searchsorted(_EDGES, np.log(positive)), minlength=len(_EDGES) + 1)
            if len(values):
                self.extremes[name] = [
                    min(self.extremes[name][0], values.min()),
                    max(self.extremes[name][1], values.max()),
                ]
        self.zeros_after += int((after == 0).sum())

    def quantiles(self, name: str) -> dict[str, float]:
        """Quantiles from the histogram (zeros, then log-spaced bins at their centres)."""
        counts = self.hist[name]
        zeros = self.zeros_after if name == "after" else 0
        cumulative = zeros + np.cumsum(counts)
        centres = np.exp(np.concatenate([[_EDGES[0]], (_EDGES[:-1] + _EDGES[1:]) / 2, [_EDGES[-1]]]))
        out: dict[str, float] = {}
        for q in QUANTILES:
            rank = q * (self.units - 1) + 1  # the k-th smallest value, 1-based
            out[f"p{round(100 * q):g}"] = 0.0 if rank <= zeros else float(centres[np.searchsorted(cumulative, rank)])
        return out

    def ess(self, name: str) -> float:
        """Kish's effective sample size as a fraction of the units: (Σw)² / (n Σw²)."""
        total = self.sums[name]
        square = self.sums[name + "_sq"]
        return total**2 / (self.units * square) if square > 0 else 0.0


class Replay:
    """Every correction, replayed chunk by chunk on (ℓ, sequence) of whole sequences."""

    def __init__(self, corrections: tuple[Correction, ...] = CORRECTIONS):
        self.corrections = corrections
        self.tallies = {c.name: _Tally() for c in corrections}

    def add(self, log_ratio, seq_ids) -> None:
        log_ratio = np.asarray(log_ratio, dtype=np.float64)
        if not len(log_ratio):
            return
        _, seq_index = np.unique(np.asarray(seq_ids), return_inverse=True)
        n_seqs = int(seq_index.max()) + 1
        lengths = np.bincount(seq_index, minlength=n_seqs)
        for correction in self.corrections:
            log_rho = ratios(correction, log_ratio, seq_index, n_seqs)
            after, changed = weights(correction, log_rho)
            token_changed = changed if correction.level == "token" else changed[seq_index]
            changed_per_seq = np.bincount(seq_index, weights=token_changed, minlength=n_seqs)
            self.tallies[correction.name].add(
                log_rho,
                after,
                changed,
                changed_tokens=int(token_changed.sum()),
                changed_seqs=int(changed_per_seq.astype(bool).sum()),
                seq_shares=float((changed_per_seq / lengths).sum()),
                tokens=len(log_ratio),
                seqs=n_seqs,
            )

    def result(self) -> list[CorrectionResult]:
        """Per correction that saw a unit: what it changed, the weights before and after."""
        rows: list[CorrectionResult] = []
        for correction in self.corrections:
            tally = self.tallies[correction.name]
            if not tally.units:
                continue
            rows.append(
                {
                    "correction": correction.name,
                    "level": correction.level,
                    "action": correction.action,
                    "band": correction.band(),
                    "low": correction.low,
                    "high": correction.high,
                    "source": correction.source,
                    "units": tally.units,
                    "share_tokens_changed": tally.changed_tokens / tally.tokens,
                    "share_tokens_changed_per_seq": tally.seq_shares / tally.seqs,
                    "share_seqs_changed": tally.changed_seqs / tally.seqs,
                    "share_units_zeroed": tally.zeros_after / tally.units,
                    "mean_weight_before": tally.sums["before"] / tally.units,
                    "mean_weight_after": tally.sums["after"] / tally.units,
                    "ess_before": tally.ess("before"),
                    "ess_after": tally.ess("after"),
                    "min_weight_before": float(tally.extremes["before"][0]),
                    "max_weight_before": float(tally.extremes["before"][1]),
                    "max_weight_after": float(tally.extremes["after"][1]),
                    "quantiles_before": tally.quantiles("before"),
                    "quantiles_after": tally.quantiles("after"),
                }
            )
        return rows
