"""Fetching a collection vs one file of the same total size (issue 13), on loopback.

Run ``python -m bench.collection_fetch [--small N] [--big-files N] [--big-size MiB]
[--runs N] [--only small|big]``. For each case it writes a tree and one file of
the same total size, starts a tracker and one seeder serving both, then times
``peer fetch`` of the collection and of the file (the command's own wall time,
start-up included, and the ``seconds`` its ``--json`` reports), ``--runs`` times
on the same data (the order alternates, so neither always meets a warmer page
cache), and prints one JSON line per run with the ratio. Beside them it times
``cp -r`` of the tree into a new folder: the kernel's own cost of creating that
many files, which any tool pays, and the floor for the collection.

What a run fetches is kept until the end. On ext4 without a journal (this
machine's root), creating a file skips every inode freed in the last 60 s (360 s
while its table block is dirty), one lookup each, so creating 10,000 files soon
after deleting 10,000 costs seconds of system time in any program; deleting each
run's tree before the next made the collection 2-15 x one file for that reason
alone. It also reports the
seeder's open descriptors (``/proc/PID/fd``) and resident memory once it serves
everything, and after the fetches with the peak (``VmHWM``): what issue 13 bounds
by connections, not by files. Defaults: 10,000 files of 4 KiB, and 10 files of
40 MiB (a tenth of the issue's 400 MiB, to keep the bench within a few minutes;
``--big-size 400`` is the issue's case). While it runs it holds (2 + 3 x runs)
times the case's total size on disk, (2 + 5 x runs) times with libtorrent: 6.8 GB
for the default big case, 3 runs, both tools. Everything it writes is removed at the end.

``--tools cascade,libtorrent`` (the default when ``import libtorrent`` works)
measures the same ratio for libtorrent, from the same run and the same data: a
multi-file v1 torrent of the tree and a single-file one of the file, each with
the piece length libtorrent picks by default (reported as ``lt_piece_length``),
one seeder and one fetcher process (``bench/lt_peer.py``) on 127.0.0.1 joined
directly. A libtorrent wall is the fetch process's start to its ``done`` line
(every piece hash-checked and written out), into a folder of its own kept to the
end like Cascade's; its ``fetch_s`` starts once its session is up, after the
Python and libtorrent start-up, as Cascade's ``seconds`` does. Each fetch gets
its own freshly started seeder (its check of the data is not timed), because an
``lt_peer`` seeder lives at most 300 s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from bench.baselines import DONE, make_torrent
from bench.procs import BenchError, Group

KIB, MIB = 1 << 10, 1 << 20
# Random data is written in pieces of this size, so a 400 MiB file never sits in memory whole.
WRITE_PIECE = 4 * MIB
# The lines of /proc/PID/status read for the seeder's memory: resident now, and its peak.
_MEM = ("VmRSS", "VmHWM")
_LISTENING = re.compile(r"listening on \S+:(\d+)")
TOOLS = ("cascade", "libtorrent")
# Bound on each wait for a libtorrent process (its start, a fetch): lt_peer's own bound on a run.
LT_TIMEOUT = 300.0
_LT_STARTED = re.compile(r"^started (\S+)$", re.M)
# A seeder is settled once it uses under 5 % of a core for half a second (both arbitrary:
# well above an idle seeder's announce thread, well below its start-up work).
QUIET_CPU, QUIET_WINDOW = 0.05, 0.5


def _cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _start(log: Path, *argv: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server and return it with the port of its first ``listening on`` line (60 s at most)."""
    err = log.open("wb")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        m = _LISTENING.search(log.read_text(errors="replace"))
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[2]} exited: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{argv[2]} did not start")


def _wait_line(log: Path, pattern: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {pattern!r} in {log}")
        time.sleep(0.05)


def _fetch(target: Path, out: Path, tracker: str) -> tuple[float, float]:
    start = time.perf_counter()
    r = subprocess.run(
        _cmd(
            "peer", "fetch", str(target), "--out", str(out), "--tracker", tracker, "--listen", "127.0.0.1:0", "--json"
        ),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"fetch of {target} failed: {r.stderr}")
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    return wall, float(doc["seconds"])


def _copy(tree: Path, dest: Path) -> float:
    """Wall time of ``cp -r tree dest``: creating the same files with no network and no hashing."""
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(tree), str(dest)], check=True, timeout=1800)
    return time.perf_counter() - start


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far; raises OSError once it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_quiet(pid: int, timeout: float = 120) -> None:
    """Wait (``timeout`` s at most) until process ``pid`` uses under QUIET_CPU of a core over QUIET_WINDOW.

    A bench settling step, not a test: one second's sleep where /proc is missing.
    """
    deadline = time.monotonic() + timeout
    try:
        before = _cpu_seconds(pid)
        while time.monotonic() < deadline:
            time.sleep(QUIET_WINDOW)
            now = _cpu_seconds(pid)
            if now - before < QUIET_CPU * QUIET_WINDOW:
                return
            before = now
    except OSError:
        time.sleep(1.0)


def _write_random(f: BinaryIO, size: int) -> None:
    for off in range(0, size, WRITE_PIECE):
        f.write(os.urandom(min(WRITE_PIECE, size - off)))


def seeder_stats(pid: int) -> dict[str, float]:
    """Open descriptors and resident memory (now and peak) of process ``pid``; empty without /proc."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines()) if k in _MEM}
    return {"fds": fds, "rss_mb": round(kib["VmRSS"] / 1024, 1), "peak_rss_mb": round(kib["VmHWM"] / 1024, 1)}


def _write_case(folder: Path, count: int, size: int) -> tuple[Path, Path]:
    """Write ``count`` random files of ``size`` bytes under ``folder/tree`` and one file of their total size."""
    tree = folder / "tree"
    for i in range(count):
        sub = tree / f"part-{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        with (sub / f"file-{i:06d}.bin").open("wb") as f:
            _write_random(f, size)
    single = folder / "single.bin"
    with single.open("wb") as f:
        for _ in range(count):
            _write_random(f, size)
    return tree, single


@contextlib.contextmanager
def cascade_seeder(folder: Path) -> Iterator[tuple[str, int]]:
    """A tracker and one Cascade seeder serving ``tree`` and ``single.bin``; yields (tracker address, seeder PID).

    Raises RuntimeError when either does not start.
    """
    for target in (folder / "tree", folder / "single.bin"):
        subprocess.run(_cmd("peer.cascade_command", "create", str(target)), check=True, capture_output=True)
    tracker, tport = _start(folder / "tracker.log", *_cmd("tracker", "run", "--host", "127.0.0.1", "--port", "0"))
    seeder = None
    try:
        addr = f"127.0.0.1:{tport}"
        seeder, _ = _start(
            folder / "seed.log",
            *_cmd(
                "peer",
                "seed",
                str(folder / "tree.cascade"),
                str(folder / "single.bin.cascade"),
                "--tracker",
                addr,
                "--listen",
                "127.0.0.1:0",
            ),
        )
        _wait_line(folder / "seed.log", r"single\.bin\.cascade: ")
        # The seeder announces every member after that line (10,001 for the small
        # case, about 1 CPU-s): the first fetch would share the 2 cores with it.
        _wait_quiet(seeder.pid)
        yield addr, seeder.pid
    finally:
        for proc in (seeder, tracker):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def _cascade_run(folder: Path, run: int, addr: str, total: int) -> dict[str, object]:
    """Time Cascade's fetch of the collection and of the file into fresh outputs (order alternating per run)."""
    got_one, got_tree = folder / f"got-{run}.bin", folder / f"got-tree-{run}"
    if run % 2 == 0:
        one_wall, one_s = _fetch(folder / "single.bin.cascade", got_one, addr)
        coll_wall, coll_s = _fetch(folder / "tree.cascade", got_tree, addr)
    else:
        coll_wall, coll_s = _fetch(folder / "tree.cascade", got_tree, addr)
        one_wall, one_s = _fetch(folder / "single.bin.cascade", got_one, addr)
    return {
        "collection_wall_s": round(coll_wall, 3),
        "collection_fetch_s": round(coll_s, 3),
        "one_file_wall_s": round(one_wall, 3),
        "one_file_fetch_s": round(one_s, 3),
        "ratio_wall": round(coll_wall / one_wall, 2),
        "collection_MiB_s": round(total / MIB / coll_wall, 1),
        "one_file_MiB_s": round(total / MIB / one_wall, 1),
    }


def lt_torrents(group: Group, folder: Path) -> dict[str, int]:
    """Make ``lt/tree.torrent`` and ``lt/single.bin.torrent``; returns libtorrent's default piece length of each.

    Raises BenchError when libtorrent fails.
    """
    (folder / "lt").mkdir()
    return {
        "collection": make_torrent(group, folder / "tree", folder / "lt" / "tree.torrent"),
        "one_file": make_torrent(group, folder / "single.bin", folder / "lt" / "single.bin.torrent"),
    }


def _tree_size(path: Path) -> tuple[int, int]:
    """(regular files, their total bytes) under ``path``, or (1, size) for a file; (0, 0) if missing."""
    if path.is_file():
        return 1, path.stat().st_size
    sizes = [p.stat().st_size for p in path.rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


def _lt_fetch(group: Group, folder: Path, name: str, run: int, expect: tuple[int, int]) -> tuple[float, float]:
    """Seed ``lt/NAME.torrent`` from ``folder`` in one libtorrent process and fetch it in another.

    Returns the fetcher's wall time from its start to ``done`` (hash-checked and
    written out), and from its ``started`` (session up) to ``done``. Both
    processes are stopped by PID before it returns. Raises BenchError when a
    process fails, a wait passes LT_TIMEOUT, or the output holds other than
    ``expect`` (files, bytes).
    """
    torrent = folder / "lt" / f"{name}.torrent"
    out = folder / f"lt-got-{name}-{run}"
    out.mkdir()
    seeder = group.python(f"lt-seed-{name}-{run}", ["-m", "bench.lt_peer", "seed", str(torrent), str(folder), "0"])
    try:
        port = seeder.wait_listening(LT_TIMEOUT)
        start = time.time()  # lt_peer prints its done time as time.time()
        fetcher = group.python(
            f"lt-fetch-{name}-{run}", ["-m", "bench.lt_peer", "fetch", str(torrent), str(out), "0", str(port)]
        )
        try:
            done = float(fetcher.wait_for(DONE, LT_TIMEOUT, "out").group(1))
            m = _LT_STARTED.search(fetcher.stdout)
        finally:
            fetcher.stop()
    finally:
        seeder.stop()
    got = _tree_size(out / name)
    if got != expect:
        raise BenchError(f"libtorrent fetched {got[0]} files of {got[1]} bytes into {out}, expected {expect}")
    if m is None:
        raise BenchError(f"{fetcher.name} printed no started line\n{fetcher.tail()}")
    return done - start, done - float(m.group(1))


def _lt_run(group: Group, folder: Path, run: int, count: int, size: int) -> dict[str, object]:
    """Time libtorrent's fetch of the tree torrent and of the single-file one (order alternating per run)."""
    total = count * size
    order = ("single.bin", "tree") if run % 2 == 0 else ("tree", "single.bin")
    expect = {"single.bin": (1, total), "tree": (count, total)}
    times = {name: _lt_fetch(group, folder, name, run, expect[name]) for name in order}
    wall = {name: t[0] for name, t in times.items()}
    return {
        "lt_collection_wall_s": round(wall["tree"], 3),
        "lt_collection_fetch_s": round(times["tree"][1], 3),
        "lt_one_file_wall_s": round(wall["single.bin"], 3),
        "lt_one_file_fetch_s": round(times["single.bin"][1], 3),
        "lt_ratio_wall": round(wall["tree"] / wall["single.bin"], 2),
        "lt_collection_MiB_s": round(total / MIB / wall["tree"], 1),
        "lt_one_file_MiB_s": round(total / MIB / wall["single.bin"], 1),
    }


def measure(folder: Path, count: int, size: int, runs: int, tools: Sequence[str]) -> Iterator[dict[str, object]]:
    """Write the case's data, start the seeders of ``tools``, and yield one result per run of every fetch.

    Raises RuntimeError (BenchError included) when a process fails or a wait passes its bound.
    """
    tree, _ = _write_case(folder, count, size)
    total = count * size
    logs = folder / "logs"
    logs.mkdir()
    group = Group(logs)
    with contextlib.ExitStack() as stack:
        stack.callback(group.stop_all)
        pieces = lt_torrents(group, folder) if "libtorrent" in tools else None
        addr, seeder_pid, serving = None, 0, {}
        if "cascade" in tools:
            addr, seeder_pid = stack.enter_context(cascade_seeder(folder))
            serving = seeder_stats(seeder_pid)
        for run in range(runs):
            result: dict[str, object] = {
                "files": count,
                "file_size": size,
                "total_bytes": total,
                "run": run + 1,
                "load_1min": round(os.getloadavg()[0], 1),
            }
            if addr is not None:
                result.update(_cascade_run(folder, run, addr, total))
            if pieces is not None:
                result.update(_lt_run(group, folder, run, count, size))
                result["lt_piece_length"] = pieces
            result["cp_r_s"] = round(_copy(tree, folder / f"copy-{run}"), 3)
            if addr is not None:
                result["seeder_serving"] = serving
                result["seeder_after"] = seeder_stats(seeder_pid)
            yield result


def have_libtorrent() -> bool:
    """Whether ``import libtorrent`` works here."""
    try:
        importlib.import_module("libtorrent")
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000, help="files of 4 KiB (default 10000)")
    parser.add_argument("--big-files", type=int, default=10, help="large files (default 10)")
    parser.add_argument("--big-size", type=int, default=40, help="MiB per large file (default 40)")
    parser.add_argument("--runs", type=int, default=1, help="fetches of each case on the same data (default 1)")
    parser.add_argument("--only", choices=["small", "big"], help="run one case")
    parser.add_argument(
        "--tools",
        help="comma-separated, of " + ",".join(TOOLS) + " (default both when libtorrent imports, else cascade)",
    )
    args = parser.parse_args()
    if args.tools is None:
        tools = list(TOOLS) if have_libtorrent() else ["cascade"]
        if "libtorrent" not in tools:
            print("collection_fetch: libtorrent does not import here: measuring cascade only", file=sys.stderr)
    else:
        tools = [t for t in args.tools.split(",") if t]
        unknown = sorted(set(tools) - set(TOOLS))
        if unknown or not tools:
            parser.error(f"--tools takes {','.join(TOOLS)}, not {args.tools!r}")
        if "libtorrent" in tools and not have_libtorrent():
            parser.error("libtorrent does not import here (pip install -e '.[bench]')")
    cases = {"small": (args.small, 4 * KIB), "big": (args.big_files, args.big_size * MIB)}
    for name, (count, size) in cases.items():
        if args.only not in (None, name):
            continue
        folder = Path(tempfile.mkdtemp(prefix="cascade-collbench-"))
        try:
            for result in measure(folder, count, size, max(1, args.runs), tools):
                print(json.dumps(result), flush=True)
        except (RuntimeError, subprocess.SubprocessError) as exc:  # a failed create or fetch: one line
            print(f"collection_fetch: {exc}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
