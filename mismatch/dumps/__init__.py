"""Training dumps `analyze` reads: the open format and each framework's own, detected by content."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from mismatch.dumps import open_format, prime_rl, slime
from mismatch.dumps.base import OPTIONAL, REQUIRED, Chunk
from mismatch.errors import DumpError

READERS: dict[str, ModuleType] = {reader.NAME: reader for reader in (prime_rl, slime, open_format)}

__all__ = ["READERS", "OPTIONAL", "REQUIRED", "Chunk", "find_reader"]


def find_reader(paths: list[Path], name: str | None = None) -> ModuleType:
    """The reader of `name`, or the first whose format the files are in."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DumpError(f"no such file or folder: {', '.join(missing)}")
    if name is not None:
        if name not in READERS:
            raise DumpError(f"unknown --format {name!r}; use one of {', '.join(READERS)}")
        return READERS[name]
    for reader in READERS.values():
        if reader.detect(paths):
            return reader
    raise DumpError(
        f"{', '.join(map(str, paths))}: in no format analyze reads. Expected the open format (.parquet or .jsonl with "
        f"{', '.join(REQUIRED)}, logp_trainer unless --model), a prime-rl token export ({', '.join(prime_rl.FIELDS)}) "
        f"or a slime rollout dump (.pt with samples of {', '.join(slime.SAMPLE_FIELDS)})"
    )
