"""Tracker throughput: list requests per second, one connection per request.

    python -m bench.tracker_bench                      # starts its own tracker
    python -m bench.tracker_bench --port 8888          # an already running tracker
    python -m bench.tracker_bench --threads 4 --seconds 3 --peers 200
    python -m bench.tracker_bench --redis                # one tracker on a redis-server of its own
    python -m bench.tracker_bench --redis --trackers 2   # two trackers on that one Redis

Client threads run in this process and the tracker in its own, as the issue
asks ("4 client threads that open one connection per request"). Each request
is connect, send 54 bytes, read the reply to EOF, close with SO_LINGER 0 (so
neither side piles up TIME_WAIT sockets: at 10,000 connections/s the
ephemeral ports would run out after a few seconds). Keep runs short.
Prints one JSON object: req_per_s, p50_ms, p99_ms, errors, ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.procs import BenchError, Child, free_port
from cascade.wire import TrackerCommand, TrackerRequest

_LINGER_0 = struct.pack("ii", 1, 0)


def exchange(addr: tuple[str, int], request: bytes, timeout: float) -> bytes:
    """One connection: connect (SO_LINGER 0), send ``request``, read the reply to EOF."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
        s.connect(addr)
        s.sendall(request)
        got = b""
        while data := s.recv(65536):
            got += data
        return got
    finally:
        s.close()


def one_request(addr: tuple[str, int], request: bytes, timeout: float) -> bool:
    got = exchange(addr, request, timeout)
    return len(got) >= 5 and got[0] == 0


def client(
    addr: tuple[str, int],
    requests: list[bytes],
    stop_at: float,
    budget: list[int],
    lock: threading.Lock,
    latencies: list[float],
    errors: list[int],
    timeout: float,
    ask: Callable[[tuple[str, int], bytes, float], bool] = one_request,
) -> None:
    """Send ``requests`` in turn, one connection each, until ``stop_at`` or the shared ``budget`` (-1: none) ends."""
    clock = time.perf_counter
    n = len(requests)
    i = 0
    while True:
        if stop_at and time.monotonic() >= stop_at:
            return
        if budget[0] >= 0:
            with lock:
                if budget[0] == 0:
                    return
                budget[0] -= 1
        t0 = clock()
        try:
            ok = ask(addr, requests[i % n], timeout)
        except OSError:
            ok = False
        latencies.append(clock() - t0)
        if not ok:
            errors[0] += 1
        i += 1


def run_threads(threads: list[threading.Thread]) -> float:
    """Start the client threads, wait for all; returns the wall-clock seconds."""
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def summary(per_thread: list[list[float]], errors: list[list[int]], elapsed: float) -> dict[str, object]:
    """requests, errors, seconds, req_per_s, p50_ms and p99_ms of one run."""
    lat = sorted(x for lst in per_thread for x in lst)
    total = len(lat)

    def pct(q: float) -> float:
        return round(lat[min(total - 1, int(q * total))] * 1000, 3) if total else 0.0

    return {
        "requests": total,
        "errors": sum(e[0] for e in errors),
        "seconds": round(elapsed, 3),
        "req_per_s": round(total / elapsed, 1) if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def start_redis(logdir: Path, started: list[Child]) -> str:
    """A redis-server on a free loopback port, no persistence; its URL. Raises :class:`BenchError`."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(logdir)]
    child = Child("redis", [exe, *args], logdir)
    started.append(child)
    child.wait_for(re.compile(r"Ready to accept connections"), 15, stream="out")
    return f"redis://127.0.0.1:{port}/0"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="bench a running tracker; without it one is started")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--requests", type=int, help="stop after this many requests instead of --seconds")
    p.add_argument("--peers", type=int, default=100, help="distinct announcing ports, i.e. the swarm size")
    p.add_argument("--subscribe", action="store_true", help="send subscribe instead of list requests")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--tracker-args", default="", help="extra arguments for the tracker this bench starts")
    p.add_argument("--trackers", type=int, default=1, help="start this many trackers; thread i asks tracker i mod N")
    p.add_argument("--redis", action="store_true", help="start a redis-server and run the trackers on it")
    args = p.parse_args(argv)

    logdir = tempfile.TemporaryDirectory(prefix="tracker-bench-")
    started: list[Child] = []
    addrs: list[tuple[str, int]] = []
    if args.port is None:
        extra = args.tracker_args.split()
        try:
            if args.redis:
                extra += ["--store", start_redis(Path(logdir.name), started)]
            for i in range(args.trackers):
                argv = ["-m", "tracker", "run", "--host", "127.0.0.1", "--port", "0", *extra]
                tracker = Child.python(f"tracker{i}", argv, Path(logdir.name))
                started.append(tracker)
                addrs.append((args.host, tracker.wait_listening(15)))
        except BenchError as exc:
            for child in reversed(started):
                child.stop()
            logdir.cleanup()
            raise SystemExit(f"tracker did not start: {exc}") from None
    else:
        addrs.append((args.host, args.port))
    trackers = [c for c in started if c.name.startswith("tracker")]
    addr = addrs[0]
    command = TrackerCommand.SUBSCRIBE if args.subscribe else TrackerCommand.LIST
    cascade_hash = bytes(range(32))
    requests = [TrackerRequest(command, cascade_hash, "127.0.0.1", 10000 + i).encode() for i in range(args.peers)]
    try:
        for r in requests:  # warm-up: fill the swarm
            one_request(addr, r, args.timeout)
        lock = threading.Lock()
        budget = [args.requests if args.requests else -1]
        per_thread: list[list[float]] = [[] for _ in range(args.threads)]
        errors = [[0] for _ in range(args.threads)]
        stop_at = 0.0 if args.requests else time.monotonic() + args.seconds
        threads = [
            threading.Thread(
                target=client,
                args=(
                    addrs[i % len(addrs)],
                    requests[i:] + requests[:i],
                    stop_at,
                    budget,
                    lock,
                    per_thread[i],
                    errors[i],
                    args.timeout,
                ),
            )
            for i in range(args.threads)
        ]
        elapsed = run_threads(threads)
    finally:
        for child in reversed(started):
            child.stop(10)  # SIGTERM, SIGKILL after 10 s
    result = {
        **summary(per_thread, errors, elapsed),
        "threads": args.threads,
        "peers": args.peers,
        "command": command.name.lower(),
        "trackers": len(addrs),
        "store": "redis" if args.redis else "memory",
        "cpus": os.cpu_count(),
    }
    if trackers:
        result["tracker_exit"] = max((t.rc or 0) for t in trackers)
        for t in trackers:
            if t.rc != 0:
                print(t.stderr, file=sys.stderr)
    logdir.cleanup()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
