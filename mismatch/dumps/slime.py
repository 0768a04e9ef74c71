"""slime's rollout debug dumps (`--save-debug-rollout-data`, slime/observability/rollout_data_utils.py).

Each `.pt` file is `torch.save({"rollout_id": int, "samples": [Sample.to_dict(), ...]})` for one
rollout (slime/utils/types.py). A sample's response is `tokens[-response_length:]`, with the
engine's log-probs μ in `rollout_log_probs` and the trainable tokens in `loss_mask` (all of them
when it is None; none when `remove_sample` is set, as the trainer does). The dump has no trainer
log-probs, so the chunks have no `logp_trainer` (`analyze --model` rescores the contexts). One chunk
per file, `step` = rollout_id, `prompt_index` = group_index; files in the order of the numbers in
their paths (the `{rollout_id}` of the path template). A folder's evaluation dumps (`eval_<id>.pt`)
are left out: the trainer never sees them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mismatch.dumps.base import Chunk
from mismatch.errors import DumpError

NAME = "slime"
SAMPLE_FIELDS = ("tokens", "response_length", "rollout_log_probs")
EXPECTED = "expected slime's {'rollout_id', 'samples'} dict (--save-debug-rollout-data)"


def files(paths: list[Path]) -> list[Path]:
    """The dump's files: each path itself, or a folder's `*.pt` but `eval_*.pt` (the `rollout_data/`
    folder of a `--dump-details` folder), in rollout order."""
    found = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        if (path / "rollout_data").is_dir():
            path = path / "rollout_data"
        found += [p for p in path.glob("*.pt") if not p.name.startswith("eval_")]
    return sorted(found, key=_numeric_order)


def _numeric_order(path: Path) -> list[tuple[int, int | str]]:
    """Sort key that compares the digit runs of a path as numbers (`9.pt` before `10.pt`)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", str(path)) if part]


def _load(path: Path) -> dict[str, Any]:
    """A rollout dump, checked for its top-level shape (it is a pickle: only load files the user named)."""
    import torch

    try:
        dump = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a non-torch file fails in many ways (zip, pickle, missing class)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DumpError(f"{path}: torch.load failed ({reason}); {EXPECTED}") from None
    if not (
        isinstance(dump, dict) and isinstance(dump.get("rollout_id"), int) and isinstance(dump.get("samples"), list)
    ):
        raise DumpError(f"{path}: {EXPECTED}")
    if "format_version" in dump:
        raise DumpError(f"{path}: a --save-debug-train-data dump; {EXPECTED}")
    return dump


def _is_sample(sample: object) -> bool:
    return isinstance(sample, dict) and all(f in sample for f in SAMPLE_FIELDS)


def detect(paths: list[Path]) -> bool:
    found = files(paths)
    if not found or not all(p.suffix == ".pt" and p.is_file() for p in found):
        return False
    try:
        samples = _load(found[0])["samples"]
    except DumpError:
        return False
    return bool(samples) and _is_sample(samples[0])


def read(paths: list[Path]) -> Iterator[Chunk]:
    for path in files(paths):
        dump = _load(path)
        contexts: dict[int, tuple[list[int], list[int]]] = {}
        frames = _sequences(dump["samples"], dump["rollout_id"], path, contexts)
        if frames:
            yield Chunk(pd.concat(frames, ignore_index=True), contexts)


def _sequences(
    samples: list, step: int, path: Path, contexts: dict[int, tuple[list[int], list[int]]]
) -> list[pd.DataFrame]:
    """The trainable response tokens of one rollout's samples, a frame per sample; each sample's
    (prompt, response) token ids go to `contexts`."""
    indices = [s.get("index") if isinstance(s, dict) else None for s in samples]
    unique = None not in indices and len(set(indices)) == len(indices)
    groups = [s.get("group_index") if isinstance(s, dict) else None for s in samples]
    frames = []
    for number, sample in enumerate(samples):
        if not _is_sample(sample):
            raise DumpError(f"{path}: sample {number} has no {' / '.join(SAMPLE_FIELDS)}; {EXPECTED}")
        tokens = np.asarray(sample["tokens"], dtype=np.int64)
        n = int(sample["response_length"])
        if sample["rollout_log_probs"] is None:
            raise DumpError(
                f"{path}: sample {number} has no rollout_log_probs "
                "(its generate function did not keep the engine's log-probs)"
            )
        mu = np.asarray(sample["rollout_log_probs"], dtype=np.float64)
        mask = np.ones(n, dtype=bool) if sample.get("loss_mask") is None else np.asarray(sample["loss_mask"]) != 0
        for name, values in (("rollout_log_probs", mu), ("loss_mask", mask)):
            if len(values) != n:
                raise DumpError(
                    f"{path}: sample {number} has {len(values)} {name} for response_length {n}; "
                    "the dump is inconsistent"
                )
        if sample.get("remove_sample"):
            mask[:] = False
        if not mask.any():
            continue
        seq_id = int(sample["index"]) if unique else number
        prompt = tokens[: len(tokens) - n]
        response = tokens[len(tokens) - n :]
        columns = {
            "seq_id": np.full(int(mask.sum()), seq_id, dtype=np.int64),
            "position": np.flatnonzero(mask).astype(np.int64),
            "token_id": response[mask],
            "logp_engine": mu[mask],
            "step": np.int64(step),
        }
        frame = pd.DataFrame(columns)
        if None not in groups:
            frame["prompt_index"] = np.int64(sample["group_index"])
        frames.append(frame)
        contexts[seq_id] = (prompt.tolist(), response.tolist())
    return frames
