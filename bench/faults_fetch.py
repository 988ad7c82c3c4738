"""Dead and slow peers beside one honest seeder: how long ``peer fetch`` takes (issue 9, section 3).

Run as ``python -m bench.faults_fetch [--runs N] [--size BYTES]``; prints one JSON
document with each scenario's wall times (process start to exit) and the
fetch's own ``seconds``. Every scenario runs real ``tracker`` and ``peer``
processes on loopback; the dead peers and tricklers live in this process:

- ``dead_10000``: a real tracker with 10,000 subscribed addresses that refuse
  (9,800) or never answer a SYN (200, listeners with a full backlog), then one
  honest seeder. The tracker holds 10,000 peers per swarm at most, so the
  seeder's address is announced again last, as its periodic announce would.
- ``reply_65535``: a fake tracker whose every reply holds the same 65,535
  dead records (65,335 refused, 200 hanging) and the honest seeder last.
- ``tricklers_16``: 16 peers that send a valid header and then a byte a
  second, subscribed after the honest seeder (so they look more recent).

The target is completion with the right bytes within 15 s of the start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cascade.wire import PeerRecord
from peer.tracker_client import TrackerAddress
from tests.doubles import (
    FakeTracker,
    Swarm,
    TrickleServer,
    hanging_addresses,
    last_json,
    make_file,
    refused_addresses,
    sha256_file,
    subscribe_all,
)

FETCH_TIMEOUT = 60.0
HANGING = 200


def _fetch(swarm: Swarm, cascade: Path, out: Path, tracker: str) -> dict[str, Any]:
    start = time.monotonic()
    proc = swarm.start(
        "peer", "fetch", str(cascade), "--out", str(out), "--tracker", tracker,
        "--listen", "127.0.0.1:0", "--json", "--timeout", f"{FETCH_TIMEOUT:g}",
    )  # fmt: skip
    rc = proc.wait(FETCH_TIMEOUT + 30)
    wall = time.monotonic() - start
    doc = last_json(proc) if proc.stdout.strip() else {}
    proc.stop()
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    return {
        "wall_s": round(wall, 3),
        "fetch_s": doc.get("seconds"),
        "ok": rc == 0,
        "error": errors[-1] if errors else None,
    }


def _dead_tracker(folder: Path, runs: int, size: int) -> list[dict[str, Any]]:
    results = []
    for run in range(runs):
        work = folder / f"dead{run}"
        work.mkdir()
        cascade, cf = make_file(work, "d.bin", size, 256 << 10, seed=run)
        swarm = Swarm(work)
        with contextlib.ExitStack() as stack:
            stack.callback(swarm.stop)
            swarm.start_tracker()
            tracker = TrackerAddress("127.0.0.1", swarm.tracker_port)
            _, seeder_port = swarm.seeder(cascade, cf)
            dead = refused_addresses(stack, 10_000 - HANGING, ports=40) + hanging_addresses(stack, HANGING)
            subscribe_all(tracker, cf.cascade_hash, dead)
            subscribe_all(tracker, cf.cascade_hash, [("127.0.0.1", seeder_port)])
            out = work / "out"
            r = _fetch(swarm, cascade, out, swarm.tracker)
            r["right_bytes"] = out.exists() and sha256_file(out) == cf.file_hash
            results.append(r)
    return results


def _huge_reply(folder: Path, runs: int, size: int) -> list[dict[str, Any]]:
    results = []
    for run in range(runs):
        work = folder / f"huge{run}"
        work.mkdir()
        cascade, cf = make_file(work, "d.bin", size, 256 << 10, seed=run)
        swarm = Swarm(work)
        with contextlib.ExitStack() as stack:
            stack.callback(swarm.stop)
            swarm.start_tracker()  # the seeder needs a tracker to start; the fetch asks the fake one
            _, seeder_port = swarm.seeder(cascade, cf)
            dead = refused_addresses(stack, 65_535 - HANGING, ports=256) + hanging_addresses(stack, HANGING)
            now = int(time.time())
            records = [PeerRecord(ip, port, now, True) for ip, port in dead]
            records.append(PeerRecord("127.0.0.1", seeder_port, now, True))
            fake = FakeTracker(records).start()
            stack.callback(fake.stop)
            out = work / "out"
            r = _fetch(swarm, cascade, out, f"127.0.0.1:{fake.address[1]}")
            r["right_bytes"] = out.exists() and sha256_file(out) == cf.file_hash
            r["tracker_requests"] = fake.requests
            results.append(r)
    return results


def _tricklers(folder: Path, runs: int, size: int) -> list[dict[str, Any]]:
    results = []
    for run in range(runs):
        work = folder / f"trickle{run}"
        work.mkdir()
        cascade, cf = make_file(work, "d.bin", size, 256 << 10, seed=run)
        swarm = Swarm(work)
        with contextlib.ExitStack() as stack:
            stack.callback(swarm.stop)
            swarm.start_tracker()
            tracker = TrackerAddress("127.0.0.1", swarm.tracker_port)
            swarm.seeder(cascade, cf)
            tricklers = []
            for _ in range(16):
                t = TrickleServer(cf).start()
                stack.callback(t.stop)
                tricklers.append(t)
            subscribe_all(tracker, cf.cascade_hash, [t.address for t in tricklers])
            out = work / "out"
            r = _fetch(swarm, cascade, out, swarm.tracker)
            r["right_bytes"] = out.exists() and sha256_file(out) == cf.file_hash
            r["trickler_connections"] = sum(t.connections for t in tricklers)
            results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults_fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="runs per scenario (4)")
    parser.add_argument("--size", type=int, default=8 << 20, help="file size in bytes (8 MiB)")
    parser.add_argument("--only", choices=("dead_10000", "reply_65535", "tricklers_16"), action="append")
    args = parser.parse_args(argv)
    scenarios = {"dead_10000": _dead_tracker, "reply_65535": _huge_reply, "tricklers_16": _tricklers}
    report: dict[str, Any] = {"size": args.size, "fetch_timeout_s": FETCH_TIMEOUT, "target_s": 15.0}
    with tempfile.TemporaryDirectory(prefix="cascade-faults-") as tmp:
        for name, scenario in scenarios.items():
            if args.only and name not in args.only:
                continue
            runs = scenario(Path(tmp), args.runs, args.size)
            report[name] = {"runs": runs, "max_wall_s": max(r["wall_s"] for r in runs)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
