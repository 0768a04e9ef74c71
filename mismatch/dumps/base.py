"""What every dump reader yields: the open format's token rows, one step at a time.

The open format (README, "Analyze your own run") is the columns of a scan's `tokens.parquet`: one
row per response token the loss sees. A reader turns a framework's files into `Chunk`s of whole
sequences in this layout, so `analyze` never knows which framework wrote them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

REQUIRED = ("seq_id", "position", "token_id", "logp_engine")
OPTIONAL = (
    "logp_trainer",
    "step",
    "prompt_index",
    "engine_dtype",
    "trainer_dtype",
    "token",
    "logp_trainer_full",
    "log_kept_mass",
    "temperature",
    "entropy",
)
# logp_trainer: π, left out when the dump has only μ (then `--model` computes it). prompt_index:
# the prompt (GRPO group) a sequence answers, the unit the intervals resample. temperature: the
# sampling temperature, where the dump records it (the audit's raw-versus-processed check). entropy:
# the trainer's entropy at the position in nats (the gap by entropy bucket, and why it grows over steps).


@dataclass
class Chunk:
    """Whole sequences of one step (or of a dump without steps): token rows in the open format,
    and, where the dump has them, each sequence's context for rescoring: seq_id → (prompt token
    ids, every response token id). `position` indexes the response, so a multi-turn response whose
    tool tokens the loss skips has rows only at the sampled positions."""

    tokens: pd.DataFrame
    contexts: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)


def first_record(path: Path) -> dict | None:
    """The first line of a JSON-lines file as a record, or None if it is not one (detection peeks here)."""
    try:
        with path.open(encoding="utf-8") as handle:
            line = handle.readline()
        record = json.loads(line)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5,000-digit number, nested past the stack
        return None
    return record if isinstance(record, dict) else None
