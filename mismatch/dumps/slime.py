"""slime's rollout debug dumps (`--save-debug-rollout-data`, slime/observability/rollout_data_utils.py).

Each `.pt` file is `torch.save({"rollout_id": int, "samples": [Sample.to_dict(), ...]})` for one
rollout (slime/utils/types.py). A sample's response is `tokens[-response_length:]`, with the
engine's log-probs μ in `rollout_log_probs` and the trainable tokens in `loss_mask` (all of them
when it is None; none when `remove_sample` is set, as the trainer does). The dump has no trainer
log-probs, so the chunks have no `logp_trainer` (`analyze --model` rescores the contexts). One chunk
per file, `step` = rollout_id, `prompt_index` = group_index; files in the order of the numbers in
their paths (the `{rollout_id}` of the path template). A folder's evaluation dumps (`eval_<id>.pt`)
are left out: the trainer never sees them.

A `.pt` file is a pickle, and unpickling can run any code, so dumps are loaded with
`torch.load(weights_only=True)`: containers, numbers, strings and tensors, plus the numpy arrays
slime stores (`safe_globals`), and nothing else. A file that names any other callable is refused
before anything in it runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np
import pandas as pd

from mismatch.dumps.base import Chunk
from mismatch.errors import DumpError, first_line

NAME = "slime"
SAMPLE_FIELDS = ("tokens", "response_length", "rollout_log_probs")
EXPECTED = "expected slime's {'rollout_id', 'samples'} dict (--save-debug-rollout-data)"
# numeric numpy dtypes whose arrays a dump may hold (the class is what the unpickler rebuilds)
NUMPY_DTYPES = "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64".split()


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


def safe_globals() -> list:
    """What a rollout dump may hold beyond `weights_only`'s own types: numpy arrays. slime v0.2.2 to
    v0.3.0 keep `rollout_routed_experts` (routing replay) as `np.frombuffer(…, dtype=np.int32).reshape(…)`
    (slime/rollout/sglang_rollout.py, THUDM/slime@bf14dc21f9500746447f2572d0692e981c4d2a7e, v0.3.0);
    v0.3.1 keeps a tensor. `Sample.to_dict()` turns its enum and dataclasses into str and dicts
    (slime/utils/types.py, THUDM/slime@624b824a898ab0ec1fcb4d373004c7f3852bf515). An array is rebuilt
    by `_reconstruct` (`numpy.core` before numpy 2, `numpy._core` since) and its dtype's class."""
    reconstruct = np.ndarray(0).__reduce__()[0]
    return [
        *((reconstruct, f"{module}.multiarray._reconstruct") for module in ("numpy._core", "numpy.core")),
        np.ndarray,
        np.dtype,
        *(type(np.dtype(kind)) for kind in NUMPY_DTYPES),
    ]


def _unpickle(path: Path) -> object:
    """The object a `.pt` file holds, loaded without running code from it."""
    import torch

    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except UnpicklingError as exc:  # weights_only stopped before anything it does not allow was called
        message = str(exc)  # torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module …"
        call = re.search(r"GLOBAL ([\w.]+)", message)
        if call is None:
            reason = re.search(r"WeightsUnpickler error: ([^\n]+)", message)
            text = reason.group(1).strip() if reason else first_line(exc)
            raise DumpError(f"{path}: torch.load failed ({text}); {EXPECTED}") from None
        raise DumpError(
            f"{path}: refused: unpickling it would call {call.group(1)}, which a slime rollout dump never holds "
            f"(.pt files are loaded with torch.load(weights_only=True), so no code in them runs); {EXPECTED}"
        ) from None
    except Exception as exc:  # a non-torch file fails in many ways (zip, pickle, truncation, memory)
        raise DumpError(f"{path}: torch.load failed ({first_line(exc)}); {EXPECTED}") from None


def _load(path: Path) -> dict[str, Any]:
    return _checked(_unpickle(path), path)


def _checked(dump: object, path: Path) -> dict[str, Any]:
    """A rollout dump, checked for its top-level shape."""
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
    dump = _unpickle(found[0])  # a .pt that cannot be loaded safely is refused here, in its own words
    try:
        samples = _checked(dump, found[0])["samples"]
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
    unique = all(_is_int(i) for i in indices) and len(set(indices)) == len(indices)
    grouped = all(isinstance(s, dict) and _is_int(s.get("group_index")) for s in samples)
    frames = []
    for number, sample in enumerate(samples):
        if not _is_sample(sample):
            raise DumpError(f"{path}: sample {number} has no {' / '.join(SAMPLE_FIELDS)}; {EXPECTED}")
        if sample["rollout_log_probs"] is None:
            raise DumpError(
                f"{path}: sample {number} has no rollout_log_probs "
                "(its generate function did not keep the engine's log-probs)"
            )
        seq_id = int(sample["index"]) if unique else number
        group = sample["group_index"] if grouped else None
        try:
            frame, context = _sample_rows(sample, seq_id, step, group, where=f"{path}: sample {number}")
        except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # of another type or shape (a tensor)
            raise DumpError(f"{path}: sample {number}: {first_line(exc)}; {EXPECTED}") from None
        if frame is None:
            continue
        frames.append(frame)
        contexts[seq_id] = context
    return frames


def _sample_rows(
    sample: dict, seq_id: int, step: int, group: int | None, *, where: str
) -> tuple[pd.DataFrame | None, tuple[list[int], list[int]]]:
    """A sample's trainable response tokens (None when it has none) and its (prompt, response) token ids."""
    tokens = np.asarray(sample["tokens"], dtype=np.int64)
    n = int(sample["response_length"])
    mu = np.asarray(sample["rollout_log_probs"], dtype=np.float64)
    mask = np.ones(n, dtype=bool) if sample.get("loss_mask") is None else np.asarray(sample["loss_mask"]) != 0
    if tokens.ndim != 1 or not 0 <= n <= len(tokens):
        raise DumpError(f"{where} has response_length {n} for {tokens.size} tokens; {EXPECTED}")
    for name, values in (("rollout_log_probs", mu), ("loss_mask", mask)):
        if values.ndim != 1 or len(values) != n:
            raise DumpError(f"{where} has {values.size} {name} for response_length {n}; the dump is inconsistent")
    if sample.get("remove_sample"):
        mask[:] = False
    prompt = tokens[: len(tokens) - n]
    response = tokens[len(tokens) - n :]
    context = (prompt.tolist(), response.tolist())
    if not mask.any():
        return None, context
    columns = {
        "seq_id": np.full(int(mask.sum()), seq_id, dtype=np.int64),
        "position": np.flatnonzero(mask).astype(np.int64),
        "token_id": response[mask],
        "logp_engine": mu[mask],
        "step": np.int64(step),
    }
    if group is not None:
        columns["prompt_index"] = np.int64(group)
    return pd.DataFrame(columns), context


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
