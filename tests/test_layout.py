"""The shape of the package: no module over 500 lines, no import cycles (lazy imports and
type-only imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "routerretriever"


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.glob("*.py"):
        mod = path.stem
        graph[mod] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("routerretriever."):
                    graph[mod].add(node.module.split(".")[1])
                elif node.module == "routerretriever" and mod != "__init__":
                    graph[mod].update(a.name for a in node.names if (PKG / f"{a.name}.py").exists())
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("routerretriever."):
                        graph[mod].add(a.name.split(".")[1])
        graph[mod].discard(mod)
    return graph


def test_no_module_is_over_500_lines():
    long = {p.name: n for p in PKG.glob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_no_import_cycles():
    graph = {m: deps for m, deps in imports().items() if m != "__init__"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d == "__init__":
                continue
            if state.get(d) == 1:
                cycles.append([*path[path.index(d) :], d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles
