"""cascade/ is pure code (STYLE.md, habit 1), and imports only point downward.

No module of the core imports a module that does network, process, thread or
database I/O, nor the packages above it (``peer``, ``tracker``). The one file
read it does is :func:`cascade.metafile.read_metafile_bytes` (a ``.cascade`` or a
collection file into bytes, which STYLE.md allows; ``read_cascade`` and the peer's
``read_metafile`` both go through it); no other function calls ``open``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cascade

pytestmark = pytest.mark.unit

FORBIDDEN = {
    "socket",
    "threading",
    "concurrent",
    "multiprocessing",
    "subprocess",
    "selectors",
    "select",
    "asyncio",
    "signal",
    "requests",
    "urllib3",
    "http",
    "sqlite3",
    "redis",
    "tqdm",
    "tempfile",
    "shutil",
    "peer",  # upward: the core never imports the processes built on it
    "tracker",
    "oscompat",  # OS probing and I/O fallbacks live beside the core, for the processes
}
# Calls that read or write files. ``read_metafile_bytes`` is the one allowed reader.
FILE_CALLS = {"open", "read_bytes", "read_text", "write_bytes", "write_text", "pread", "pwrite", "sendfile", "mkdir"}
ALLOWED_FILE_CALLS = {("metafile.py", "read_metafile_bytes")}
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


def file_calls(tree: ast.Module) -> set[tuple[str, str]]:
    """(enclosing top-level function, called name) for every call of a file I/O function."""
    found: set[tuple[str, str]] = set()
    for top in tree.body:
        for node in ast.walk(top):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in FILE_CALLS:
                    found.add((getattr(top, "name", "<module>"), name))
    return found


def test_no_cascade_module_does_file_io_beyond_reading_a_cascade_file() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        calls = file_calls(ast.parse(path.read_text(), str(path)))
        calls = {c for c in calls if (path.name, c[0]) not in ALLOWED_FILE_CALLS}
        if calls:
            offenders[str(path.relative_to(PACKAGE))] = sorted(calls)
    assert offenders == {}


def test_no_cascade_module_imports_io_or_upward() -> None:
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
    roots = {name.split(".")[0] for name in imported_modules(ast.parse("from concurrent.futures import Future"))}
    assert roots & FORBIDDEN
    assert file_calls(ast.parse("def f():\n    with open('x') as g: pass")) == {("f", "open")}
