"""prime-rl's trainer token exports (`enable_token_export`, src/prime_rl/trainer/rl/token_export.py).

The trainer writes `<run_dir>/token_exports/step_<n>/rank_<r>.jsonl`: one JSON record per sample
(each packed micro-batch split back into its sequences), with per-token lists aligned to
`token_ids` (prompt and tool tokens included). The reader keeps the tokens whose `loss_mask` is
True, with μ = `inference_logprobs` and π = `trainer_logprobs`; the response starts at the first
loss-masked token, so `position` counts from there and the tokens before it are the prompt.
Non-finite values, written as JSON null, become NaN. One chunk per step, steps in numeric order,
every rank of a step together; the export has no prompt (group) id.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from mismatch.dumps.base import Chunk, first_record
from mismatch.errors import DumpError, first_line

NAME = "prime-rl"
FIELDS = ("token_ids", "loss_mask", "inference_logprobs", "trainer_logprobs")
EXPECTED = f"prime-rl token-export records ({', '.join(FIELDS)}, step, rank; trainer enable_token_export)"


def files(paths: list[Path]) -> list[Path]:
    """The export's rank files: each file itself; in a folder (the run dir, `token_exports`, or a
    `step_<n>` folder) its `rank_*.jsonl` and `step_*/rank_*.jsonl`."""
    found = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        if (path / "token_exports").is_dir():
            path = path / "token_exports"
        found += sorted(path.glob("rank_*.jsonl")) + sorted(path.glob("step_*/rank_*.jsonl"))
    return found


def detect(paths: list[Path]) -> bool:
    found = files(paths)
    if not found or not all(p.suffix == ".jsonl" and p.is_file() for p in found):
        return False
    record = first_record(found[0])
    return record is not None and set(FIELDS) <= set(record)


def read(paths: list[Path]) -> Iterator[Chunk]:
    by_step: dict[int, list[tuple[int, Path]]] = defaultdict(list)
    for path in files(paths):
        record = first_record(path)
        if record is None or not {*FIELDS, "step", "rank"} <= set(record):
            raise DumpError(f"{path}: not {EXPECTED}")
        step = record.get("export_step", record["step"])  # multi-run exports: the run's step
        if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63 for n in (step, record["rank"])):
            raise DumpError(f"{path}: step and rank are not whole numbers ≥ 0; expected {EXPECTED}")
        by_step[step].append((record["rank"], path))
    for step in sorted(by_step):
        frames: list[pd.DataFrame] = []
        contexts: dict[int, tuple[list[int], list[int]]] = {}
        for _, path in sorted(by_step[step]):
            frames += _sequences(path, contexts)
        if frames:
            tokens = pd.concat(frames, ignore_index=True)
            tokens["step"] = np.int64(step)
            yield Chunk(tokens, contexts)


def _sequences(path: Path, contexts: dict[int, tuple[list[int], list[int]]]) -> list[pd.DataFrame]:
    """The loss-masked token rows of each record in a rank file; each sequence's seq_id is the next
    free one in `contexts`, where its (prompt, response) token ids go."""
    frames = []
    for where, record in _records(path):
        columns = _columns(record, where)
        mask = columns["loss_mask"]
        if not mask.any():
            continue
        first = int(np.argmax(mask))
        seq_id = len(contexts)
        ids = columns["token_ids"]
        frame = {
            "seq_id": np.full(int(mask.sum()), seq_id, dtype=np.int64),
            "position": np.flatnonzero(mask).astype(np.int64) - first,
            "token_id": ids[mask],
            "logp_engine": columns["inference_logprobs"][mask],
            "logp_trainer": columns["trainer_logprobs"][mask],
        }
        frames.append(pd.DataFrame(frame))
        contexts[seq_id] = (ids[:first].tolist(), ids[first:].tolist())
    return frames


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """Each record of a rank file, with where it is (`path:line`), read line by line; a line that is
    not UTF-8 or not a JSON object is a DumpError."""
    with path.open(encoding="utf-8") as handle:
        number = 0
        while True:
            number += 1
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                raise DumpError(
                    f"{path}: not UTF-8 text (byte {exc.start} near line {number}); expected {EXPECTED}"
                ) from None
            if not line:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise DumpError(
                    f"{path}:{number}: not a JSON record ({first_line(exc)}); expected {EXPECTED}"
                ) from None
            if not isinstance(record, dict):
                raise DumpError(f"{path}:{number}: not a JSON object; expected {EXPECTED}")
            yield f"{path}:{number}", record


def _columns(record: dict, where: str) -> dict[str, np.ndarray]:
    """A record's aligned lists as arrays (null → NaN), checked for presence and equal length."""
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise DumpError(f"{where}: no {', '.join(missing)} field; expected {EXPECTED}")
    types = {"token_ids": np.int64, "loss_mask": bool, "inference_logprobs": np.float64, "trainer_logprobs": np.float64}
    columns = {}
    for name, kind in types.items():
        values = record[name]
        try:
            columns[name] = np.asarray(values, dtype=kind)
        except (TypeError, ValueError, OverflowError) as exc:  # null token ids, numbers past int64, nested lists
            raise DumpError(f"{where}: {name} cannot be read ({first_line(exc)}); expected {EXPECTED}") from None
        if not isinstance(values, list) or columns[name].ndim != 1:
            raise DumpError(f"{where}: {name} is not a list of numbers; expected {EXPECTED}")
    if len({len(c) for c in columns.values()}) > 1:
        lengths = ", ".join(f"{name} {len(c)}" for name, c in columns.items())
        raise DumpError(
            f"{where}: the per-token lists differ in length ({lengths}); the record is truncated or not a token export"
        )
    return columns
