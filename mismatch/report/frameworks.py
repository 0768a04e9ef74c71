"""Ready-to-paste settings per framework for each verdict, and metric names across frameworks."""

from __future__ import annotations

METRIC_NOTES: list[dict] = [
    {"name": "k3", "definition": "mean(e^ℓ − 1 − ℓ)", "verl": "—", "trl": "—"},
]


def settings_for(verdict: str) -> list[dict]:
    return []
