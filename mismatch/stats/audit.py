"""Fingerprints of setup bugs in sampled-token log-probs, found without the full distributions.

- **truncation** (top-p / top-k applied on one side only): under μ, E[π/μ] = Σ π = 1 whenever
  both sides are full distributions over the same tokens, whatever their precision. Renormalising
  μ to a nucleus S makes it S < 1 (a near-constant negative offset of ℓ on kept tokens);
  renormalising π makes it > 1 on kept tokens and gives −inf to tokens outside π's nucleus (more
  than 1% of sampled tokens: the same top-p on both sides leaves only a few at its edge).
  m = mean(π/μ) − 1 with a standard error that resamples sequences is the test.
- **temperature** (μ at one temperature, π at another): log π = (T_μ/T_π)·log μ + c, so ℓ tilts with
  log μ; the least-squares slope b of ℓ on log μ estimates T_μ/T_π − 1. Precision noise alone gives
  |b| ~ 1e-4 (measured on the embedded model in BF16 and FP16).
- **raw_logprobs** (one side's log-probs taken before the temperature was applied, e.g. vLLM's
  `logprobs_mode="raw_logprobs"`): the temperature fingerprint with T_μ/T_π = 1/T or T, where
  the sampling temperature T is known.

`Audit` streams: it keeps sums only.
"""

from __future__ import annotations

import math
from typing import TypedDict

import numpy as np

TRUNCATION_WARN = 1e-3  # |m|; an FP32 engine/trainer pair measures |m| ~ 1e-5
TRUNCATION_FAIL = 1e-2
# sampled tokens with π = 0: a few at the edge of a nucleus both sides apply; top-p 0.9 on π alone puts ~10% there
OUTSIDE_SHARE = 0.01
SLOPE_WARN = 2e-3  # |b|: 0.2% and 1% in temperature ratio
SLOPE_FAIL = 1e-2
Z = 5.0  # and the deviation must be this many standard errors away from 0


class _AuditCheckRequired(TypedDict):
    check: str  # truncation | temperature | raw_logprobs
    status: str  # ok | warn | fail | not_measured
    detail: str


class AuditCheck(_AuditCheckRequired, total=False):
    """One check's result (`Audit.result`): truncation adds its offset, temperature its slope."""

    offset: float  # m = mean(π/μ) − 1
    offset_se: float
    slope: float  # b
    slope_se: float
    implied_ratio: float  # T_μ / T_π ≈ 1 + b


class AuditRow(AuditCheck):
    """One row of summary.json's `audit` (or of `audit_by_pair`): an `AuditCheck`, then its pair."""

    pair: str


class Audit:
    def __init__(self) -> None:
        self.n = 0
        self.s = dict.fromkeys(("x", "y", "xx", "xy", "yy", "w", "seq_w2", "seq_wn", "seq_n2"), 0.0)
        self.trainer_only_inf = 0
        self.engine_only_inf = 0

    def add(self, logp_trainer, logp_engine, seq_ids) -> None:
        pi = np.asarray(logp_trainer, dtype=np.float64)
        mu = np.asarray(logp_engine, dtype=np.float64)
        self.trainer_only_inf += int((np.isneginf(pi) & np.isfinite(mu)).sum())
        self.engine_only_inf += int((np.isneginf(mu) & np.isfinite(pi)).sum())
        finite = np.isfinite(pi) & np.isfinite(mu)
        x = mu[finite]
        y = pi[finite] - mu[finite]
        seqs = np.asarray(seq_ids)[finite]
        if not len(x):
            return
        w = np.expm1(np.clip(y, -20, 20))  # π/μ − 1
        self.n += len(x)
        for name, values in (("x", x), ("y", y), ("xx", x * x), ("xy", x * y), ("yy", y * y), ("w", w)):
            self.s[name] += float(values.sum())
        _, index = np.unique(seqs, return_inverse=True)
        per_seq = np.bincount(index, weights=w)
        counts = np.bincount(index).astype(np.float64)
        self.s["seq_w2"] += float((per_seq**2).sum())
        self.s["seq_wn"] += float((per_seq * counts).sum())
        self.s["seq_n2"] += float((counts**2).sum())

    def offset(self) -> tuple[float, float]:
        """m = mean(π/μ) − 1 and its standard error, sequences as the resampled units."""
        n = self.n
        s = self.s
        m = s["w"] / n
        variance = s["seq_w2"] - 2 * m * s["seq_wn"] + m * m * s["seq_n2"]  # Σ_s (Σ_t w − m·n_s)²
        return m, math.sqrt(max(variance, 0.0)) / n

    def slope(self) -> tuple[float, float]:
        """b of ℓ ≈ a + b·log μ and its standard error."""
        n = self.n
        s = self.s
        sxx = s["xx"] - s["x"] ** 2 / n
        sxy = s["xy"] - s["x"] * s["y"] / n
        syy = s["yy"] - s["y"] ** 2 / n
        if n < 3 or sxx <= 0:
            return float("nan"), float("nan")
        b = sxy / sxx
        return b, math.sqrt(max(syy - b * sxy, 0.0) / (n - 2) / sxx)

    def result(self, temperature: float | None = None) -> list[AuditCheck]:
        if not self.n:
            return [
                {"check": name, "status": "not_measured", "detail": "no token with finite μ and π"}
                for name in ("truncation", "temperature", "raw_logprobs")
            ]
        truncation = self._truncation()
        return [truncation, *self._temperature(temperature, confounded=truncation["status"] != "ok")]

    def _truncation(self) -> AuditCheck:
        m, se = self.offset()
        significant = abs(m) > Z * se
        level = (
            "fail"
            if significant and abs(m) > TRUNCATION_FAIL
            else "warn"
            if significant and abs(m) > TRUNCATION_WARN
            else "ok"
        )
        detail = f"mean(π/μ) − 1 = {m:+.2e} ± {se:.1e} over {self.n} tokens (0 when both sides are full distributions)"
        if level != "ok":
            side = (
                "the engine's μ is renormalised to a nucleus (top-p/top-k) the trainer's π does not apply"
                if m < 0
                else "the trainer's π is renormalised to a nucleus the engine's μ does not apply"
            )
            detail += f": {side}; apply the same top-p/top-k on both sides or log full-distribution log-probs"
        share = self.trainer_only_inf / (self.n + self.trainer_only_inf)
        if share > OUTSIDE_SHARE:
            level = "fail"
            detail += (
                f"; {100 * share:.3g}% of sampled tokens have π = 0 (−inf) with finite μ: "
                "the trainer truncates tokens the engine sampled"
            )
        elif self.trainer_only_inf:
            detail += (
                f"; {self.trainer_only_inf} sampled token(s) fall outside the trainer's nucleus, "
                "as expected at its edge when both sides apply the same top-p"
            )
        if self.engine_only_inf:
            level = "fail"
            detail += (
                f"; {self.engine_only_inf} token(s) have μ = 0 (−inf) though sampled: "
                "the engine's log-probs are not of the sampling distribution"
            )
        return {"check": "truncation", "status": level, "detail": detail, "offset": m, "offset_se": se}

    def _temperature(self, temperature: float | None, confounded: bool) -> list[AuditCheck]:
        b, se = self.slope()
        implied = 1 + b
        significant = abs(b) > Z * se
        level = (
            "fail" if significant and abs(b) > SLOPE_FAIL else "warn" if significant and abs(b) > SLOPE_WARN else "ok"
        )
        detail = (
            f"ℓ = a + b·log μ with b = {b:+.2e} ± {se:.1e}: T_μ / T_π ≈ {implied:.4f} "
            "(1 when both sides use one temperature)"
        )
        if level != "ok":
            detail += (
                f"; μ and π look processed at temperatures in the ratio {implied:.3g}: "
                "divide the trainer's logits by the sampling temperature, exactly once"
            )
            if confounded:
                detail += " (part of this tilt can come from the truncation found above)"
        temperature_row: AuditCheck = {
            "check": "temperature",
            "status": level,
            "detail": detail,
            "slope": b,
            "slope_se": se,
            "implied_ratio": implied,
        }
        return [temperature_row, _raw_logprobs(temperature, b, tilted=level != "ok")]


def _raw_logprobs(temperature: float | None, slope: float, tilted: bool) -> AuditCheck:
    """Raw log-probs on one side: the temperature ratio T_μ / T_π = 1 + `slope` is the sampling temperature T
    or 1/T."""
    implied = 1 + slope
    if temperature is None or temperature == 1.0:
        return {
            "check": "raw_logprobs",
            "status": "not_measured",
            "detail": "needs a sampling temperature ≠ 1 (a `temperature` field or --temperature): "
            "at T = 1 raw and processed log-probs coincide",
        }
    distance, side = min(
        (abs(implied - target), side)
        for target, side in (
            (1 / temperature, "μ are raw (T = 1) log-probs while π is at the sampling temperature"),
            (temperature, "π is at T = 1 (logits not divided by the temperature) while μ is processed"),
        )
    )
    # within half the measured tilt of the target (the slope is attenuated)
    matches = tilted and distance < 0.5 * abs(slope)
    if matches:
        detail = (
            f"T_μ / T_π ≈ {implied:.4f} matches the sampling temperature {temperature:g}: {side}; "
            "use vLLM logprobs_mode='processed_logprobs'"
        )
    else:
        detail = f"no sign of raw log-probs at sampling temperature {temperature:g} (T_μ / T_π ≈ {implied:.4f})"
    return {"check": "raw_logprobs", "status": "fail" if matches else "ok", "detail": detail}
