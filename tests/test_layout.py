"""The imports of the three packages point only downward, and none goes round in a cycle.

STYLE.md, "The house": ``peer/`` and ``tracker/`` import ``cascade/``, never the other way
and never each other (the peer talks to the tracker through the wire protocol). Every
``import`` counts, also one inside a function: a lazy import still makes a cycle a reader
must untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cascade", "oscompat", "peer", "tracker")
# Who may import whom: each package itself and what lies below it.
# oscompat/ (the OS probe and I/O fallbacks) sits beside cascade/, below both processes.
ALLOWED = {
    "cascade": {"cascade"},
    "oscompat": {"oscompat"},
    "peer": {"peer", "cascade", "oscompat"},
    "tracker": {"tracker", "cascade", "oscompat"},
}


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of the three packages (``pkg`` for ``pkg/__init__.py``)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(tree: ast.AST, modules: set[str]) -> set[str]:
    """The project modules ``tree`` imports (``from peer import demo`` is ``peer.demo``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names & modules


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = imports_of(ast.parse(path.read_text(), str(path)), modules) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge met by a depth-first walk (iterative: no recursion limit)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return found


def test_the_graph_sees_the_packages() -> None:
    graph = import_graph()
    assert {"cascade.errors", "peer.fetcher", "tracker.server"} <= set(graph)
    assert "cascade.errors" in graph["peer.storage"]


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_imports_point_downward() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[module.split(".")[0]]
    )
    assert upward == []


def test_the_checks_catch_what_they_look_for() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    modules = {"peer.x", "tracker.y", "peer"}
    tree = ast.parse("import tracker.y\ndef f():\n    from peer import x\n")
    assert imports_of(tree, modules) == {"tracker.y", "peer", "peer.x"}
