"""The drift of a per-step metric over training: its trend, and the step where it departs from
its start (the paper's observation: the mismatch grows as the policy moves)."""

from __future__ import annotations

from typing import TypedDict

import numpy as np

DRIFT_METRICS = ("k3", "mean_abs_dp", "min_ratio", "max_ratio", "frac_outside_2")
FACTOR = 2.0  # "departed": the metric beyond FACTOR × its baseline (below baseline / FACTOR for min_ratio) …
SUSTAIN = 3  # … for this many consecutive steps
FLOOR = {"k3": 1e-6, "mean_abs_dp": 1e-4, "frac_outside_2": 1e-3}  # … and above this (a baseline of 0 doubles to 0)
LOG_SCALE = {"k3", "mean_abs_dp", "frac_outside_2", "max_ratio"}  # trends read as factors where every value is > 0


def baseline_steps(n_steps: int) -> int:
    """Steps that make up the start: a tenth of the run, at least 3 (but never all of it)."""
    return max(1, min(max(3, n_steps // 10), n_steps - 1))


class Drift(TypedDict):
    """A metric over the run (`drift`)."""

    metric: str
    steps: int  # with a finite value
    trend: float  # a factor or a difference (`trend_kind`) from first to last step; NaN under two steps
    trend_kind: str  # factor | difference
    baseline: float  # the median of the first steps
    departs_at: int | None
    last: float


class DriftRow(Drift):
    """One row of summary.json's `drift` (analyze): the pair, then its `Drift`."""

    pair: str


def drift(steps, values, metric: str) -> Drift:
    """Trend over the run (the least-squares line from first to last step; for the metrics of
    `LOG_SCALE`, fitted on the log and read as a factor, when every value is positive) and the first
    step from which the metric stays beyond FACTOR × its baseline (the median of the first steps)
    and above its FLOOR, for SUSTAIN steps."""
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    steps = np.asarray(steps, dtype=np.float64)[keep]
    values = values[keep]
    factor = metric in LOG_SCALE and bool(np.all(values > 0))
    out: Drift = {
        "metric": metric,
        "steps": int(len(steps)),
        "trend": float("nan"),
        "trend_kind": "factor" if factor else "difference",
        "baseline": float("nan"),
        "departs_at": None,
        "last": float(values[-1]) if len(values) else float("nan"),
    }
    if len(steps) < 2 or np.ptp(steps) == 0:
        return out
    slope = float(np.polyfit(steps, np.log(values) if factor else values, 1)[0])
    span = steps[-1] - steps[0]
    out["trend"] = float(np.exp(slope * span)) if factor else slope * span
    start = baseline_steps(len(steps))
    base = float(np.median(values[:start]))
    out["baseline"] = base
    beyond = (
        values < base / FACTOR
        if metric == "min_ratio"
        else (values > base * FACTOR) & (values > FLOOR.get(metric, 0.0))
    )
    for i in range(start, len(values) - SUSTAIN + 1):
        if beyond[i : i + SUSTAIN].all():
            out["departs_at"] = int(steps[i])
            break
    return out
