"""The package's imports run one way, along the flow: no cycles, each room imports only the rooms
below it, statistics import no torch, and only the CLI imports the commands."""

import ast
from pathlib import Path

import mismatch

PACKAGE = Path(mismatch.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every mismatch module `name` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                for alias in node.names
            }
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def component(name: str) -> str:
    """A top-level module or subpackage (`mismatch.report.html` → `mismatch.report`)."""
    return ".".join(name.split(".")[:2])


COMPONENTS: dict[str, set[str]] = {}
for _name, _deps in GRAPH.items():
    COMPONENTS.setdefault(component(_name), set()).update(
        component(d) for d in _deps if component(d) != component(_name)
    )


def test_no_import_cycles_between_modules_or_packages():
    """Checked between components too: a package's modules run its __init__, so `compare`
    importing `report.content` while `report` imports `compare` is a cycle."""
    for graph in (GRAPH, COMPONENTS):
        assert_acyclic(graph)


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " → ".join(path[path.index(name) :] + [name]))
        if name in done:
            return
        path.append(name)
        for other in graph[name]:
            visit(other)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


ROOMS: dict[str, set[str]] = {
    # component: the components it may import (the flow of docs/architecture.md, top to bottom)
    "mismatch": set(),  # the package's root: the distribution's name, nothing imported
    "mismatch.errors": set(),
    "mismatch.quiet": set(),
    "mismatch.records": {"mismatch.errors"},
    "mismatch.stats": {"mismatch.errors"},
    "mismatch.verdict": {"mismatch.errors", "mismatch.records", "mismatch.stats"},
    "mismatch.model": {"mismatch.errors", "mismatch.records"},
    "mismatch.engines": {"mismatch.errors", "mismatch.records", "mismatch.model", "mismatch.quiet"},
    "mismatch.learner": {"mismatch.errors", "mismatch.records", "mismatch.model", "mismatch.stats"},
    "mismatch.runs": {"mismatch", "mismatch.errors", "mismatch.records", "mismatch.model"},  # mismatch: its version
    "mismatch.dumps": {"mismatch.errors", "mismatch.runs"},
    "mismatch.hooks": {"mismatch.errors", "mismatch.dumps"},
    "mismatch.report": {"mismatch.errors", "mismatch.runs", "mismatch.stats"},
    "mismatch.config": {
        "mismatch.errors",
        "mismatch.records",
        "mismatch.engines",
        "mismatch.model",
        "mismatch.stats",
        "mismatch.verdict",
    },
    "mismatch.inputs": {"mismatch.errors", "mismatch.config", "mismatch.model"},
}
TOP = {"mismatch.cli", "mismatch.commands"}  # the CLI and the commands may import any room below
PURE = ("mismatch.stats", "mismatch.verdict")  # statistics and rules: numpy and pandas only
HEAVY = {"torch", "transformers", "vllm", "peft", "matplotlib", "typer", "rich"}


def test_each_room_imports_only_the_rooms_below_it():
    assert set(COMPONENTS) == set(ROOMS) | TOP, "a new room: place it in ROOMS"
    upward = {(room, dep) for room, deps in COMPONENTS.items() if room not in TOP for dep in deps - ROOMS[room]}
    assert upward == set()


def test_statistics_and_verdict_import_no_torch_nor_model_code():
    def third_party(name: str) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        return found & HEAVY

    heavy = {name: third_party(name) for name in MODULES if component(name) in PURE}
    assert heavy and {name: found for name, found in heavy.items() if found} == {}


def test_nothing_imports_the_cli():
    assert [name for name, deps in GRAPH.items() if "mismatch.cli" in deps] == []


RUNS_ANOTHER = {("mismatch.commands.train", "mismatch.commands.scan")}  # train's step-0 check is a real scan


def test_only_the_cli_imports_the_commands_and_no_command_another():
    """Each command is its own top: what two commands share lives in a room below them. A command that
    runs another whole (RUNS_ANOTHER) calls its library function, as a user would."""
    commands = {f"mismatch.commands.{name}" for name in ("scan", "diagnose", "analyze", "train", "doctor")}
    assert commands <= set(MODULES)
    importers = {(name, dep) for name, deps in GRAPH.items() for dep in deps & commands}
    assert {(name, dep) for name, dep in importers if name != "mismatch.cli"} == RUNS_ANOTHER


def test_the_graph_is_read():
    """Guards the checks above against an empty graph."""
    assert "mismatch.runs" in GRAPH["mismatch.commands.scan"]
    assert "mismatch.errors" in GRAPH["mismatch.runs"]
    assert COMPONENTS["mismatch.cli"] >= {"mismatch.commands", "mismatch.config"}
