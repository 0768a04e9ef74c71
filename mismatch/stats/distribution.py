"""Exact divergences between the engine's distribution μ and the trainer's π at a position, from rows
of log-probabilities over the whole vocabulary ([positions, vocabulary]; −inf outside a top-p nucleus).

Each row is first renormalised in float64 (a float32 log-softmax sums to 1 only to about 1e-7, which
would otherwise bias a KL of that size). With r = π/μ, per position:

- KL[μ‖π] = Σ_{μ>0} μ·(r − 1 − log r) + π(μ = 0): every term ≥ 0, the first sum being the expectation
  under μ of the sampled-token k3 term (`stats.metrics.k3_terms`). Infinite when μ has mass where π
  has none. KL[π‖μ] likewise with the roles swapped;
- total variation ½Σ|μ − π| (always finite).

With top-p < 1 either side can be −inf where the other is not, and a KL is then infinite. The finite
quantity reported instead is the KL between μ and π each restricted to S, the intersection of their
supports, and renormalised there: KL[μ_S‖π_S] with μ_S = μ·1_S / μ(S) (and KL[π_S‖μ_S]). Alongside it,
each side's mass outside the other's support, μ(supp μ ∖ supp π) = 1 − μ(S) and π(supp π ∖ supp μ):
the two numbers say how much the restriction left out. Without a nucleus S is the whole vocabulary,
both masses are 0 and the restricted KLs are the KLs. A position whose supports do not meet has no
restricted KL (NaN; counted in `positions_disjoint`).

The sampled-token k3 at the same positions estimates E_μ[r − 1 − log r], which is KL[μ‖π] without a
nucleus. With one, the measured k3 leaves out tokens outside π's nucleus (as `stats.metrics.PairStats`
does), so its expectation is Σ_p Σ_{S_p} μ(r − 1 − log r) / Σ_p μ_p(S_p) (`k3_expected`, a ratio over
positions p, equal to the mean KL[μ‖π] when there is no nucleus); the comparison is made against it.

Intervals are cluster bootstraps over prompts (`stats.metrics.bootstrap_mean_ci`), seeded. An
estimate's value is inf where a position's KL is infinite, NaN where nothing was measurable; both are
null in summary.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from mismatch.stats.impact import Estimate
from mismatch.stats.metrics import bootstrap_mean_ci, bootstrap_totals_ci, k3_terms

_NAN = float("nan")


@dataclass(frozen=True)
class PositionDivergences:
    """Per position (one row of each side), float64 arrays of equal length."""

    kl_engine_trainer: np.ndarray  # KL[μ‖π]; inf where μ has mass outside π's support
    kl_trainer_engine: np.ndarray  # KL[π‖μ]; inf where π has mass outside μ's support
    tv: np.ndarray  # ½Σ|μ − π|
    kl_engine_trainer_shared: np.ndarray  # KL[μ_S‖π_S] on the shared support S; NaN where S is empty
    kl_trainer_engine_shared: np.ndarray  # KL[π_S‖μ_S]
    engine_mass_outside: np.ndarray  # μ's mass outside π's support
    trainer_mass_outside: np.ndarray  # π's mass outside μ's support
    k3_expected: np.ndarray  # E_μ[r − 1 − log r | token in S]; NaN where S is empty
    same_support: np.ndarray  # bool: both rows are −inf at the same tokens (if any)

    @staticmethod
    def join(parts: list[PositionDivergences]) -> PositionDivergences:
        """The chunks' positions, in order."""
        return PositionDivergences(
            **{
                name: np.concatenate([getattr(p, name) for p in parts])
                for name in PositionDivergences.__dataclass_fields__
            }
        )


def _normalised(rows) -> np.ndarray:
    logp = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    return logp - logsumexp(logp, axis=1, keepdims=True)


def _k3_mass(on: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """Σ over `on` of p·(q/p − 1 − log(q/p)) per row: KL[p‖q] when p and q are normalised on `on`.
    Where q/p > e the term is q − p(1 + log(q/p)), which cannot overflow and loses nothing there."""
    log_p = np.where(on, log_p, 0.0)
    log_q = np.where(on, log_q, 0.0)
    p = np.exp(log_p)
    ratio = log_q - log_p
    term = np.where(ratio <= 1, p * k3_terms(np.minimum(log_q, log_p + 1), log_p), np.exp(log_q) - p * (1 + ratio))
    return np.sum(np.where(on, term, 0.0), axis=1)


def divergences(logp_engine, logp_trainer) -> PositionDivergences:
    """The divergences of one chunk of rows (log μ and log π, [positions, vocabulary]). Holds about
    ten float64 copies of the chunk: the caller sizes its chunks."""
    mu = _normalised(logp_engine)
    pi = _normalised(logp_trainer)
    in_mu = np.isfinite(mu)
    in_pi = np.isfinite(pi)
    shared = in_mu & in_pi
    p_mu = np.exp(mu)
    p_pi = np.exp(pi)
    engine_outside = np.sum(np.where(in_pi, 0.0, p_mu), axis=1)
    trainer_outside = np.sum(np.where(in_mu, 0.0, p_pi), axis=1)
    forward = _k3_mass(shared, mu, pi)
    reverse = _k3_mass(shared, pi, mu)
    meet = shared.any(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_mu_shared = logsumexp(np.where(shared, mu, -np.inf), axis=1, keepdims=True)
        log_pi_shared = logsumexp(np.where(shared, pi, -np.inf), axis=1, keepdims=True)
        mu_shared = mu - log_mu_shared
        pi_shared = pi - log_pi_shared
        k3_expected = forward / np.exp(log_mu_shared[:, 0])
    return PositionDivergences(
        kl_engine_trainer=np.where(engine_outside > 0, np.inf, forward + trainer_outside),
        kl_trainer_engine=np.where(trainer_outside > 0, np.inf, reverse + engine_outside),
        tv=0.5 * np.sum(np.abs(p_mu - p_pi), axis=1),
        kl_engine_trainer_shared=np.where(meet, _k3_mass(shared, mu_shared, pi_shared), np.nan),
        kl_trainer_engine_shared=np.where(meet, _k3_mass(shared, pi_shared, mu_shared), np.nan),
        engine_mass_outside=engine_outside,
        trainer_mass_outside=trainer_outside,
        k3_expected=np.where(meet, k3_expected, np.nan),
        same_support=(in_mu == in_pi).all(axis=1),
    )


class DistributionSummary(TypedDict):
    """The full-distribution view of one pair over its positions (summary.json)."""

    positions: int
    prompts: int
    nucleus: bool  # the supports differ at some position (top-p): read the `_shared` KLs and the masses outside
    kl_engine_trainer: Estimate  # mean KL[μ‖π] over positions (inf if one is infinite)
    kl_trainer_engine: Estimate
    tv: Estimate
    kl_engine_trainer_shared: Estimate  # over the positions whose supports meet
    kl_trainer_engine_shared: Estimate
    engine_mass_outside: Estimate
    trainer_mass_outside: Estimate
    positions_infinite_engine_trainer: int
    positions_infinite_trainer_engine: int
    positions_disjoint: int
    k3: Estimate  # the sampled-token k3 at the same positions (tokens outside π's nucleus left out)
    k3_tokens: int
    k3_expected: Estimate  # what that k3 estimates, exactly; = kl_engine_trainer without a nucleus
    k3_agrees: bool | None  # the two intervals overlap (None when either is missing)


def _mean(values: np.ndarray, clusters: np.ndarray, seed: int) -> Estimate:
    """Mean over positions with its cluster-bootstrap interval (NaN values left out; inf: no interval)."""
    keep = ~np.isnan(values)
    values = values[keep]
    clusters = clusters[keep]
    if not len(values):
        return {"value": _NAN, "low": _NAN, "high": _NAN}
    if not np.isfinite(values).all() or len(np.unique(clusters)) < 2:
        return {"value": float(np.mean(values)), "low": _NAN, "high": _NAN}
    low, high = bootstrap_mean_ci(values, clusters, seed=seed)
    return {"value": float(np.mean(values)), "low": low, "high": high}


def _expected_k3(positions: PositionDivergences, clusters: np.ndarray, seed: int) -> Estimate:
    """Σ_p μ_p(S_p)·k3_expected_p / Σ_p μ_p(S_p), with its cluster-bootstrap interval."""
    keep = ~np.isnan(positions.k3_expected)
    weight = 1 - positions.engine_mass_outside[keep]
    frame = pd.DataFrame({"cluster": clusters[keep], "total": weight * positions.k3_expected[keep], "weight": weight})
    per_cluster = frame.groupby("cluster", sort=True).sum()
    if not len(per_cluster):
        return {"value": _NAN, "low": _NAN, "high": _NAN}
    value = float(per_cluster["total"].sum() / per_cluster["weight"].sum())
    if len(per_cluster) < 2:
        return {"value": value, "low": _NAN, "high": _NAN}
    low, high = bootstrap_totals_ci(per_cluster["total"].to_numpy(), per_cluster["weight"].to_numpy(), seed=seed)
    return {"value": value, "low": low, "high": high}


def _ends(estimate: Estimate) -> tuple[float, float]:
    """The interval, or the value at both ends when there is none."""
    value = _NAN if estimate["value"] is None else estimate["value"]
    low = value if estimate["low"] is None or np.isnan(estimate["low"]) else estimate["low"]
    high = value if estimate["high"] is None or np.isnan(estimate["high"]) else estimate["high"]
    return low, high


def distribution_summary(
    positions: PositionDivergences, prompt_ids, *, logp_trainer, logp_engine, seed: int = 0
) -> DistributionSummary:
    """Means over positions with intervals over prompts, and the sampled-token k3 at the same positions
    (`logp_trainer`, `logp_engine`: the sampled token's log π and log μ, one per position) against the
    exact value it estimates."""
    clusters = np.asarray(prompt_ids)
    terms = k3_terms(logp_trainer, logp_engine)
    measured = np.isfinite(terms)
    k3 = _mean(terms[measured], clusters[measured], seed)
    expected = _expected_k3(positions, clusters, seed)
    k3_low, k3_high = _ends(k3)
    expected_low, expected_high = _ends(expected)
    agrees = None
    if np.isfinite([k3_low, k3_high, expected_low, expected_high]).all():
        agrees = bool(k3_low <= expected_high and expected_low <= k3_high)
    return {
        "positions": len(clusters),
        "prompts": len(np.unique(clusters)),
        "nucleus": not bool(positions.same_support.all()),
        "kl_engine_trainer": _mean(positions.kl_engine_trainer, clusters, seed),
        "kl_trainer_engine": _mean(positions.kl_trainer_engine, clusters, seed),
        "tv": _mean(positions.tv, clusters, seed),
        "kl_engine_trainer_shared": _mean(positions.kl_engine_trainer_shared, clusters, seed),
        "kl_trainer_engine_shared": _mean(positions.kl_trainer_engine_shared, clusters, seed),
        "engine_mass_outside": _mean(positions.engine_mass_outside, clusters, seed),
        "trainer_mass_outside": _mean(positions.trainer_mass_outside, clusters, seed),
        "positions_infinite_engine_trainer": int(np.isinf(positions.kl_engine_trainer).sum()),
        "positions_infinite_trainer_engine": int(np.isinf(positions.kl_trainer_engine).sum()),
        "positions_disjoint": int(np.isnan(positions.kl_engine_trainer_shared).sum()),
        "k3": k3,
        "k3_tokens": int(measured.sum()),
        "k3_expected": expected,
        "k3_agrees": agrees,
    }


def compare_rows(
    logp_engine: np.ndarray, trainer_chunks: Iterable[tuple[int, np.ndarray]], tokens, prompt_ids, *, seed: int = 0
) -> DistributionSummary:
    """`distribution_summary` of the engine's rows ([positions, vocabulary]) against the trainer's, which
    arrive as (offset, rows) chunks in the same order (one chunk's `divergences` in memory at a time);
    the sampled-token log-probabilities are read from the rows at `tokens`."""
    tokens = np.asarray(tokens)
    parts = []
    logp_trainer = np.full(len(tokens), np.nan)
    for start, chunk in trainer_chunks:
        stop = start + len(chunk)
        parts.append(divergences(logp_engine[start:stop], chunk))
        logp_trainer[start:stop] = chunk[np.arange(len(chunk)), tokens[start:stop]]
    return distribution_summary(
        PositionDivergences.join(parts),
        prompt_ids,
        logp_trainer=logp_trainer,
        logp_engine=logp_engine[np.arange(len(tokens)), tokens].astype(np.float64),
        seed=seed,
    )


def distribution_record(
    rows_planned: int, compared: dict[tuple[str, str], DistributionSummary], unavailable: dict[str, str]
) -> dict:
    """summary.json `distribution`: the rows planned per engine dtype, each (engine, trainer dtype) compared,
    and per engine dtype without rows the one line saying why."""
    return {
        "rows_planned": rows_planned,
        "pairs": [{"engine_dtype": e, "trainer_dtype": t, **values} for (e, t), values in compared.items()],
        "unavailable": unavailable,
    }


def _interval(estimate: Estimate) -> str:
    value = _NAN if estimate["value"] is None else estimate["value"]
    low, high = _ends(estimate)
    if low == value and high == value:
        return f"{value:.3g}"
    return f"{value:.3g} [{low:.3g}, {high:.3g}]"


def agreement_line(summary: DistributionSummary) -> str:
    """The report's line: does the sampled-token k3 agree with the exact value at the same positions?"""
    verdict = {True: "agrees", False: "does not agree", None: "cannot be compared"}[summary["k3_agrees"]]
    where = f"at the same {summary['positions']} positions of {summary['prompts']} prompts"
    k3 = _interval(summary["k3"])
    if not summary["nucleus"]:
        return f"sampled-token k3 {k3} {verdict} with the exact KL[μ‖π] {_interval(summary['k3_expected'])} {where}"
    engine_out = summary["engine_mass_outside"]["value"] or 0.0
    trainer_out = summary["trainer_mass_outside"]["value"] or 0.0
    return (
        f"sampled-token k3 {k3} {verdict} with its exact expectation {_interval(summary['k3_expected'])} {where}; "
        f"KL[μ‖π] on the shared nucleus {_interval(summary['kl_engine_trainer_shared'])}, with {engine_out:.2%} of "
        f"μ's mass outside π's nucleus and {trainer_out:.2%} of π's outside μ's"
    )
