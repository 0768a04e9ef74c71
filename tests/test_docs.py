"""docs/architecture.md follows the code: every room it lists exists, and every name its table of
"where each number comes from" cites resolves to a module attribute."""

import importlib
import re
from pathlib import Path

import pytest

import mismatch

PACKAGE = Path(mismatch.__file__).parent
DOC = (PACKAGE.parent / "docs" / "architecture.md").read_text()


def section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end > 0 else None]


def resolve(dotted: str) -> object:
    """`stats.metrics.PairStats.add` → the attribute, importing the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module("mismatch." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            found = getattr(found, name)
        return found
    raise ModuleNotFoundError(dotted)


NUMBERS = sorted(
    set(re.findall(r"`([a-z_]+(?:\.[A-Za-z_0-9]+)+)", section("Where each number in a report comes from")))
)
ROOMS = re.findall(r"^\| `([a-z_/]+(?:\.py)?)`", section("Rooms, top to bottom"), flags=re.M)


@pytest.mark.parametrize("dotted", NUMBERS)
def test_each_cited_name_exists(dotted):
    assert resolve(dotted) is not None


def test_each_room_exists_and_each_module_has_a_room():
    assert len(NUMBERS) > 40 and len(ROOMS) > 30
    for room in ROOMS:
        assert (PACKAGE / room).exists(), room
    listed = " ".join(section("Rooms, top to bottom").splitlines())
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name != "__init__.py":
            assert path.name in listed, f"{relative} is in no room of docs/architecture.md"
