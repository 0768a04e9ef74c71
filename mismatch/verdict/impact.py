"""What the gradient impact says in words: how the bias from the mismatch compares with one step's
noise at the user's batch size, and from which batch size on they are equal (B*).

B* compares one step's bias with one step's noise. Noise averages out over steps and a persistent
bias does not, so no sentence here calls a gap harmless below B*: it says where the bias rivals the
noise of a single step.
"""

from __future__ import annotations

from mismatch.stats.impact import Estimate, ImpactResult

PERSISTENT = "noise averages out over steps, a persistent bias does not"


def _percent(value: float | None) -> str:
    """Two significant digits, never in exponent form: 0.71%, 16%, 140%."""
    if value is None:
        return "—"
    share = 100 * value
    return f"{share:.0f}%" if share >= 10 else f"{share:.2g}%"


def _count(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _range(estimate: Estimate, text=_percent) -> str:
    low = estimate["low"]
    high = estimate["high"]
    if low is None and high is None:
        return ""
    return f" (95% interval {text(low)}–{text(high)})"


def impact_batch(impact: ImpactResult) -> int:
    """The batch the sentence speaks of: the user's (`--train-batch`), else the one measured."""
    return impact["user_batch"] or impact["sequences"]


def impact_sentence(dtype: str, impact: ImpactResult) -> str:
    """One sentence per engine dtype, built from summary.json `impact` only."""
    name = dtype.upper()
    if not impact["measurable"]:
        return f"{name}: the gradient impact is not measurable on this batch ({impact['reason']})."
    batch = impact_batch(impact)
    ratio = impact["bias_to_noise_at_user_batch"] or impact["bias_to_noise"]
    star = impact["batch_star"]
    measured = f"measured on {impact['sequences']} sequences, {impact['group_size']} per prompt"
    if star["low"] is not None:
        return (
            f"At a batch of {batch:,} sequences the {name} gradient's bias from the mismatch is"
            f" {_percent(ratio['value'])} of one step's noise{_range(ratio)};"
            f" they are equal at B* ≈ {_count(star['value'])} sequences{_range(star, _count)}"
            f" ({measured}; {PERSISTENT})."
        )
    bound = impact["batch_star_at_least"]
    limit = f"; B* > {_count(bound)} sequences" if bound is not None else ""
    return (
        f"At a batch of {batch:,} sequences the {name} gradient's bias from the mismatch is not distinguishable from 0"
        f" (at most {_percent(ratio['high'])} of one step's noise){limit} ({measured}; {PERSISTENT})."
    )


def impact_summary(impact: dict[str, ImpactResult]) -> str:
    """The sentences of every engine dtype measured, BF16 first."""
    order = sorted(impact, key=lambda d: (d != "bf16", d))
    return " ".join(impact_sentence(d, impact[d]) for d in order)
