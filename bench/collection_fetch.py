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
40 MiB (a tenth of the issue's 400 MiB, to keep the bench within a few minutes
and the disk use under 2 GB; ``--big-size 400`` is the issue's case, about 17 GB
of disk while it runs). Everything it writes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

KIB, MIB = 1 << 10, 1 << 20
# Random data is written in pieces of this size, so a 400 MiB file never sits in memory whole.
WRITE_PIECE = 4 * MIB
# The lines of /proc/PID/status read for the seeder's memory: resident now, and its peak.
_MEM = ("VmRSS", "VmHWM")
_LISTENING = re.compile(r"listening on \S+:(\d+)")


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


def measure(folder: Path, count: int, size: int, runs: int) -> Iterator[dict[str, object]]:
    """Write the case's data, start a tracker and a seeder, and yield one result per run of both fetches."""
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
    for target in (tree, single):
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
        time.sleep(1.0)  # let the first announces of every member reach the tracker (a bench, not a test)
        serving = seeder_stats(seeder.pid)
        total = count * size
        for run in range(runs):
            got_one, got_tree = folder / f"got-{run}.bin", folder / f"got-tree-{run}"
            load = os.getloadavg()[0]
            if run % 2 == 0:
                one_wall, one_s = _fetch(folder / "single.bin.cascade", got_one, addr)
                coll_wall, coll_s = _fetch(folder / "tree.cascade", got_tree, addr)
            else:
                coll_wall, coll_s = _fetch(folder / "tree.cascade", got_tree, addr)
                one_wall, one_s = _fetch(folder / "single.bin.cascade", got_one, addr)
            copy_wall = _copy(tree, folder / f"copy-{run}")
            after = seeder_stats(seeder.pid)
            yield {
                "files": count,
                "file_size": size,
                "total_bytes": total,
                "run": run + 1,
                "load_1min": round(load, 1),
                "collection_wall_s": round(coll_wall, 3),
                "collection_fetch_s": round(coll_s, 3),
                "one_file_wall_s": round(one_wall, 3),
                "one_file_fetch_s": round(one_s, 3),
                "ratio_wall": round(coll_wall / one_wall, 2),
                "cp_r_s": round(copy_wall, 3),
                "collection_MiB_s": round(total / MIB / coll_wall, 1),
                "one_file_MiB_s": round(total / MIB / one_wall, 1),
                "seeder_serving": serving,
                "seeder_after": after,
            }
    finally:
        for proc in (seeder, tracker):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000, help="files of 4 KiB (default 10000)")
    parser.add_argument("--big-files", type=int, default=10, help="large files (default 10)")
    parser.add_argument("--big-size", type=int, default=40, help="MiB per large file (default 40)")
    parser.add_argument("--runs", type=int, default=1, help="fetches of each case on the same data (default 1)")
    parser.add_argument("--only", choices=["small", "big"], help="run one case")
    args = parser.parse_args()
    cases = {"small": (args.small, 4 * KIB), "big": (args.big_files, args.big_size * MIB)}
    for name, (count, size) in cases.items():
        if args.only not in (None, name):
            continue
        folder = Path(tempfile.mkdtemp(prefix="cascade-collbench-"))
        try:
            for result in measure(folder, count, size, max(1, args.runs)):
                print(json.dumps(result), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
