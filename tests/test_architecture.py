"""The package's imports run one way: no cycles, and nothing below them imports the pipelines or the CLI."""

import ast
from pathlib import Path

import mismatch

PACKAGE = Path(mismatch.__file__).parent
PIPELINES = ("mismatch.scan", "mismatch.train")  # (with the CLI) the top of the import graph


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
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def component(name: str) -> str:
    """A top-level module or subpackage (`mismatch.report.html` → `mismatch.report`)."""
    return ".".join(name.split(".")[:2])


COMPONENTS: dict[str, set[str]] = {}
for _name, _deps in GRAPH.items():
    COMPONENTS.setdefault(component(_name), set()).update(component(d) for d in _deps if component(d) != component(_name))


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


def test_nothing_imports_the_cli():
    assert [name for name, deps in GRAPH.items() if "mismatch.cli" in deps] == []


def test_only_the_cli_and_their_own_package_import_the_pipelines():
    def inside(module, pipeline):
        return module == pipeline or module.startswith(pipeline + ".")

    upward = {
        (name, dep)
        for name, deps in GRAPH.items()
        for dep in deps
        for pipeline in PIPELINES
        if inside(dep, pipeline) and not inside(name, pipeline) and name != "mismatch.cli"
    }
    assert upward == set()


def test_the_graph_is_read():
    """Guards the checks above against an empty graph."""
    assert "mismatch.runs" in GRAPH["mismatch.scan"] and "mismatch.errors" in GRAPH["mismatch.runs"]
