"""The open format, as parquet or jsonl: one row per response token (a scan's tokens.parquet
columns), or one row per sequence whose `token_id` / `logp_engine` / `logp_trainer` are lists.

Files are read in batches and cut at step boundaries, so a dump of any number of steps streams;
a dump without `step` is one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mismatch import runs
from mismatch.dumps.base import OPTIONAL, REQUIRED, Chunk, first_record
from mismatch.errors import DumpError, first_line, parquet_damage

NAME = "open"
SUFFIXES = (".parquet", ".jsonl")
LIST_COLUMNS = (
    "token_id",
    "logp_engine",
    "logp_trainer",
    "logp_trainer_full",
    "log_kept_mass",
    "entropy",
    "loss_mask",
)
BATCH_ROWS = 65_536
# a log-prob computed in BF16 can round a little above 0; a probability or logit is far above
POSITIVE_LIMIT = 0.5
EXPECTED = (
    f"{', '.join(REQUIRED)} (and logp_trainer unless --model is given) per token, or the same as lists per sequence"
)


def files(paths: list[Path]) -> list[Path]:
    """The dump's files: each path itself, or the open-format files in a folder, in name order
    (of a mismatch run folder, its tokens.parquet)."""
    found = []
    for path in paths:
        if (path / runs.SUMMARY).is_file() and (path / runs.TOKENS).is_file():
            found.append(path / runs.TOKENS)
        else:
            found += sorted(p for p in path.iterdir() if p.suffix in SUFFIXES) if path.is_dir() else [path]
    return found


def fields(path: Path) -> set[str]:
    """The column names of a file (parquet schema, or the first jsonl record's keys)."""
    if path.suffix == ".parquet":
        with unreadable(path):
            return set(pq.read_schema(path).names)
    return set(first_record(path) or {})


def unreadable(path: Path):
    """A truncated or damaged parquet dump as one DumpError naming it."""
    return parquet_damage(path, DumpError, "the file is truncated or damaged")


def detect(paths: list[Path]) -> bool:
    found = files(paths)
    return (
        bool(found)
        and all(p.suffix in SUFFIXES and p.is_file() for p in found)
        and set(REQUIRED) - {"position"} <= fields(found[0])
    )


def read(paths: list[Path]) -> Iterator[Chunk]:
    return by_step(_frames(files(paths)))


def _frames(found: list[Path]) -> Iterator[pd.DataFrame]:
    for path in found:
        missing = set(REQUIRED) - {"position"} - fields(path)
        if missing:
            raise DumpError(f"{path}: no {', '.join(sorted(missing))} field; the open format has {EXPECTED}")
        if path.suffix == ".parquet":
            with unreadable(path):
                batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
            while True:
                with unreadable(path):
                    batch = next(batches, None)
                    frame = None if batch is None else batch.to_pandas()
                if frame is None:
                    break
                yield _token_rows(frame, path)
        else:
            frames = iter(pd.read_json(path, lines=True, chunksize=BATCH_ROWS, dtype=False))
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except (ValueError, RecursionError) as exc:
                    raise DumpError(f"{path}: not JSON lines ({first_line(exc)})") from None
                yield _token_rows(frame, path)


def _token_rows(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Sequence rows exploded into token rows (positions 0…n−1); token rows as they are; a value of
    another type than its column's (text ids, nested lists, numbers past int64) is one DumpError."""
    try:
        return _rows(frame, path)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DumpError(f"{path}: {first_line(exc)}; the open format has {EXPECTED}") from None


def _rows(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    if len(frame) and frame["token_id"].map(_is_list).any():
        # an empty response has no token
        frame = frame[frame["token_id"].map(lambda ids: _is_list(ids) and len(ids) > 0)].reset_index(drop=True)
        lists = [c for c in LIST_COLUMNS if c in frame]
        lengths = frame["token_id"].map(len)
        # a null list (π of a μ-only sequence, no mask) is NaN (all True) at every position
        for column in lists[1:]:
            fill = True if column == "loss_mask" else np.nan
            frame[column] = [
                values if _is_list(values) else [fill] * n for values, n in zip(frame[column], lengths, strict=True)
            ]
        for column in lists[1:]:
            if not (frame[column].map(len) == lengths).all():
                raise DumpError(f"{path}: {column} and token_id have different lengths in some sequence")
        if "prompt_ids" in frame:  # the whole response, tool tokens included: the context to rescore
            frame["response_ids"] = frame["token_id"]
        frame = frame.explode(lists, ignore_index=True)
        frame["position"] = _positions(lengths)
        if "loss_mask" in frame:  # a response with tool output: only its sampled tokens are measured
            frame = frame[frame["loss_mask"].astype(bool)].reset_index(drop=True)
    elif "position" not in frame:
        raise DumpError(f"{path}: token rows need a position field; the open format has {EXPECTED}")
    keep = [c for c in (*REQUIRED, *OPTIONAL, "prompt_ids", "response_ids") if c in frame]
    frame = frame[keep]
    for column in ("logp_engine", "logp_trainer", "logp_trainer_full", "log_kept_mass", "temperature", "entropy"):
        if column in frame:
            numbers = pd.to_numeric(frame[column], errors="coerce").astype(np.float64)
            wrong = numbers.isna() & frame[column].notna()  # null is a non-finite value; text or a list is no number
            if wrong.any():
                shown = runs.shown(frame[column][wrong].iloc[0])
                raise DumpError(f"{path}: {column} holds {shown}, not a number; the open format has {EXPECTED}")
            frame[column] = numbers
    for column in ("logp_engine", "logp_trainer"):
        if column in frame and (frame[column] > POSITIVE_LIMIT).any():
            raise DumpError(
                f"{path}: {column} has values above {POSITIVE_LIMIT}: "
                "it must hold log-probabilities (≤ 0), not probabilities or logits"
            )
    if "prompt_index" in frame and frame["prompt_index"].isna().any():  # a sequence without a prompt: its own unit
        frame["prompt_index"] = (
            frame["prompt_index"]
            .astype(object)
            .where(frame["prompt_index"].notna(), "sequence " + frame["seq_id"].astype(str))
        )
    for column in ("seq_id", "prompt_index"):  # ids may be strings (uuids): hashed, the same in every batch
        if column in frame and not pd.api.types.is_integer_dtype(frame[column]):
            numeric = pd.to_numeric(frame[column], errors="coerce")
            whole = numeric.notna().all() and (numeric % 1 == 0).all()
            frame[column] = (
                numeric if whole else pd.util.hash_array(frame[column].astype(str).to_numpy()).view(np.int64)
            )
    for column in ("seq_id", "position", "token_id", "step"):
        if column in frame:
            if frame[column].isna().any():
                raise DumpError(f"{path}: {column} is missing in some rows; the open format has {EXPECTED}")
            frame[column] = frame[column].astype(np.int64)
    if "prompt_index" in frame:
        frame["prompt_index"] = frame["prompt_index"].astype(np.int64)
    if "token" in frame:  # each token's text, for reading: a cell that is not text shows the id
        text = frame["token"].map(lambda token: isinstance(token, str))
        frame["token"] = frame["token"].where(text, "⟨" + frame["token_id"].astype(str) + "⟩")
    return frame


def _ids(values) -> list[int]:
    """Token ids as ints; a fraction or a number past int64 is no token id."""
    ids = np.asarray(values, dtype=np.float64 if len(values) else np.int64)
    if ids.ndim != 1 or not np.array_equal(ids, np.round(ids)) or np.abs(ids).max(initial=0) >= 2**63:
        raise ValueError(f"{runs.shown(values)} are not integers")
    return ids.astype(np.int64).tolist()


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _positions(lengths: pd.Series) -> np.ndarray:
    return np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else np.zeros(0, dtype=np.int64)


def by_step(frames: Iterator[pd.DataFrame]) -> Iterator[Chunk]:
    """Token-row frames regrouped into one chunk per step (rows of a step must be contiguous)."""
    buffer: list[pd.DataFrame] = []
    current: int | None = None
    seen: set[int] = set()
    for frame in frames:
        if "step" not in frame:
            buffer.append(frame)
            continue
        steps = frame["step"].to_numpy()
        starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
        for begin, end in zip(starts, [*starts[1:], len(frame)], strict=True):
            step = int(steps[begin])
            if step != current:
                if buffer:
                    yield _chunk(buffer)
                if step in seen:
                    raise DumpError(f"the rows of step {step} are not together; write (or sort) the dump by step")
                buffer = []
                current = step
                seen.add(step)
            buffer.append(frame.iloc[begin:end])
    if buffer:
        yield _chunk(buffer)


def _chunk(frames: list[pd.DataFrame]) -> Chunk:
    tokens = pd.concat(frames, ignore_index=True)
    contexts: dict[int, tuple[list[int], list[int]]] = {}
    if "prompt_ids" in tokens:
        for seq, rows in tokens.groupby("seq_id", sort=False):
            assert isinstance(seq, (int, np.integer))  # seq_id is an int64 column (`_token_rows`)
            rows = rows.sort_values("position")
            prompt = rows["prompt_ids"].iat[0]
            if not _is_list(prompt):  # null (JSON null, NaN): this sequence cannot be rescored
                continue
            try:
                if "response_ids" in rows:
                    contexts[int(seq)] = (_ids(prompt), _ids(rows["response_ids"].iat[0]))
                # token rows: the response is the rows
                elif np.array_equal(rows["position"].to_numpy(), np.arange(len(rows))):
                    contexts[int(seq)] = (_ids(prompt), rows["token_id"].astype(int).tolist())
            except (TypeError, ValueError, OverflowError) as exc:
                raise DumpError(f"sequence {seq}: prompt_ids is not a list of token ids ({first_line(exc)})") from None
        tokens = tokens.drop(columns=[c for c in ("prompt_ids", "response_ids") if c in tokens])
    return Chunk(tokens, contexts)
