"""The codec is the only place that knows a frame's layout (STYLE.md, habit 10).

No ``struct`` format string may appear in ``peer/``, ``tracker/``, ``tests/``
or ``bench/``: every frame of PROTOCOL.md is packed and unpacked by
``cascade/wire.py`` (or ``cascade/metafile.py`` for section 1). The few uses
of ``struct`` for something that is not a wire frame (socket options, ioctls)
are listed below by file and format, so a new one is a decision, not an accident.

``scripts/probe_tracker.py`` is left out on purpose: it is an independent
checker written from PROTOCOL.md alone, like the outside checker it imitates.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("peer", "tracker", "oscompat", "tests", "bench")
STRUCT_CALLS = {"Struct", "pack", "pack_into", "unpack", "unpack_from", "iter_unpack", "calcsize"}
# (file, format) pairs that are not wire frames: native-order C structs for the kernel.
NOT_WIRE = {
    ("tests/test_peer_server.py", "ii"),  # SO_LINGER {l_onoff, l_linger}
    ("tests/test_http_api.py", "ii"),  # SO_LINGER
    ("bench/tracker_bench.py", "ii"),  # SO_LINGER
    ("tests/test_fetch.py", "HHHH"),  # TIOCSWINSZ {rows, cols, xpixel, ypixel}
    # rtnetlink, for the htb class counters of bench.wan's hosts (host byte order)
    ("bench/netlab.py", "=IHHII"),  # struct nlmsghdr
    ("bench/netlab.py", "=BxxxiIII"),  # struct tcmsg
    ("bench/netlab.py", "=HH"),  # struct rtattr
    ("bench/netlab.py", "=Q"),  # gnet_stats_basic.bytes
    ("bench/netlab.py", "=i"),  # nlmsgerr.error
    ("tests/test_bench_netlink.py", "=QI"),  # struct gnet_stats_basic {bytes, packets}
}
# Still to move to cascade/wire.py (none left: the planner split removed the fetcher's).
KNOWN_OFFENDERS: set[tuple[str, str]] = set()


def struct_formats(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, format) of every struct call; a format that is not a literal is reported as '?'."""
    local_names: set[str] = set()  # ``from struct import pack`` and the like
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "struct":
            local_names.update(alias.asname or alias.name for alias in node.names if alias.name in STRUCT_CALLS)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_struct = (
            isinstance(func, ast.Attribute)
            and func.attr in STRUCT_CALLS
            and isinstance(func.value, ast.Name)
            and func.value.id == "struct"
        ) or (isinstance(func, ast.Name) and func.id in local_names)
        if not is_struct:
            continue
        first = node.args[0] if node.args else None
        fmt = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else "?"
        found.append((node.lineno, fmt))
    return found


def offenders() -> list[str]:
    bad: list[str] = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for line, fmt in struct_formats(ast.parse(path.read_text(encoding="utf-8"), rel)):
                if (rel, fmt) not in NOT_WIRE and (rel, fmt) not in KNOWN_OFFENDERS:
                    bad.append(f"{rel}:{line}: struct format {fmt!r}")
    return bad


def test_no_wire_struct_format_outside_the_codec() -> None:
    assert offenders() == [], "frame layouts belong in cascade/wire.py (use or add a fast path there)"


def test_the_scan_sees_struct_calls_in_every_spelling() -> None:
    source = (
        "import struct\nfrom struct import pack as p, unpack_from\n"
        "A = struct.Struct('>BQ')\nB = p('!I', 1)\nC = unpack_from('>H', b'xx')\nD = struct.pack(fmt, 1)\n"
    )
    assert [fmt for _, fmt in struct_formats(ast.parse(source))] == [">BQ", "!I", ">H", "?"]


def test_the_exceptions_are_still_there() -> None:
    """An allowance that no longer matches anything is stale: drop it, so it cannot hide a new use."""
    seen: set[tuple[str, str]] = set()
    for rel, _ in NOT_WIRE | KNOWN_OFFENDERS:
        path = ROOT / rel
        if path.exists():
            seen.update((rel, fmt) for _, fmt in struct_formats(ast.parse(path.read_text(encoding="utf-8"))))
    assert seen >= (NOT_WIRE | KNOWN_OFFENDERS), (NOT_WIRE | KNOWN_OFFENDERS) - seen
