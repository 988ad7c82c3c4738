"""cascade/ is pure code: no module imports socket or threading (STYLE.md, habit 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cascade

pytestmark = pytest.mark.unit

FORBIDDEN = {"socket", "threading"}
PACKAGE = Path(cascade.__file__).resolve().parent


def imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) in {"__import__", "import_module"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def test_no_cascade_module_imports_socket_or_threading() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) >= 5, f"found only {modules} under {PACKAGE}"
    offenders = {}
    for path in modules:
        roots = {name.split(".")[0] for name in imported_modules(ast.parse(path.read_text(), str(path)))}
        if roots & FORBIDDEN:
            offenders[str(path.relative_to(PACKAGE))] = sorted(roots & FORBIDDEN)
    assert offenders == {}


def test_the_checker_catches_imports() -> None:
    sources = [
        "import socket",
        "import threading as t",
        "from socket import create_connection",
        "import os, socket.foo",
        "importlib.import_module('threading')",
    ]
    for source in sources:
        roots = {name.split(".")[0] for name in imported_modules(ast.parse(source))}
        assert roots & FORBIDDEN, source
    assert not imported_modules(ast.parse("from concurrent.futures import ThreadPoolExecutor")) & FORBIDDEN
