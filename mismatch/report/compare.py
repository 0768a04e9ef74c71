"""Before / after: two runs' metrics side by side, for the pairs both measured."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypedDict

from mismatch.errors import NotComparable
from mismatch.runs import ScanRun

COMPARED = (
    "k3",
    "k1",
    "chi2_token",
    "mean_abs_dp",
    "max_abs_dp",
    "max_ratio",
    "frac_outside_2",
    "seq_kl",
    "log_ppl_diff",
)
SAME_SAMPLING = ("temperature", "top_p")
SETTINGS = ("model", "engine", "prompts", "num_prompts", "samples", "chat_template")


class Comparison(TypedDict):
    """One metric of one pair in two runs (`side_by_side`)."""

    pair: str  # `engine → trainer`
    metric: str
    before: float | None
    after: float | None
    ratio: float | None  # after / before, where both are finite and before is not 0


def _key(pair: Mapping[str, Any]) -> tuple[str, str]:
    return pair["engine_dtype"], pair["trainer_dtype"]


def check_comparable(before: ScanRun, after: ScanRun) -> None:
    """Refuse runs sampled differently (the gap depends on temperature and top-p) or with no pair in common."""
    reasons = []
    for name in SAME_SAMPLING:
        a = before.summary["config"]["sampling"][name]
        b = after.summary["config"]["sampling"][name]
        if a != b:
            reasons.append(f"{name} differs ({a} vs {b}): the mismatch depends on the sampling distribution")
    if not {_key(p) for p in before.pairs} & {_key(p) for p in after.pairs}:
        reasons.append("the runs share no (engine dtype, trainer dtype) pair")
    if reasons:
        raise NotComparable("runs are not comparable: " + "; ".join(reasons))


def differences(before: ScanRun, after: ScanRun) -> list[tuple[str, str, str]]:
    """Settings that differ between the runs: what the comparison is about (or a caveat)."""
    a_config = before.summary["config"]
    b_config = after.summary["config"]
    rows = [
        (name, str(a_config.get(name)), str(b_config.get(name)))
        for name in SETTINGS
        if a_config.get(name) != b_config.get(name)
    ]
    if a_config["sampling"]["max_tokens"] != b_config["sampling"]["max_tokens"]:
        rows.append(("max_tokens", str(a_config["sampling"]["max_tokens"]), str(b_config["sampling"]["max_tokens"])))
    a_class = before.summary.get("machine", {}).get("cpu_class")
    b_class = after.summary.get("machine", {}).get("cpu_class")
    if a_class != b_class:
        rows.append(("CPU class (16-bit kernels differ)", str(a_class), str(b_class)))
    a_versions = before.summary.get("versions", {})
    b_versions = after.summary.get("versions", {})
    rows += [
        (f"{name} version", str(a_versions.get(name)), str(b_versions.get(name)))
        for name in sorted(set(a_versions) | set(b_versions))
        if a_versions.get(name) != b_versions.get(name)
    ]
    return rows


def side_by_side(before: ScanRun, after: ScanRun) -> list[Comparison]:
    """Per shared pair and metric: before, after and after / before."""
    after_pairs = {_key(p): p for p in after.pairs}
    rows: list[Comparison] = []
    for pair in before.pairs:
        other = after_pairs.get(_key(pair))
        if other is None:
            continue
        for metric in COMPARED:
            a = pair.get(metric)
            b = other.get(metric)
            ratio = b / a if a not in (None, 0) and b is not None and math.isfinite(a) and math.isfinite(b) else None
            rows.append(
                {"pair": "{} → {}".format(*_key(pair)), "metric": metric, "before": a, "after": b, "ratio": ratio}
            )
    return rows
