"""The readers under hostile and broken input.

A crafted .pt whose unpickling would write a file is refused and nothing in it runs. A truncated or
damaged file met by `scan --resume`, `report`, `compare`, `analyze` or `diagnose --from` is one line
and exit 2. And a seeded mutator of real files (prompt files; the open format as parquet and JSON
lines; prime-rl and slime dumps; scan and analyze run folders, read as `report`, `compare` and
`diagnose --from` read them) finds no traceback: every reader reads, or refuses in one line.

`MISMATCH_FUZZ_CASES` sets how many mutated inputs a run makes (FUZZ_CASES by default). A crash is
reported with its target and seed; `fuzz_case(target, seed, ...)` replays it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import SHARED_SCAN
from typer.testing import CliRunner, Result

from mismatch import runs
from mismatch.cli import app, scanned_settings
from mismatch.config import DiagnoseConfig
from mismatch.dumps import find_reader
from mismatch.errors import MismatchError
from mismatch.inputs.prompts import load_prompts
from mismatch.report.compare import check_comparable

FUZZ_CASES = 1200  # mutated inputs in the default run (the README's "When something is wrong" quotes it)
CASES = int(os.environ.get("MISMATCH_FUZZ_CASES", FUZZ_CASES))
README = Path(__file__).parent.parent / "README.md"

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [*map(str, args)])


def one_line_refusal(result, *names: str) -> str:
    """The error line of a command that exited 2: one line, the last on stderr, no traceback; it
    names each of `names`."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(name in errors[0] for name in names), errors[0]
    return errors[0]


# --- no code runs from a dump -----------------------------------------------------------------


class WritesAFile:
    """Unpickling this calls Path.write_text: a dump that would run code on the machine reading it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.write_text, (self.target, "ran code from a dump")


class RunsAShell:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _slime_sample(payload=None) -> dict:
    return {
        "index": 0,
        "group_index": 0,
        "tokens": [1, 2, 3, 4],
        "response_length": 2,
        "rollout_log_probs": [-0.5, -0.25],
        "loss_mask": [1, 1],
        "status": "completed",
        "metadata": {} if payload is None else {"note": payload},
    }


@pytest.mark.parametrize("payload", [WritesAFile, RunsAShell])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(payload, tmp_path):
    control = tmp_path / "control.pt"  # the same payload, loaded the unsafe way: it does run
    torch.save({"rollout_id": 1, "samples": [_slime_sample(payload(tmp_path / "control-ran"))]}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-ran").exists()

    dump = tmp_path / "dump"
    dump.mkdir()
    target = tmp_path / "ran"
    torch.save({"rollout_id": 1, "samples": [_slime_sample(payload(target))]}, dump / "1.pt")
    line = one_line_refusal(cli("analyze", dump, "--out", tmp_path / "a"), "1.pt", "refused", "weights_only=True")
    assert not target.exists()
    assert "system" in line or "getattr" in line or "write_text" in line  # the callable it would have called


# --- truncated or damaged files, met by each command ----------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_footer(path: Path) -> None:
    """Parquet's footer (the schema and where each column is) overwritten: the data pages stay whole."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    for at in range(len(data) - 8 - footer, len(data) - 8, 3):
        data[at] ^= 0xA5
    path.write_bytes(bytes(data))


DAMAGES = {"truncated": truncate, "flipped": flip_footer}


@pytest.fixture
def scan_copy(shared_scan, tmp_path):
    """A copy of the shared hf scan's folder, to damage."""
    out, _, _ = shared_scan("hf")
    copy = tmp_path / "scan"
    shutil.copytree(out, copy)
    return copy


@pytest.mark.parametrize("damage", DAMAGES)
def test_report_and_compare_name_a_damaged_parquet_in_one_line(scan_copy, shared_scan, damage, tmp_path):
    DAMAGES[damage](scan_copy / "tokens.parquet")
    one_line_refusal(cli("report", scan_copy), "tokens.parquet", "run the command that wrote it again")
    original, _, _ = shared_scan("hf")
    result = cli("compare", original, scan_copy, "--out", tmp_path / "c")
    one_line_refusal(result, "tokens.parquet")


@pytest.mark.parametrize("damage", DAMAGES)
def test_analyze_names_a_damaged_parquet_dump_in_one_line(scan_copy, damage, tmp_path):
    DAMAGES[damage](scan_copy / "tokens.parquet")
    one_line_refusal(cli("analyze", scan_copy / "tokens.parquet", "--out", tmp_path / "a"), "tokens.parquet")


def test_a_damaged_summary_or_jsonl_is_one_line(scan_copy, tmp_path):
    truncate(scan_copy / "summary.json")
    one_line_refusal(cli("report", scan_copy), "summary.json", "not valid JSON")
    lines = tmp_path / "dump.jsonl"
    lines.write_text(
        json.dumps({"seq_id": 0, "token_id": [1, 2], "logp_engine": [-0.1, -0.2]}) + "\n" + '{"seq_id": 1, "tok'
    )
    one_line_refusal(cli("analyze", lines, "--out", tmp_path / "a"), "dump.jsonl", "not JSON lines")


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_names_damaged_saved_rollouts_in_one_line(scan_copy, tiny_model, damage):
    summary = json.loads((scan_copy / "summary.json").read_text())
    (scan_copy / "summary.json").write_text(json.dumps(summary | {"complete": False}))
    DAMAGES[damage](scan_copy / "rollouts.parquet")
    result = cli("scan", "--model", tiny_model, "--engine", "hf", *SHARED_SCAN, "--out", scan_copy, "--resume")
    one_line_refusal(result, "rollouts.parquet", "run the command that wrote it again")


@pytest.mark.parametrize("damage", DAMAGES)
def test_diagnose_from_names_damaged_rollouts_in_one_line(scan_copy, damage, tmp_path):
    DAMAGES[damage](scan_copy / "rollouts.parquet")
    one_line_refusal(cli("diagnose", "--from", scan_copy, "--out", tmp_path / "d"), "rollouts.parquet")


def test_an_edited_summary_is_one_line_naming_the_field(scan_copy, tmp_path):
    summary = json.loads((scan_copy / "summary.json").read_text())
    (scan_copy / "summary.json").write_text(json.dumps(summary | {"config": summary["config"] | {"samples": "2"}}))
    one_line_refusal(cli("diagnose", "--from", scan_copy, "--out", tmp_path / "d"), "config.samples", "'2'")
    (scan_copy / "summary.json").write_text(json.dumps(summary | {"pairs": [{"engine_dtype": 3}]}))
    one_line_refusal(cli("report", scan_copy), str(scan_copy), "not what this mismatch writes")


def test_markup_in_a_refusal_is_printed_as_it_is(tmp_path):
    """A path or a saved value that reads as console markup is printed verbatim, not parsed (a closing
    tag no tag opened would otherwise end in a traceback)."""
    folder = tmp_path / "a[" / "x] [bold]run"  # the path reads a[/x] [bold]run
    folder.mkdir(parents=True)
    one_line_refusal(cli("report", folder), "a[/x] [bold]run has no summary.json")


# --- the seeded mutator ---------------------------------------------------------------------

# values a field should never hold, and a few it might: every JSON type, the edges of int64 and
# float64, non-finite numbers, markup and control characters, empty and nested containers
ODD: list[object] = [
    None,
    True,
    0,
    -1,
    7,
    2**63,
    -(2**63) - 1,
    0.5,
    -1e308,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x",
    "[/x] [bold]",
    "a\nb\r\x00",
    "é\u2028",
    [],
    [None],
    [1, "2", 3.5],
    [[1, 2], [3]],
    ["a", "b"],
    [-1e308, math.nan],
    {},
    {"a": [1]},
]
# raw JSON text no Python value writes: a number past int conversion's digit limit, past float's
# range, and nesting past the interpreter's stack
RAW = ["1" * 5000, "-1e999", "[" * 30000 + "]" * 30000]
RAW_MARK = "\x01raw:"


def odd_value(rng: random.Random, value: object) -> object:
    """A value for a field that holds `value`: an odd one, or `value` of the wrong size."""
    pick = rng.random()
    if pick < 0.1:
        return f"{RAW_MARK}{rng.randrange(len(RAW))}"
    if pick < 0.2 and isinstance(value, list):
        return value[: rng.randrange(len(value) + 1)] if rng.random() < 0.5 else value * rng.randint(2, 3)
    if pick < 0.25 and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return rng.choice(ODD)


def mutate_json(value: object, rng: random.Random, depth: int = 0) -> object:
    """`value` (JSON-like) with one change at a random depth: a value replaced, a key dropped or
    added, a list element duplicated or dropped."""
    if isinstance(value, (dict, list)) and value and (depth == 0 or rng.random() < 0.75):
        copy: dict | list = dict(value) if isinstance(value, dict) else list(value)
        keys = list(copy) if isinstance(copy, dict) else list(range(len(copy)))
        key = rng.choice(keys)
        pick = rng.random()
        if pick < 0.12:
            del copy[key]
        elif pick < 0.18 and isinstance(copy, dict):
            copy[rng.choice(["", "x", "__class__", "format_version", "kind"])] = rng.choice(ODD)
        elif pick < 0.24 and isinstance(copy, list):
            copy.insert(key, copy[key])
        else:
            copy[key] = mutate_json(copy[key], rng, depth + 1)
        return copy
    return odd_value(rng, value)


def dumps(value: object) -> str:
    """JSON text of a mutated value, its RAW marks replaced by their raw text."""
    text = json.dumps(value, ensure_ascii=False)
    for number, raw in enumerate(RAW):
        text = text.replace(json.dumps(f"{RAW_MARK}{number}", ensure_ascii=False), raw)
    return text


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """`data` truncated, with bytes flipped, inserted, dropped, repeated or zeroed."""
    n = len(data)
    at = rng.randrange(n + 1)
    end = min(n, at + rng.randint(1, 64))
    pick = rng.randrange(6)
    if pick == 0:
        return data[:at]
    if pick == 1:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if flipped:
                flipped[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    if pick == 2:
        return data[:at] + rng.randbytes(rng.randint(1, 32)) + data[at:]
    if pick == 3:
        return data[:at] + data[end:]
    if pick == 4:
        return data[:end] + data[at:]
    return data[:at] + bytes(end - at) + data[end:]


def mutate_frame(frame: pd.DataFrame, rng: random.Random) -> pd.DataFrame:
    """`frame` with one column changed: dropped, made text, nulls, extreme numbers, lists for
    scalars (or the reverse), or the frame emptied, its rows shuffled or repeated."""
    frame = frame.copy()
    if frame.empty or not len(frame.columns):
        return frame
    column = rng.choice(list(frame.columns))
    values = frame[column]
    n = len(frame)
    pick = rng.randrange(9)
    if pick == 0:
        return frame.drop(columns=[column])
    if pick == 1:
        frame[column] = values.astype(str)
    elif pick == 2:
        frame[column] = pd.Series([None] * n, dtype=object)
    elif pick == 3:
        frame[column] = np.array(rng.choices([math.nan, math.inf, -math.inf, 1e308, -1e308, 0.5, 3.0], k=n))
    elif pick == 4:
        frame[column] = np.array(rng.choices([-1, 0, 2**62, -(2**63), 2**63 - 1, 10**9], k=n), dtype=np.int64)
    elif pick == 5:
        return frame.iloc[:0]
    elif pick == 6:
        return frame.sample(frac=rng.choice([0.5, 1.0, 2.0]), replace=True, random_state=rng.randrange(2**32))
    elif pick == 7:
        is_list = values.map(lambda v: isinstance(v, (list, np.ndarray))).all()
        frame[column] = values.map(lambda v: len(v)) if is_list else values.map(lambda v: [v, v])
    else:
        cells = values.astype(object).tolist()
        cells[rng.randrange(n)] = rng.choice(ODD)
        frame[column] = pd.Series(cells, index=frame.index, dtype=object)
    return frame


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """`frame` as parquet; a column pyarrow cannot store as mutated (mixed types) is stored as text."""
    try:
        frame.to_parquet(path, index=False)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        frame.astype({c: str for c in frame.columns if frame[c].dtype == object}).to_parquet(path, index=False)


# --- what the mutator starts from ------------------------------------------------------------

PROMPT_RECORDS = [
    {"prompt": "What is 2+2?", "answer": 4},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"prompt": "Name a prime.", "answer": None},
]
SEQUENCES = [  # the open format, one record per sequence
    {
        "step": step,
        "seq_id": f"s{step}-{i}",
        "prompt_index": i // 2,
        "prompt_ids": [1, 2, 3],
        "token_id": [5 + i, 6, 7][: 2 + i % 2],
        "logp_engine": [-0.5, -0.25, -1.0][: 2 + i % 2],
        "logp_trainer": [-0.45, -0.3, -1.1][: 2 + i % 2],
        "loss_mask": [1, 0, 1][: 2 + i % 2],
    }
    for step in (1, 2)
    for i in range(3)
]
TOKEN_ROWS = pd.DataFrame(
    {
        "step": [1, 1, 1, 2, 2],
        "seq_id": [0, 0, 1, 2, 2],
        "prompt_index": [0, 0, 0, 1, 1],
        "position": [0, 1, 0, 0, 1],
        "token_id": [7, 8, 9, 7, 8],
        "token": ["a", "b", "<c>", "a", "b"],
        "logp_engine": [-0.1, -0.2, -3.0, -0.5, -0.05],
        "logp_trainer": [-0.12, -0.2, -2.5, -0.4, -0.05],
    }
)


def prime_record(step: int, rank: int) -> dict:
    return {
        "schema_version": 1,
        "step": step,
        "rank": rank,
        "token_ids": [1, 2, 30, 31, 40, 32],
        "loss_mask": [False, False, True, True, False, True],
        "inference_logprobs": [0.0, 0.0, -0.5, -0.25, 0.0, -1.5],
        "trainer_logprobs": [-9.0, -3.0, -0.4, -0.3, -7.0, None],
        "entropy": [1.0] * 6,
    }


def slime_dump() -> dict:
    samples = [
        {
            **_slime_sample(),
            "index": 10 + i,
            "group_index": i // 2,
            "loss_mask": [1, 0, 1] if i == 2 else None,
            "tokens": [1, 2, 30, 31, 32] if i == 2 else [1, 2, 3, 4],
            "response_length": 3 if i == 2 else 2,
            "rollout_log_probs": [-0.5, 0.0, -0.7] if i == 2 else [-0.5, -0.25],
            "remove_sample": i == 3,
        }
        for i in range(4)
    ]
    return {"rollout_id": 3, "samples": samples}


# --- targets: each builds a mutated input in `folder` and returns what reads it ------------


def read_dump(paths: list[Path]) -> None:
    reader = find_reader(paths)
    for _ in reader.read(paths):
        pass


def fuzz_prompts(rng: random.Random, folder: Path, _bases) -> Callable[[], object]:
    kind = rng.choice([".jsonl", ".txt", ".csv", ".parquet"])
    path = folder / f"prompts{kind}"
    if kind == ".jsonl":
        records = list(PROMPT_RECORDS)
        if rng.random() < 0.7:
            at = rng.randrange(len(records))
            records[at] = mutate_json(records[at], rng)  # type: ignore[assignment]
            path.write_text("".join(dumps(r) + "\n" for r in records))
        else:
            path.write_bytes(mutate_bytes("".join(json.dumps(r) + "\n" for r in records).encode(), rng))
    elif kind == ".parquet":
        frame = pd.DataFrame({"prompt": ["What is 2+2?", "Hi"], "answer": ["4", None]})
        if rng.random() < 0.6:
            write_frame(mutate_frame(frame, rng), path)
        else:
            frame.to_parquet(path, index=False)
            path.write_bytes(mutate_bytes(path.read_bytes(), rng))
    else:
        text = 'prompt,answer\nWhat is 2+2?,4\n"a, b",\n' if kind == ".csv" else "one\ntwo\n"
        path.write_bytes(mutate_bytes(text.encode(), rng))
    return lambda: load_prompts(path)


def fuzz_open_jsonl(rng: random.Random, folder: Path, _bases) -> Callable[[], object]:
    path = folder / "dump.jsonl"
    records = [dict(r) for r in SEQUENCES]
    if rng.random() < 0.75:
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(records))
            records[at] = mutate_json(records[at], rng)  # type: ignore[assignment]
        path.write_text("".join(dumps(r) + "\n" for r in records))
    else:
        path.write_bytes(mutate_bytes("".join(json.dumps(r) + "\n" for r in records).encode(), rng))
    return lambda: read_dump([path])


def fuzz_open_parquet(rng: random.Random, folder: Path, _bases) -> Callable[[], object]:
    path = folder / "dump.parquet"
    frame = TOKEN_ROWS if rng.random() < 0.6 else pd.DataFrame(SEQUENCES)
    if rng.random() < 0.7:
        for _ in range(rng.randint(1, 2)):
            frame = mutate_frame(frame, rng)
        write_frame(frame, path)
    else:
        frame.to_parquet(path, index=False)
        path.write_bytes(mutate_bytes(path.read_bytes(), rng))
    return lambda: read_dump([path])


def fuzz_prime_rl(rng: random.Random, folder: Path, _bases) -> Callable[[], object]:
    files = {
        folder / "token_exports" / f"step_{step}" / f"rank_{rank}.jsonl": [prime_record(step, rank)] * 2
        for step in (1, 2)
        for rank in (0, 1)
    }
    chosen = rng.choice(list(files))
    for path, records in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if path != chosen:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        elif rng.random() < 0.75:
            at = rng.randrange(len(records))
            records = [*records[:at], mutate_json(records[at], rng), *records[at + 1 :]]
            path.write_text("".join(dumps(r) + "\n" for r in records))
        else:
            path.write_bytes(mutate_bytes("".join(json.dumps(r) + "\n" for r in records).encode(), rng))
    return lambda: read_dump([folder])


def fuzz_slime(rng: random.Random, folder: Path, _bases) -> Callable[[], object]:
    path = folder / "3.pt"
    dump: object = slime_dump()
    pick = rng.random()
    if pick < 0.6:
        for _ in range(rng.randint(1, 3)):
            dump = mutate_json(dump, rng)
        torch.save(_unraw(dump), path)
    elif pick < 0.75:  # arrays and tensors where slime keeps lists (slime does so for some fields)
        samples = dump["samples"]  # type: ignore[index]
        sample = samples[rng.randrange(len(samples))]
        field = rng.choice(["tokens", "rollout_log_probs", "loss_mask", "index", "response_length"])
        value = np.asarray(
            sample[field] if sample[field] is not None else [1.5], dtype=rng.choice(["int32", "float64"])
        )
        sample[field] = torch.from_numpy(value) if rng.random() < 0.5 else value
        torch.save(dump, path)
    else:
        torch.save(dump, path)
        path.write_bytes(mutate_bytes(path.read_bytes(), rng))
    return lambda: read_dump([folder])


def _unraw(value: object) -> object:
    """RAW marks as what a pickle can hold instead: the huge number itself, or a deep list."""
    if isinstance(value, dict):
        return {k: _unraw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unraw(v) for v in value]
    if isinstance(value, str) and value.startswith(RAW_MARK):
        return [10**80, -1e300, [[[[1]]]]][int(value.removeprefix(RAW_MARK))]
    return value


def _mutated_folder(rng: random.Random, folder: Path, base: Path, files: tuple[str, ...]) -> Path:
    """A copy of run folder `base` with one of `files` (summary.json or a parquet file) mutated."""
    copy = folder / base.name
    copy.mkdir()
    chosen = rng.choice(files)
    for name in files:
        if (base / name).is_file():
            shutil.copyfile(base / name, copy / name)
    target = copy / chosen
    if rng.random() < 0.25:
        target.write_bytes(mutate_bytes(target.read_bytes(), rng))
    elif chosen.endswith(".json"):
        summary: object = json.loads(target.read_text())
        for _ in range(rng.randint(1, 3)):
            summary = mutate_json(summary, rng)
        target.write_text(dumps(summary))
    else:
        write_frame(mutate_frame(pd.read_parquet(target), rng), target)
    return copy


def fuzz_scan_folder(rng: random.Random, folder: Path, bases) -> Callable[[], object]:
    """A scan folder as `report`, `compare` and `diagnose --from` read it."""
    base = bases["scan"]
    copy = _mutated_folder(rng, folder, base, (runs.SUMMARY, runs.TOKENS, runs.ROLLOUTS))

    def read():
        runs.folder_kind(copy)
        with runs.reading(copy, base):
            check_comparable(bases["scan run"], runs.load_scan(copy))
        runs.read_rollouts(copy)
        settings = scanned_settings(copy)
        DiagnoseConfig(engine="vllm", out=folder / "d", semantic_probe=0, from_run=copy, **settings)

    return read


def fuzz_analyze_folder(rng: random.Random, folder: Path, bases) -> Callable[[], object]:
    copy = _mutated_folder(rng, folder, bases["analyze"], (runs.SUMMARY, runs.TOKENS, runs.STEPS))
    return lambda: (runs.folder_kind(copy), runs.load_analyze(copy, limit=rng.choice([3, 10**6])))


def fuzz_report_command(rng: random.Random, folder: Path, bases) -> Callable[[], object]:
    """`mismatch report` / `compare` on a mutated folder: the reader, then the whole report."""
    kind = rng.choice(["scan", "analyze"])
    files = (runs.SUMMARY, runs.TOKENS, runs.ROLLOUTS) if kind == "scan" else (runs.SUMMARY, runs.TOKENS, runs.STEPS)
    copy = _mutated_folder(rng, folder, bases[kind], files)
    if kind == "scan" and rng.random() < 0.5:
        return lambda: cli("compare", bases["scan"], copy, "--out", folder / "c")
    return lambda: cli("report", copy)


def fuzz_analyze_command(rng: random.Random, folder: Path, bases) -> Callable[[], object]:
    """`mismatch analyze` on a mutated open-format dump: the reader, the measures, the report."""
    path = folder / "dump.parquet"
    write_frame(mutate_frame(TOKEN_ROWS, rng), path)
    return lambda: cli("analyze", path, "--out", folder / "a")


# name → (builder, share of the cases); the commands run the whole report, so they get few
TARGETS: dict[str, tuple[Callable, float]] = {
    "prompts": (fuzz_prompts, 0.16),
    "open jsonl": (fuzz_open_jsonl, 0.13),
    "open parquet": (fuzz_open_parquet, 0.13),
    "prime-rl": (fuzz_prime_rl, 0.12),
    "slime": (fuzz_slime, 0.13),
    "scan folder": (fuzz_scan_folder, 0.22),
    "analyze folder": (fuzz_analyze_folder, 0.102),
    "report command": (fuzz_report_command, 0.004),
    "analyze command": (fuzz_analyze_command, 0.004),
}


def case_counts(total: int) -> dict[str, int]:
    """How many of `total` cases each target gets (each at least one)."""
    return {name: max(1, round(total * share)) for name, (_, share) in TARGETS.items()}


def fuzz_case(target: str, seed: int, folder: Path, bases: dict[str, Any]) -> str | None:
    """Run one mutated input through its reader: None when it was read, the refusal when refused;
    anything else (a traceback) propagates."""
    folder.mkdir()
    try:
        read = TARGETS[target][0](random.Random(f"{target}/{seed}"), folder, bases)
        try:
            result = read()
        except MismatchError as exc:
            message = str(exc)
            assert message.strip() and "\n" not in message and "\r" not in message, f"not one line: {message!r}"
            return message
        if isinstance(result, Result):
            return _command_refusal(result)
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _command_refusal(result) -> str | None:
    """A CLI run that read (exit 0) or refused in one line (exit 2); a traceback re-raised."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 0:
        return None
    return one_line_refusal(result)


@pytest.fixture(scope="module")
def fuzz_bases(shared_scan, tmp_path_factory):
    """The real run folders the mutator starts from: the shared hf scan and a small analyze run."""
    out, _, _ = shared_scan("hf")
    folder = tmp_path_factory.mktemp("fuzz-bases")
    TOKEN_ROWS.to_parquet(folder / "dump.parquet", index=False)
    result = cli("analyze", folder / "dump.parquet", "--out", folder / "analyze")
    assert result.exit_code == 0, result.output
    return {"scan": out, "scan run": runs.load_scan(out), "analyze": folder / "analyze"}


@pytest.mark.slow  # about half a minute for the default number of cases
def test_the_readers_survive_the_mutator(fuzz_bases, tmp_path):
    """CASES mutated inputs (FUZZ_CASES unless MISMATCH_FUZZ_CASES says): no traceback from any
    reader, every refusal one line; each crash site is listed once, with a seed that replays it."""
    counts = case_counts(CASES)
    crashes: dict[str, str] = {}
    refused = 0
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    for target, count in counts.items():
        began = time.perf_counter()
        for seed in range(count):
            try:
                refused += (
                    fuzz_case(target, seed, tmp_path / f"{target.replace(' ', '-')}-{seed}", fuzz_bases) is not None
                )
            except Exception as exc:  # every crash is collected, then reported
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                site = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
                crashes.setdefault(site, f"{target!r} seed {seed}: {str(exc).splitlines()[:1]}")
        seconds[target] = time.perf_counter() - began
    took = ", ".join(f"{target} {counts[target]} in {s:.1f} s" for target, s in seconds.items())
    total = time.perf_counter() - start
    print(f"{sum(counts.values())} fuzz cases ({refused} refused in one line) in {total:.1f} s: {took}")
    assert not crashes, "\n".join(f"{site}: {case}" for site, case in crashes.items())
    assert sum(counts.values()) >= min(CASES, FUZZ_CASES) and 0 < refused < sum(counts.values())


def test_the_readme_quotes_the_default_number_of_fuzz_cases():
    section = README.read_text().split("## When something is wrong")[1].split("\n## ")[0]
    assert f"{sum(case_counts(FUZZ_CASES).values()):,} mutated inputs" in section
    assert sum(case_counts(FUZZ_CASES).values()) >= 1000
