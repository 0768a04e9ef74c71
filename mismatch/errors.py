"""User-facing errors: each says what is wrong and what to do, in one line.

The CLI turns any `MismatchError` into that line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MismatchError(Exception):
    """Root of every error the user can act on; the message is the whole explanation."""


class ConfigError(MismatchError, ValueError):
    """An option out of range or unknown (the message names the flag)."""


class ModelError(MismatchError):
    """A model that cannot be used as given."""


class ModelNotFound(ModelError):
    """The model could not be located; the message names everything that was tried."""


class PromptError(MismatchError):
    """A prompt file (or prompt set) that cannot be used."""


class EngineError(MismatchError):
    """An engine that cannot run as asked; the message names the option to change."""


class EngineDied(EngineError):
    """The engine's child process ended in the middle of the run (killed, out of memory, crashed)."""


class OutputExists(MismatchError):
    """The output folder already holds files and `--force` was not given, or holds files no run of ours wrote."""


class FolderInUse(MismatchError):
    """Another mismatch process holds the run folder (`runs.folder_lock`); the message names it."""


class DiskFull(MismatchError):
    """A run folder's file could not be written for lack of space (ENOSPC, EDQUOT, EFBIG); nothing half-written
    is left under its name."""


class RunFolderError(MismatchError):
    """A folder that is not a (complete) run of the kind asked for, or of an unknown format."""


class ResumeError(MismatchError):
    """`--resume` on a folder that holds no scan, or one run with other settings."""


class NotComparable(MismatchError):
    """Two runs that measure different things."""


class DumpError(MismatchError):
    """A training dump `analyze` cannot read: the message names the fields it expected."""


def first_line(exc: Exception) -> str:
    """A library exception's first non-empty line (its class name when it has none): what a one-line error quotes."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


@contextmanager
def parquet_damage(path: Path, error: type[MismatchError], advice: str) -> Iterator[None]:
    """What pyarrow and pandas raise on a truncated or damaged parquet file (its pandas metadata too), as one
    `error` naming the file, then `advice`."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise error(f"{path} cannot be read as parquet ({first_line(exc)}); {advice}") from None
