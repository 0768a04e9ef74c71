"""The drift of a per-step metric over training: its trend, and the step where it departs from
its start (the paper's observation: the mismatch grows as the policy moves)."""

from __future__ import annotations

import numpy as np

DRIFT_METRICS = ("k3", "mean_abs_dp", "min_ratio", "max_ratio", "frac_outside_2")
FACTOR = 2.0  # "departed": the metric's distance from its baseline more than doubles its start …
SUSTAIN = 3  # … and stays so for this many consecutive steps (or to the last step)
LOG_SCALE = {"k3", "mean_abs_dp", "frac_outside_2", "max_ratio"}  # trends read as factors


def baseline_steps(n_steps: int) -> int:
    """Steps that make up the start: a tenth of the run, at least 3 (but never all of it)."""
    return max(1, min(max(3, n_steps // 10), n_steps - 1))


def drift(steps, values, metric: str) -> dict:
    """Trend (the least-squares line from the first to the last step; for positive metrics of
    `LOG_SCALE` a factor, fitted on the log) and the
    first step from which the metric stays beyond FACTOR× its baseline (the median of the first
    steps) for SUSTAIN steps; for `min_ratio` "beyond" means below baseline / FACTOR."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    out = {"metric": metric, "steps": int(len(steps)), "trend": float("nan"), "trend_kind": "factor" if metric in LOG_SCALE else "difference",
           "baseline": float("nan"), "departs_at": None, "last": float(values[-1]) if len(values) else float("nan")}  # fmt: skip
    if len(steps) < 2:
        return out
    y = np.log(np.maximum(values, 1e-300)) if metric in LOG_SCALE else values
    slope = float(np.polyfit(steps, y, 1)[0]) if np.ptp(steps) > 0 else float("nan")
    span = steps[-1] - steps[0]
    out["trend"] = float(np.exp(slope * span)) if metric in LOG_SCALE else slope * span
    start = baseline_steps(len(steps))
    base = float(np.median(values[:start]))
    out["baseline"] = base
    beyond = values < base / FACTOR if metric == "min_ratio" else values > base * FACTOR
    for i in range(start, len(values)):
        run = beyond[i : i + SUSTAIN]
        if run.all() and (len(run) == SUSTAIN or i + len(run) == len(values)):
            out["departs_at"] = int(steps[i])
            break
    return out
