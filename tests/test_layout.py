"""The import layout, read from the source with ``ast`` (nothing is imported).

Layering is one way: flows -> runbook -> tasks -> blocks. No flow module imports another flow module,
and the sandbox's modules import each other without a circle, at top level or inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Each layer and the packages it must never import (the layers above it).
FORBIDDEN = {
    "blocks": ("tasks", "runbook", "flows"),
    "tasks": ("runbook", "flows"),
    "runbook": ("flows",),
}


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in the file, as (line, dotted name).

    ``from pkg import name`` yields ``pkg.name`` too, since ``name`` may be a submodule.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def import_graph(folder: Path) -> dict[str, set[str]]:
    """The modules of one package and, for each, the modules of the same package it imports."""
    package = folder.name
    modules = {p.stem: p for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for stem, path in modules.items():
        name = package if stem == "__init__" else f"{package}.{stem}"
        graph[name] = set()
        for _, module in imported_modules(path, package):
            head = module.split(".")
            if head[0] == package and len(head) > 1 and head[1] in modules and head[1] != "__init__":
                target = f"{package}.{head[1]}"
                if target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (each holds at least one circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.append(item)
                if item == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_circle_finder_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n    return g\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from . import a\n")

    graph = import_graph(pkg)

    assert graph["pkg.d"] == {"pkg.a"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_sandbox_has_no_import_circle():
    graph = import_graph(ROOT / "sandbox")

    assert "sandbox.drill_region" in graph["sandbox.drills"]  # the scan reads the real modules
    assert circles(graph) == [], "sandbox modules that import each other in a circle"


def test_no_flow_module_imports_another_flow_module():
    flows = {p.stem for p in (ROOT / "flows").glob("*.py")} - {"__init__"}
    found = []
    for path in sorted((ROOT / "flows").glob("*.py")):
        for line, module in imported_modules(path, "flows"):
            head = module.split(".")
            if head[0] == "flows" and len(head) > 1 and head[1] in flows and head[1] != path.stem:
                found.append(f"flows/{path.name}:{line} imports {module}")

    assert flows, "no flow modules found"
    assert sorted(set(found)) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    paths = sorted((ROOT / layer).glob("*.py"))
    found = [
        f"{layer}/{path.name}:{line} imports {module}"
        for path in paths
        for line, module in imported_modules(path, layer)
        if module.split(".")[0] in FORBIDDEN[layer]
    ]

    assert paths, f"no modules found in {layer}/"
    assert sorted(set(found)) == []
