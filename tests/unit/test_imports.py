"""The import graph of attnlm, training and serving, read with `ast` (nothing is imported): no
module pair imports each other, not even through a function-local import, and the layers stand
as the README says (the core imports no framework; serving never imports training)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("attnlm", "training", "serving")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (top level, functions, conditionals)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package `level - 1` above this one
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module
            names.add(base_name)
            names.update(f"{base_name}.{alias.name}" for alias in node.names)  # submodules
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a submodule import counts as importing it)."""
    paths = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    modules = {module_name(p): p for p in paths}
    return {
        name: {other for other in imported_names(path) if other in modules and other != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # module -> "open" (on the current path) or "done"
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        path.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "attnlm.config" in graph["attnlm.artifact"]  # from attnlm.config import ...
    assert "training.export" in graph["training.cli"]  # imported inside a function: counted
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_layers_core_imports_no_framework_and_serving_no_training():
    for path in (REPO / "attnlm").rglob("*.py"):
        roots = {name.split(".")[0] for name in imported_names(path)}
        assert not roots & {"lightning", "ray", "training", "serving"}, path
    for path in (REPO / "serving").rglob("*.py"):
        assert not {name.split(".")[0] for name in imported_names(path)} & {"training"}, path
