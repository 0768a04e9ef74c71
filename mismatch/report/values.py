"""How a value reads, one formatter per kind, shared by the terminal, report.html and summary.md.

A number that is missing (None: summary.json stores NaN and infinities as null) or not finite reads "—".
"""

from __future__ import annotations

import math

from mismatch.stats.metrics import PairRow

DASH = "—"
SCI = ".2e"  # the default: metrics span many orders of magnitude
FIXED = ".4f"


def number(value: float | int | None, spec: str = SCI) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    return format(value, spec)


def interval(low: float | None, high: float | None, spec: str = SCI) -> str:
    """A confidence interval as the reports print it: `[low, high]`."""
    return f"[{number(low, spec)}, {number(high, spec)}]"


def span(low: float | None, high: float | None, spec: str = SCI) -> str:
    """An interval in a narrow terminal column: `low–high`."""
    return f"{number(low, spec)}–{number(high, spec)}"


def ratio(value: float | None) -> str:
    """A factor (after / before, applied / merged): `0.42×`."""
    return DASH if value is None else f"{value:.3g}×"


def percent(share: float | None) -> str:
    """A share in [0, 1] as a percentage: `12.5%`."""
    return DASH if share is None else f"{100 * share:.3g}%"


def bucket_label(low: float, high: float | None, *, closed: bool = False) -> str:
    """A bucket `[low, high)` (`closed`: `[low, high]`); an infinite top (null in summary.json) reads ∞."""
    if high is None or not math.isfinite(high):
        return f"[{low:g}, ∞)"
    return f"[{low:g}, {high:g}{']' if closed else ')'}"


def tokens_cell(pair: PairRow, *, parenthesised: bool = False) -> str:
    """The measured tokens of a pair, and those left out: non-finite log-probs, tokens sampled outside the
    trainer's nucleus. `1474 +1 non-finite` in the terminal; `1474 (+1 non-finite)` in summary.md."""
    cell = f"{pair['n_tokens']}"
    for count, what in ((pair["n_nonfinite"], "non-finite"), (pair["n_outside_nucleus"], "outside nucleus")):
        if count:
            cell += f" (+{count} {what})" if parenthesised else f" +{count} {what}"
    return cell
