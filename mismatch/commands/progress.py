"""What a pipeline reports its progress to: the CLI's bars, or nothing (a library caller)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        """Start a stage of `total` units (None: unknown); the returned callable advances it."""
        ...


class Silent:
    def stage(self, description: str, total: int | None) -> Callable[[int], None]:
        return lambda n: None
