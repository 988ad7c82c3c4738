"""The fault bench (issue 9, section 7): the fault suite of ``tests/`` at full size, as counts.

    python -m bench.faults                   # full size (about a minute or two)
    python -m bench.faults --quick           # reduced sizes, seconds
    python -m bench.faults --only kill hostile
    python -m bench --only faults            # the same, as a case of the whole bench

Parts, each printed as one JSON line with ``tried``, ``failed``,
``blocks_lost`` and ``bytes_wrong`` (and what else it measured):

- ``kill``: SIGKILL ``peer fetch`` at 20 seeded random moments of one
  download from a rate-limited ``peer seed``, rerunning after each; then a
  last rerun to completion. ``blocks_lost``: verified blocks gone after a
  kill; ``blocks_refetched``: verified blocks the reruns downloaded again.
- ``hostile``: every row of :data:`tests.hostile.BEHAVIOURS` beside one
  honest seeder, with the default fetch policy. A row fails when the fetch
  does not complete with the right bytes or the hostile peer kept a block.
- ``dead-peers``: one honest seeder listed among 10,000 dead peers (most
  refuse the connection, some accept nothing and let it time out).
- ``flood``: 1,000 idle and 200 slowloris connections held open against
  ``peer seed``, then 20 real block requests; a request fails when it gets
  no right answer within ``REQUEST_DEADLINE``.

Everything listens on 127.0.0.1; every process is stopped by its PID; the
data lives in a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.data import make_file
from cascade.errors import CascadeError
from cascade.metafile import CascadeFile, parse_cascade
from cascade.wire import BLOCK_MAGIC, BlockResponseReader
from peer.fetcher import Fetcher, FetchPolicy
from peer.localdata import check_data, create_metafile
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from tests.doubles import Swarm, last_json
from tests.hostile import BEHAVIOURS, PROTOCOL_BREAKERS, black_holes, fetch_beside

MiB = 1 << 20
PARTS = ("kill", "hostile", "dead-peers", "flood")
PROGRESS = re.compile(r"^progress (\d+) (\d+)")
WAIT = 120.0  # seconds any single wait may take before a part gives up
REQUEST_DEADLINE = 10.0  # seconds a real block request may take during the flood


@dataclass(frozen=True)
class Sizes:
    """Sizes of one mode; the full ones are those of issue 9."""

    kill_size: int
    kill_block: int
    kills: int
    kill_rate: str  # the seeder's --max-upload-rate: a fetch must last long enough to be killed 20 times
    hostile_size: int
    hostile_block: int
    hostile_rate: int
    dead_peers: int
    dead_size: int
    flood_idle: int
    flood_slowloris: int
    flood_requests: int


FULL = Sizes(128 * MiB, 256 << 10, 20, "32M", 64 * MiB, 256 << 10, 64 * MiB, 10_000, 16 * MiB, 1000, 200, 20)
QUICK = Sizes(16 * MiB, 64 << 10, 5, "8M", 8 * MiB, 64 << 10, 16 * MiB, 1000, 4 * MiB, 100, 20, 5)


def data_file(folder: Path, name: str, size: int, block: int) -> tuple[Path, Path, CascadeFile]:
    """Random data at ``folder/name`` and its ``.cascade``: (data path, cascade path, parsed)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / name
    make_file(data, size)
    raw = create_metafile(data, block)
    cascade = folder / f"{name}.cascade"
    cascade.write_bytes(raw)
    return data, cascade, parse_cascade(raw)


def bytes_wrong(a: Path, b: Path) -> int:
    """How many bytes differ between two files (a missing or short file's absent bytes count)."""
    if not b.is_file():
        return a.stat().st_size
    wrong = abs(a.stat().st_size - b.stat().st_size)
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if not x or not y:
                return wrong
            if x != y:
                wrong += sum(1 for i, j in zip(x, y, strict=False) if i != j)


def partial_files(out: Path) -> list[Path]:
    """``out`` and anything a fetch leaves beside it (``out.part`` once issue 9 section 1 is in)."""
    # Any name holding out's (``d.bin.part``, ``.d.bin.part``, ``d.bin.partial``...): the folder holds nothing else.
    beside = sorted(p for p in out.parent.glob(f"*{out.name}*") if p != out and not p.name.endswith(".cascade"))
    return [p for p in (*beside, out) if p.is_file()]


def verified(out: Path, cf: CascadeFile) -> set[int]:
    found: set[int] = set()
    for p in partial_files(out):
        check = check_data(p, cf, whole_file=False)
        found |= {i for i, ok in enumerate(check.valid) if ok}
    return found


# --- kill: SIGKILL at random moments, rerun ------------------------------------------------


def part_kill(work: Path, sizes: Sizes, seed: int = 9) -> dict[str, Any]:
    data, cascade, cf = data_file(work / "kill", "d.bin", sizes.kill_size, sizes.kill_block)
    out = work / "kill-out" / "d.bin"
    out.parent.mkdir()
    swarm = Swarm(work)
    rng = random.Random(seed)
    moments = sorted(rng.uniform(0.02, 0.95) for _ in range(sizes.kills))
    tried = failed = lost = finished_early = 0
    before: set[int] = set()
    started = time.monotonic()
    try:
        swarm.start_tracker()
        swarm.seeder(cascade, cf, "--max-upload-rate", sizes.kill_rate)
        for fraction in moments:
            at_least = max(int(fraction * cf.data_length), (len(before) + 1) * cf.block_size)
            if at_least >= cf.data_length:
                break
            proc = swarm.fetcher(cascade, out, "--progress-lines")
            tried += 1
            deadline = time.monotonic() + WAIT
            killed = False
            while time.monotonic() < deadline and proc.popen.poll() is None:
                seen = [int(m.group(1)) for m in map(PROGRESS.match, proc.stderr.splitlines()) if m]
                if seen and seen[-1] >= at_least:
                    proc.kill()
                    killed = True
                    break
                time.sleep(0.005)
            proc.stop()
            if not killed:
                # It finished (or failed) before the moment came: counted apart, not a kill.
                finished_early += 1
                failed += proc.popen.returncode != 0
                break
            now = verified(out, cf)
            gone = len(before - now)
            lost += gone
            failed += gone > 0
            before = now
        proc = swarm.fetcher(cascade, out)
        rc = proc.wait(WAIT)
        result = last_json(proc) if rc == 0 else {}
        downloaded = int(result.get("blocks_downloaded", 0))
        refetched = max(0, downloaded - (cf.block_count - len(before)))
        complete = rc == 0 and result.get("complete") is True
        failed += (not complete) + (refetched > 0)
        wrong = bytes_wrong(data, out)
    finally:
        swarm.stop()
    return {
        "case": "faults",
        "variant": "kill",
        "tried": tried,
        "failed": failed,
        "blocks_lost": lost,
        "bytes_wrong": wrong,
        "blocks_refetched": refetched,
        "finished_before_kill": finished_early,
        "complete": complete,
        "blocks": cf.block_count,
        "size_MiB": cf.data_length // MiB,
        "seconds": round(time.monotonic() - started, 2),
    }


# --- hostile: the table of tests/hostile.py at full size -------------------------------------


def part_hostile(work: Path, sizes: Sizes) -> dict[str, Any]:
    data, _, cf = data_file(work / "hostile", "d.bin", sizes.hostile_size, sizes.hostile_block)
    rows: dict[str, dict[str, Any]] = {}
    failed = wrong_total = 0
    policy = FetchPolicy()  # what users get
    for n, behaviour in enumerate(BEHAVIOURS):
        out = work / "hostile-out" / f"{n}.bin"
        out.parent.mkdir(exist_ok=True)
        started = time.monotonic()
        row: dict[str, Any] = {}
        try:
            o = fetch_beside(behaviour, data, cf, out, policy, sizes.hostile_rate)
        except CascadeError as exc:
            row["error"] = str(exc)
            ok = False
        else:
            banned = o.hostile_name in o.result.banned
            row.update(
                banned=banned,
                dropped_during_fetch=o.dropped_during_fetch,
                hostile_blocks=o.result.sources.get(o.hostile_name, 0),
            )
            ok = o.result.complete and not row["hostile_blocks"]
            if behaviour in PROTOCOL_BREAKERS:
                ok = ok and banned
        row["seconds"] = round(time.monotonic() - started, 2)
        row["bytes_wrong"] = bytes_wrong(data, out)
        wrong_total += row["bytes_wrong"]
        ok = ok and not row["bytes_wrong"]
        row["ok"] = ok
        failed += not ok
        rows[behaviour] = row
        out.unlink(missing_ok=True)
    baseline = _honest_only(data, cf, work / "hostile-out" / "baseline.bin", policy, sizes.hostile_rate)
    return {
        "case": "faults",
        "variant": "hostile",
        "tried": len(rows),
        "failed": failed,
        "blocks_lost": 0,  # nothing verified exists before these fetches
        "bytes_wrong": wrong_total,
        "honest_only_seconds": round(baseline, 2),
        "rows": rows,
        "size_MiB": cf.data_length // MiB,
    }


@contextlib.contextmanager
def honest_seeder(data: Path, cf: CascadeFile, rate: int | None) -> Iterator[BlockServer]:
    store = BlockStore.open_for_seeding(cf, data)
    server = BlockServer("127.0.0.1", 0, BlockServerConfig(upload_rate=rate))
    server.add_store(store)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        store.close()


def _fetch(
    cf: CascadeFile, out: Path, peers: list[tuple[str, int, bool]], policy: FetchPolicy
) -> tuple[bool, float, str]:
    """(complete, seconds, error) of one in-process fetch from ``peers``."""
    store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
    started = time.monotonic()
    try:
        fetcher = Fetcher(store, lambda: peers, policy=policy)
        fetcher.add_peers(peers)
        return fetcher.run().complete, time.monotonic() - started, ""
    except CascadeError as exc:
        return False, time.monotonic() - started, str(exc)
    finally:
        store.close()


def _honest_only(data: Path, cf: CascadeFile, out: Path, policy: FetchPolicy, rate: int | None) -> float:
    with honest_seeder(data, cf, rate) as server:
        _, seconds, _ = _fetch(cf, out, [(*server.address, True)], policy)
    out.unlink(missing_ok=True)
    return seconds


# --- dead peers: one honest seeder among thousands that are gone ---------------------------------


# One in this many dead peers accepts nothing and lets the connection time out
# (a machine that vanished); the others refuse at once (a process that exited).
# Arbitrary: both kinds exist in real swarms.
BLACK_HOLE_EVERY = 100


def part_dead_peers(work: Path, sizes: Sizes) -> dict[str, Any]:
    data, _, cf = data_file(work / "dead", "d.bin", sizes.dead_size, 256 << 10)
    out = work / "dead-out.bin"
    policy = FetchPolicy()
    holes = sizes.dead_peers // BLACK_HOLE_EVERY
    rng = random.Random(5)
    with black_holes(holes) as hole_addrs, honest_seeder(data, cf, None) as server:
        # Refusing peers: port 1 on addresses all over 127.0.0.0/8, where nothing listens.
        refused = {
            (f"127.{rng.randrange(1, 255)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", 1)
            for _ in range(sizes.dead_peers * 2)
        }
        dead = [(ip, port, True) for ip, port in hole_addrs]
        dead += [(ip, port, True) for ip, port in sorted(refused)[: sizes.dead_peers - holes]]
        rng.shuffle(dead)
        peers = [*dead, (*server.address, True)]
        complete, seconds, error = _fetch(cf, out, peers, policy)
        _, baseline, _ = _fetch(cf, work / "dead-baseline.bin", [(*server.address, True)], policy)
    doc: dict[str, Any] = {
        "case": "faults",
        "variant": "dead-peers",
        "tried": 1,
        "failed": int(not complete),
        "blocks_lost": 0,
        "bytes_wrong": bytes_wrong(data, out),
        "dead_peers": len(dead),
        "black_holes": holes,
        "seconds": round(seconds, 2),
        "honest_only_seconds": round(baseline, 2),
        "dead_peer_cost_seconds": round(seconds - baseline, 2),
        "size_MiB": cf.data_length // MiB,
    }
    if error:
        doc["error"] = error
    return doc


# --- flood: idle and slowloris connections against peer seed, then real requests ---------------


def _connect_many(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def _real_request(port: int, cf: CascadeFile, index: int, expected: bytes) -> tuple[bool, float]:
    """One plain block request on a new connection: (right answer within the deadline, seconds)."""
    started = time.monotonic()
    request = BLOCK_MAGIC + bytes(16) + index.to_bytes(8, "big") + cf.cascade_hash
    reader = BlockResponseReader(cf.block_size)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_DEADLINE) as s:
            s.sendall(request)
            while time.monotonic() - started < REQUEST_DEADLINE:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                reader.feed(chunk)
                reply = reader.next()
                if reply is not None:
                    return reply.status == 0 and reply.body == expected, time.monotonic() - started
    except (OSError, CascadeError):
        pass
    return False, time.monotonic() - started


def part_flood(work: Path, sizes: Sizes) -> dict[str, Any]:
    data, cascade, cf = data_file(work / "flood", "d.bin", 16 * MiB, 256 << 10)
    swarm = Swarm(work)
    stop = threading.Event()
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    results: list[tuple[bool, float]] = []
    trickler: threading.Thread | None = None
    try:
        swarm.start_tracker()
        seeder, port = swarm.seeder(cascade, cf)
        idle = _connect_many(port, sizes.flood_idle)
        slow = _connect_many(port, sizes.flood_slowloris)

        def trickle() -> None:
            # Each slowloris connection sends one byte of a valid request every half second.
            request = BLOCK_MAGIC + bytes(16) + (0).to_bytes(8, "big") + cf.cascade_hash
            for b in request:
                for s in slow:
                    with contextlib.suppress(OSError):
                        s.send(bytes([b]))
                if stop.wait(0.5):
                    return

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        rng = random.Random(3)
        with data.open("rb") as f:
            for _ in range(sizes.flood_requests):
                i = rng.randrange(cf.block_count)
                f.seek(cf.block_offset(i))
                results.append(_real_request(port, cf, i, f.read(cf.block_length(i))))
        alive = seeder.popen.poll() is None
    finally:
        stop.set()
        if trickler is not None:
            trickler.join(2)
        for s in idle + slow:
            s.close()
        swarm.stop()
    latencies = sorted(t for ok, t in results if ok)
    return {
        "case": "faults",
        "variant": "flood",
        "tried": len(results),
        "failed": sum(not ok for ok, _ in results),
        "blocks_lost": 0,
        "bytes_wrong": 0,  # a wrong body counts as failed above
        "idle_connected": len(idle),
        "slowloris_connected": len(slow),
        "seeder_alive": alive,
        "max_request_seconds": round(latencies[-1], 3) if latencies else None,
    }


# --- entry points -------------------------------------------------------------------------


RUNNERS: dict[str, Callable[[Path, Sizes], dict[str, Any]]] = {
    "kill": part_kill,
    "hostile": part_hostile,
    "dead-peers": part_dead_peers,
    "flood": part_flood,
}


def run(work: Path, quick: bool, parts: tuple[str, ...] = PARTS, echo: bool = True) -> list[dict[str, Any]]:
    """Run ``parts`` with data under ``work``; returns their JSON documents (printed too, with ``echo``)."""
    sizes = QUICK if quick else FULL
    docs = []
    for name in parts:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            doc = RUNNERS[name](folder, sizes)
        except (OSError, CascadeError, TimeoutError, RuntimeError) as exc:
            doc = {"case": "faults", "variant": name, "error": str(exc).splitlines()[0]}
        docs.append(doc)
        if echo:
            print(json.dumps(doc), flush=True)
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.faults", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="reduced sizes, seconds")
    p.add_argument("--only", nargs="+", choices=PARTS, metavar="PART", help=f"run only these: {', '.join(PARTS)}")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the temporary data")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cascade-faults-", dir=args.tmp))
    try:
        docs = run(work, args.quick, tuple(args.only or PARTS))
    except KeyboardInterrupt:
        print("bench.faults: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = [d for d in docs if d.get("error") or d.get("failed") or d.get("blocks_lost") or d.get("bytes_wrong")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
