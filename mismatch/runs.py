"""The run folder: where a scan's outputs land, each file written whole or not at all."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd


class OutputExists(Exception):
    """The output folder already holds files and `--force` was not given."""


def default_run_dir(model: str, root: Path = Path("reports")) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1].removeprefix("builtin:")).strip("-") or "model"
    return root / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_output_dir(path: Path, force: bool) -> Path:
    """Refuse an existing non-empty folder unless forced; the writers create the folder."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise OutputExists(f"output folder {path} is not empty; pass --force to overwrite or choose another --out")
    return path


@contextmanager
def _atomic(path: Path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide reports from CI artefact uploaders
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
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


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with _atomic(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with _atomic(path) as tmp:
        frame.to_csv(tmp, index=False)
