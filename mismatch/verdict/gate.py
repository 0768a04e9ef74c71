"""The CI gate: `--fail-on "k3>1e-3"` or `--fail-on "bf16/bf16:max_abs_dp>0.5"`.

A condition describes failure; without a pair it applies to every pair of equal engine and
trainer dtype in the run.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import KW_ONLY, dataclass
from typing import TypedDict

from mismatch.errors import ConfigError
from mismatch.records import DTYPE_NAMES
from mismatch.stats.metrics import INTERVALS, METRICS, NUCLEUS_METRICS, PairRow

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_SYNTAX = re.compile(
    r"^\s*(?:(?P<engine>\w+)/(?P<trainer>\w+)\s*:)?\s*(?P<metric>\w+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>\S+)\s*$"
)
GATED = (*METRICS, *NUCLEUS_METRICS, "n_nonfinite", *INTERVALS)


@dataclass(frozen=True)
class Condition:
    text: str
    metric: str
    op: str
    threshold: float
    _: KW_ONLY
    pair: tuple[str, str] | None = None

    def pairs_in(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [self.pair] if self.pair else [(e, t) for e, t in pairs if e == t]


def parse_condition(text: str, sides: tuple[str, ...] = DTYPE_NAMES) -> Condition:
    """Parse one `--fail-on` expression, a named pair's sides among `sides`; ConfigError with the accepted
    syntax otherwise."""
    match = _SYNTAX.match(text)
    usage = 'expected [ENGINE/TRAINER:]METRIC(>|>=|<|<=)NUMBER, e.g. "k3>1e-3" or "bf16/bf16:max_abs_dp>0.5"'
    if not match:
        raise ConfigError(f"--fail-on {text!r}: {usage}")
    if match["metric"] not in GATED:
        raise ConfigError(f"--fail-on {text!r}: unknown metric {match['metric']!r}; one of {', '.join(GATED)}")
    try:
        threshold = float(match["value"])
    except ValueError:
        raise ConfigError(f"--fail-on {text!r}: {match['value']!r} is not a number; {usage}") from None
    pair = None
    if match["engine"]:
        pair = (match["engine"], match["trainer"])
        if not set(pair) <= set(sides):
            raise ConfigError(f"--fail-on {text!r}: a pair's sides must be among {', '.join(sides)}")
    return Condition(text.strip(), match["metric"], match["op"], threshold, pair=pair)


def check_pairs(conditions: list[Condition], scanned: list[tuple[str, str]]) -> None:
    """Refuse conditions that name a pair the scan will not measure, or that match no pair at all."""
    for condition in conditions:
        if condition.pair and condition.pair not in scanned:
            raise ConfigError(
                f"--fail-on {condition.text!r}: the scan does not measure {'/'.join(condition.pair)} "
                f"(pairs: {', '.join('/'.join(p) for p in scanned)})"
            )
        if not condition.pairs_in(scanned):
            raise ConfigError(
                f"--fail-on {condition.text!r}: no pair of equal dtypes to apply it to; name one as ENGINE/TRAINER:"
            )


class GateResult(TypedDict):
    """summary.json's `gate`: the conditions as given, and what failed or could not be measured."""

    conditions: list[str]
    failed: list[str]
    not_measured: list[str]


def evaluate(conditions: list[Condition], pairs: list[PairRow], *, every_pair: bool = False) -> GateResult:
    """Each failure says which pair and what value; a metric that is undefined for a pair (e.g. the
    length slope when every response has the same length) is listed as not measured, never as a failure.
    A condition naming no pair applies to the pairs of equal dtypes, or with `every_pair` to each pair
    (an analysed dump's pairs are its engine against its trainer, never equal dtypes)."""
    by_pair = {(p["engine_dtype"], p["trainer_dtype"]): p for p in pairs}
    failed: list[str] = []
    not_measured: list[str] = []
    for condition in conditions:
        for pair in list(by_pair) if every_pair and not condition.pair else condition.pairs_in(list(by_pair)):
            name = f"{'/'.join(pair)}:{condition.metric}"
            if pair not in by_pair:  # e.g. an engine dtype the engine refused for this model
                not_measured.append(f"{name}: the pair was not measured (gate {condition.text} not applied)")
                continue
            value = by_pair[pair].get(condition.metric)
            if not isinstance(value, int | float) or math.isnan(value):  # None: NaN read back from summary.json
                not_measured.append(f"{name} is undefined for this run (gate {condition.text} not applied)")
            elif OPERATORS[condition.op](value, condition.threshold):
                failed.append(f"{name} = {value:.4g} {condition.op} {condition.threshold:g}")
    return {"conditions": [c.text for c in conditions], "failed": failed, "not_measured": not_measured}
