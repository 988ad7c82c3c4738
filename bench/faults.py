"""The fault bench (issue 9, section 7): the fault suite of ``tests/`` at full size, as counts.

    python -m bench.faults                   # full size (a few minutes)
    python -m bench.faults --quick           # reduced sizes
    python -m bench.faults --only kill hostile
    python -m bench --only faults            # the same, as a case of the whole bench

Parts, each printing one JSON line per scenario with ``tried``, ``failed``,
``blocks_lost`` and ``bytes_wrong`` (and what else it measured):

- ``kill``: SIGKILL ``peer fetch`` at 20 seeded random moments of one
  download from a rate-limited ``peer seed``, rerunning after each; then a
  last rerun to completion. ``blocks_lost``: verified blocks gone after a
  kill; ``blocks_refetched``: verified blocks the reruns downloaded again.
- ``hostile``: every row of :data:`tests.hostile.BEHAVIOURS` beside one
  honest seeder, with the default fetch policy. A row fails when the fetch
  does not complete with the right bytes or the hostile peer kept a block.
- ``dead-peers``: ``peer fetch`` processes beside one honest ``peer seed``:
  ``dead-peers``, a real tracker with 10,000 subscribed addresses that refuse
  (9,800) or never answer a SYN (200, listeners with a full backlog);
  ``huge-reply``, a fake tracker whose every reply holds the same 65,535
  records, all dead but the honest seeder's, last. Each run also times a
  fetch from the seeder alone (``dead_peer_cost_seconds`` is the difference).
  The target is completion with the right bytes within 15 s of the start.
- ``tricklers``: 16 peers that send a valid header and then a byte a second,
  subscribed after the honest seeder (so they look more recent).
- ``flood``: against ``peer seed``, 520 idle connections (8 over its cap),
  then 1,000 idle + 100 slowloris writers (a request sent one byte every
  2 s) + 100 slowloris readers (four kept-open requests, then one byte read
  every 2 s); each first reopening every connection the server closes, then
  one-shot. Meanwhile 20 real block requests, each on a fresh connection
  with a 5 s timeout, one every 0.25 s; one fails when it gets no right answer.

Everything listens on 127.0.0.1; every process is stopped by its PID; the
data lives in a temporary folder removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.data import make_file
from bench.flooder import Flooder
from bench.procs import Child
from cascade.errors import CascadeError
from cascade.metafile import CascadeFile, parse_cascade
from cascade.wire import (
    BLOCK_RESPONSE_HEADER_SIZE,
    BlockRequest,
    BlockStatus,
    PeerRecord,
    unpack_block_response_header_from,
)
from peer.fetcher import Fetcher, FetchPolicy
from peer.localdata import check_data, create_metafile
from peer.storage import BlockStore
from peer.tracker_client import TrackerAddress
from tests.doubles import (
    FakeTracker,
    Swarm,
    TrickleServer,
    hanging_addresses,
    honest_seeder,
    last_json,
    refused_addresses,
    started,
    subscribe_all,
    verified_blocks,
)
from tests.hostile import BEHAVIOURS, PROTOCOL_BREAKERS, fetch_beside

MiB = 1 << 20
PARTS = ("kill", "hostile", "dead-peers", "tricklers", "flood")
PROGRESS = re.compile(r"^progress (\d+) (\d+)")
WAIT = 120.0  # seconds any single wait may take before a part gives up


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
    dead_peers: int  # subscribed at a real tracker (which holds 10,000 per swarm at most)
    huge_reply: int  # records in every reply of the fake tracker (65,535: the most a reply can hold)
    dead_size: int
    dead_runs: int  # runs of each dead-peer and trickler scenario
    flood_idle: int
    flood_slowloris: int
    flood_requests: int


FULL = Sizes(128 * MiB, 256 << 10, 20, "32M", 64 * MiB, 256 << 10, 64 * MiB, 10_000, 65_535, 8 * MiB, 2, 1000, 200, 20)
QUICK = Sizes(16 * MiB, 64 << 10, 5, "8M", 8 * MiB, 64 << 10, 16 * MiB, 1000, 5000, 4 * MiB, 1, 100, 20, 5)


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
            now = verified_blocks(out, cf)
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
    with honest_seeder(cf, data, upload_rate=rate) as server:
        _, seconds, _ = _fetch(cf, out, [(*server.address, True)], policy)
    out.unlink(missing_ok=True)
    return seconds


# --- dead peers and tricklers: real processes, one honest seeder among peers that cannot help ------


# Dead peers that let a connect hang (listeners with a full backlog, like a machine that
# vanished); the others refuse at once (a process that exited). Arbitrary: both kinds exist.
HANGING = 200
FETCH_TIMEOUT = 60.0  # the fetch's own --timeout: far above the 15 s target, so a slow fetch is measured
TRICKLERS = 16


def _fetch_process(swarm: Swarm, cascade: Path, data: Path, out: Path, tracker: str) -> dict[str, Any]:
    """One ``peer fetch`` process asking ``tracker``: wall time, its own seconds, and what went wrong."""
    start = time.monotonic()
    proc = swarm.start(
        "peer", "fetch", str(cascade), "--out", str(out), "--tracker", tracker,
        "--listen", "127.0.0.1:0", "--json", "--timeout", f"{FETCH_TIMEOUT:g}",
    )  # fmt: skip
    try:
        rc: int | None = proc.wait(FETCH_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.monotonic() - start
    proc.stop()
    doc = last_json(proc) if rc == 0 else {}
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    return {
        "wall_s": round(wall, 3),
        "fetch_s": doc.get("seconds"),
        "ok": rc == 0 and doc.get("complete") is True,
        "bytes_wrong": bytes_wrong(data, out),
        "error": errors[-1] if errors else None,
    }


def _runs_doc(variant: str, runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The counts of several fetch runs of one scenario (a run fails when incomplete or wrong)."""
    failed = [r for r in runs if not r["ok"] or r["bytes_wrong"]]
    doc: dict[str, Any] = {
        "case": "faults",
        "variant": variant,
        "tried": len(runs),
        "failed": len(failed),
        "blocks_lost": 0,  # nothing verified exists before these fetches
        "bytes_wrong": sum(r["bytes_wrong"] for r in runs),
        "max_wall_s": max(r["wall_s"] for r in runs),
        **extra,
        "runs": runs,
    }
    if "baseline_wall_s" in runs[0]:
        doc["honest_only_seconds"] = max(r["baseline_wall_s"] for r in runs)
        doc["dead_peer_cost_seconds"] = round(max(r["wall_s"] - r["baseline_wall_s"] for r in runs), 2)
    return doc


# What a scenario adds beside the tracker and the honest seeder, given (stack, swarm, cf, seeder
# port): the tracker address the fetch asks, and what to add to the run's figures once it is done.
Setup = Callable[[contextlib.ExitStack, Swarm, CascadeFile, int], tuple[str, Callable[[], dict[str, Any]]]]


def _fetch_runs(work: Path, sizes: Sizes, name: str, setup: Setup, baseline: bool) -> list[dict[str, Any]]:
    """``sizes.dead_runs`` runs of one scenario: a tracker, an honest ``peer seed``, ``setup``, one ``peer fetch``.

    With ``baseline``, each run first times a fetch from the seeder alone.
    """
    runs = []
    for run in range(sizes.dead_runs):
        folder = work / f"{name}{run}"
        data, cascade, cf = data_file(folder, "d.bin", sizes.dead_size, 256 << 10)
        swarm = Swarm(folder)
        with contextlib.ExitStack() as stack:
            stack.callback(swarm.stop)
            swarm.start_tracker()
            _, seeder_port = swarm.seeder(cascade, cf)
            alone = _fetch_process(swarm, cascade, data, folder / "baseline", swarm.tracker) if baseline else None
            tracker, figures = setup(stack, swarm, cf, seeder_port)
            r = _fetch_process(swarm, cascade, data, folder / "out", tracker)
            if alone is not None:
                r["baseline_wall_s"] = alone["wall_s"]
            r.update(figures())
            runs.append(r)
    return runs


def _dead_at_tracker(
    stack: contextlib.ExitStack, swarm: Swarm, cf: CascadeFile, seeder_port: int, count: int
) -> tuple[str, Callable[[], dict[str, Any]]]:
    """A real tracker with ``count`` subscribed addresses that refuse or hang, then the honest seeder.

    The tracker holds 10,000 peers per swarm at most, so the seeder's address
    is announced again last, as its periodic announce would.
    """
    tracker = TrackerAddress("127.0.0.1", swarm.tracker_port)
    dead = refused_addresses(stack, count - HANGING, ports=40) + hanging_addresses(stack, HANGING)
    subscribe_all(tracker, cf.cascade_hash, dead)
    subscribe_all(tracker, cf.cascade_hash, [("127.0.0.1", seeder_port)])
    return swarm.tracker, dict


def _huge_reply(
    stack: contextlib.ExitStack, swarm: Swarm, cf: CascadeFile, seeder_port: int, count: int
) -> tuple[str, Callable[[], dict[str, Any]]]:
    """A fake tracker whose every reply holds the same ``count`` records, the honest seeder last."""
    hanging = hanging_addresses(stack, HANGING)
    dead = refused_addresses(stack, count - 1 - HANGING, ports=256) + hanging
    now = int(time.time())
    records = [PeerRecord(ip, port, now, True) for ip, port in dead]
    records.append(PeerRecord("127.0.0.1", seeder_port, now, True))
    fake = FakeTracker(records).start()
    stack.callback(fake.stop)
    return f"127.0.0.1:{fake.address[1]}", lambda: {"tracker_requests": fake.requests}


def _tricklers(
    stack: contextlib.ExitStack, swarm: Swarm, cf: CascadeFile, seeder_port: int
) -> tuple[str, Callable[[], dict[str, Any]]]:
    """Peers that send a valid header and then a byte a second, subscribed after the honest seeder."""
    tricklers = started(stack, (TrickleServer(cf) for _ in range(TRICKLERS)))
    # Subscribed after the seeder, so they look more recent and are tried first.
    subscribe_all(TrackerAddress("127.0.0.1", swarm.tracker_port), cf.cascade_hash, [t.address for t in tricklers])
    return swarm.tracker, lambda: {"trickler_connections": sum(t.connections for t in tricklers)}


def part_dead_peers(work: Path, sizes: Sizes) -> list[dict[str, Any]]:
    dead = functools.partial(_dead_at_tracker, count=sizes.dead_peers)
    huge = functools.partial(_huge_reply, count=sizes.huge_reply)
    common = {"hanging": HANGING, "size_MiB": sizes.dead_size // MiB}
    return [
        _runs_doc("dead-peers", _fetch_runs(work, sizes, "tracker", dead, True), dead_peers=sizes.dead_peers, **common),
        _runs_doc("huge-reply", _fetch_runs(work, sizes, "huge", huge, True), records=sizes.huge_reply, **common),
    ]


def part_tricklers(work: Path, sizes: Sizes) -> list[dict[str, Any]]:
    runs = _fetch_runs(work, sizes, "trickle", _tricklers, False)
    return [_runs_doc("tricklers", runs, tricklers=TRICKLERS, size_MiB=sizes.dead_size // MiB)]


# --- flood: idle and slowloris connections against peer seed, then real requests ---------------


REAL_INTERVAL = 0.25  # seconds between real requests, so they meet the flood in every state
REAL_TIMEOUT = 5.0  # seconds a real block request may take during the flood
TRICKLE_INTERVAL = 2.0  # seconds between slowloris bytes (sent or read)
RECONNECT_RATE = 2000  # reconnects per second at most: enough to hold the count, not to run out of ports


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed without a full reply")
        buf += chunk
    return bytes(buf)


def _real_request(port: int, index: int, cascade_hash: bytes, expected_length: int) -> tuple[float, bytes]:
    """One block request on a fresh connection: (latency in seconds, body). Raises OSError or EOFError."""
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=REAL_TIMEOUT) as sock:
        sock.sendall(BlockRequest(index, cascade_hash, False).encode())
        status, length = unpack_block_response_header_from(_recv_exact(sock, BLOCK_RESPONSE_HEADER_SIZE))
        if status != BlockStatus.OK or length != expected_length:
            raise EOFError(f"status {status}")
        body = _recv_exact(sock, length)
    return time.perf_counter() - t, body


def _flood_scenario(work: Path, name: str, counts: dict[str, int], reconnect: bool, requests: int) -> dict[str, Any]:
    data, cascade, cf = data_file(work, "d.bin", 8 * MiB, 256 << 10)
    # Nothing listens at the tracker's address: the seeder serves all the same, and nothing else talks to it.
    seed_args = ["seed", str(cascade), "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0"]
    seeder = Child.python(f"seed-{name}", ["-m", "peer", *seed_args], work)
    flooder: Flooder | None = None
    try:
        port = seeder.wait_listening()
        keep = b"".join(BlockRequest(i, cf.cascade_hash, True).encode() for i in range(4))
        flooder = Flooder(
            port,
            counts,
            partial=BlockRequest(0, cf.cascade_hash, False).encode(),
            keep_requests=keep,
            interval=TRICKLE_INTERVAL,
            reconnect=reconnect,
            reconnect_rate=RECONNECT_RATE,
        )
        flooder.start()
        latencies: list[float] = []
        failures: list[str] = []
        wrong = 0
        with data.open("rb") as f:
            for i in range(requests):
                index = i % cf.block_count
                f.seek(cf.block_offset(index))
                expected = f.read(cf.block_length(index))
                try:
                    latency, body = _real_request(port, index, cf.cascade_hash, len(expected))
                except (OSError, EOFError) as exc:
                    failures.append(type(exc).__name__)
                else:
                    latencies.append(latency)
                    if body != expected:
                        wrong += sum(1 for a, b in zip(body, expected, strict=True) if a != b)
                        failures.append("wrong bytes")
                time.sleep(REAL_INTERVAL)  # pacing the client, not waiting for the server
        return {
            "case": "faults",
            "variant": f"flood-{name}" + ("" if reconnect else "-oneshot"),
            "tried": requests,
            "failed": len(failures),
            "blocks_lost": 0,
            "bytes_wrong": wrong,
            "flood": counts,
            "reconnect": reconnect,
            "failures": sorted(set(failures)),
            "max_latency_s": round(max(latencies), 4) if latencies else None,
            "median_latency_s": round(statistics.median(latencies), 4) if latencies else None,
            "within_1s": sum(1 for x in latencies if x <= 1.0),
            "flood_held": sum(flooder.held().values()),
            "flood_opened": flooder.opened,
            "flood_closed_by_server": flooder.closed_by_server,
            "seeder_alive": seeder.poll() is None,
        }
    finally:
        if flooder is not None:
            flooder.stop()
        seeder.stop()


def part_flood(work: Path, sizes: Sizes) -> list[dict[str, Any]]:
    """Each flood scenario reconnecting, then one-shot (the flood does not reopen what the server closes)."""
    # 520: 8 over the seeder's cap of 512 connections. Slowloris clients: half writers, half readers.
    slow = sizes.flood_slowloris // 2
    scenarios = {"idle520": {"idle": 520}, "full": {"idle": sizes.flood_idle, "writer": slow, "reader": slow}}
    docs = []
    for reconnect in (True, False):
        for name, counts in scenarios.items():
            folder = work / f"{name}-{'re' if reconnect else 'one'}"
            folder.mkdir()
            docs.append(_flood_scenario(folder, name, counts, reconnect, sizes.flood_requests))
    return docs


# --- entry points -------------------------------------------------------------------------


RUNNERS: dict[str, Callable[[Path, Sizes], list[dict[str, Any]]]] = {
    "kill": lambda work, sizes: [part_kill(work, sizes)],
    "hostile": lambda work, sizes: [part_hostile(work, sizes)],
    "dead-peers": part_dead_peers,
    "tricklers": part_tricklers,
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
            found = RUNNERS[name](folder, sizes)
        except (OSError, CascadeError, TimeoutError, RuntimeError) as exc:
            found = [{"case": "faults", "variant": name, "error": str(exc).splitlines()[0]}]
        docs += found
        if echo:
            for doc in found:
                print(json.dumps(doc), flush=True)
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.faults", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="reduced sizes")
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
