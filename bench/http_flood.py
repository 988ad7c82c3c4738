"""The tracker's HTTP face under hostile clients (issue 12 item 3): flood and malformed input.

    python -m bench.http_flood                       # both scenarios, a tracker of its own
    python -m bench.http_flood --idle 200 --slow 50  # a smaller flood
    python -m bench.http_flood --tracker-args "--store redis://127.0.0.1:6379/0"

``flood``: 1,000 connections that never send a byte and 200 slowloris
connections (a request head sent one byte a second, never finished) from
127.0.0.1, reopened as the server closes them (at most ``RECONNECT_RATE`` a
second); meanwhile 20 real requests (announces and ``/healthz``, each on a
fresh connection with a 5 s timeout, one every 0.25 s). Reports how many
were answered, how many within 1 s, and the latencies.

``malformed``: 10,000 malformed requests (a table of hand-made ones, and
valid requests with random bytes changed, cut short or doubled), each on
its own connection, from 8 threads. Each connection half-closes after
sending, so a request cut short ends at once instead of at the header
timeout. Reports the answers by status class and the tracebacks in the
tracker's log. Prints one JSON object per scenario.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.procs import BenchError, Child

REAL_REQUESTS = 20
REAL_SPACING = 0.25  # seconds between real requests
REAL_TIMEOUT = 5.0
GOAL_SECONDS = 1.0  # "answered within 1 s" (the target)
SLOW_INTERVAL = 1.0  # a slowloris client sends one byte this often
RECONNECT_RATE = 200  # reopened flood connections per second, at most; arbitrary
MALFORMED_THREADS = 8
_HTTP_LINE = re.compile(r"tracker http on (\S+):(\d+)")
HASH_HEX = "ab" * 32


def _announce(port: int) -> bytes:
    body = json.dumps({"cascade_hash": HASH_HEX, "ip": "10.0.0.1", "port": port, "action": "list"}).encode()
    return (
        b"POST /api/v1/announce HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )


_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /api/v1/announce HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# Hand-made malformed requests: what a fuzzer, a port scanner or a broken client sends.
TABLE: list[bytes] = [
    _post(b"[" * 60_000),
    _post(b'{"a":' * 12_000),
    _post(b'{"cascade_hash": "\xff\xfe", "port": 1, "action": "list"}'),
    _post('{"port": 1}'.encode("utf-16")),
    _post(b"null"),
    _post(b'{"cascade_hash": "' + HASH_HEX.encode() + b'", "port": 1e400, "action": "list"}'),
    _post(b'{"cascade_hash": "' + HASH_HEX.encode() + b'", "port": 1, "ip": "1.2.3.4.5", "action": "list"}'),
    b"\x00\xff\x16\x03\x01garbage\r\n\r\n",
    bytes.fromhex("160301002a0100002603035f") + b"\x00" * 40,
    b"BREW /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
    b"get /healthz HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/2.0\r\n\r\n",
    b"GET /healthz HTTP/1.2\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\n\r\n",
    b"GET /healthz HTTX/1.1\r\n\r\n",
    b"GET /healthz\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(1000)) + b"\r\n",
    b"GET /healthz HTTP/1.1\r\nHost t\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
    b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /api/v1/announce HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    b"POST /api/v1/announce HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
    b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n{}",
    b"GET /api/v1/swarms/%zz/peers HTTP/1.1\r\n\r\n",
    b"GET /api/v1/swarms/" + b"%ff" * 40 + b"/peers HTTP/1.1\r\n\r\n",
    b"GET /api/v1/cascades?" + b"&".join(b"f%d=1" % i for i in range(50)) + b" HTTP/1.1\r\n\r\n",
    b"PUT /api/v1/cascades HTTP/1.1\r\nX-Cascade-Name: %ff\r\nContent-Length: 1\r\n\r\nx",
    b"PUT /api/v1/cascades HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /cascades/..%2f..%2fetc%2fpasswd.cascade HTTP/1.1\r\n\r\n",
    b"GET http://evil/ HTTP/1.1\r\n\r\n",
    b"GET * HTTP/1.1\r\n\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nxxxx",
    b"\r\n\r\n\r\n",
    b"GET / HTTP/1.1\r\n\tfolded: header\r\n\r\n",
]


def _mutate(rng: random.Random, base: bytes) -> bytes:
    """A valid request with random damage: bytes changed, cut short, or repeated."""
    data = bytearray(base)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(1, len(data)) :]
    elif kind == 2:
        at = rng.randrange(len(data))
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        data.extend(bytes(data))
    return bytes(data)


def malformed_requests(n: int, seed: int = 12) -> list[bytes]:
    """``n`` malformed requests: the table in turn, then every other one a mutation of a valid request."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(n):
        if i % 2 == 0:
            out.append(TABLE[(i // 2) % len(TABLE)])
        else:
            out.append(_mutate(rng, rng.choice([_announce(1 + i % 1000), _HEALTHZ])))
    return out


def send_and_read(addr: tuple[str, int], data: bytes, timeout: float, half_close: bool) -> bytes:
    """One connection: send ``data``, optionally half-close, read until the server closes."""
    got = b""
    with socket.create_connection(addr, timeout=timeout) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed while we were still sending
            pass
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return got


def status_of(reply: bytes) -> int | None:
    m = re.match(rb"HTTP/\d\.\d (\d{3})", reply)
    return int(m.group(1)) if m else None


# --- the flood ---------------------------------------------------------------------


class Flood:
    """Holds ``idle`` silent and ``slow`` slowloris connections open in one thread until :meth:`stop`."""

    def __init__(self, addr: tuple[str, int], idle: int, slow: int) -> None:
        self.addr = addr
        self.want = {"idle": idle, "slow": slow}
        self.sel = selectors.DefaultSelector()
        self.socks: dict[socket.socket, str] = {}
        self.opened = 0
        self.closed_by_server = 0
        self.failed_opens = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)

    def _open(self, kind: str) -> bool:
        try:
            s = socket.create_connection(self.addr, timeout=2)
        except OSError:
            self.failed_opens += 1
            return False
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ)
        self.socks[s] = kind
        self.opened += 1
        return True

    def fill(self) -> None:
        """Open every connection (before the real requests start)."""
        for kind, n in self.want.items():
            for _ in range(n):
                self._open(kind)

    def _close(self, s: socket.socket) -> None:
        self.sel.unregister(s)
        del self.socks[s]
        s.close()

    def _run(self) -> None:
        next_byte = time.monotonic()
        while not self._stop.is_set():
            for key, _ in self.sel.select(timeout=0.05):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.closed_by_server += 1
                    self._close(s)
            now = time.monotonic()
            if now >= next_byte:
                next_byte = now + SLOW_INTERVAL
                for s, kind in list(self.socks.items()):
                    if kind == "slow":
                        try:
                            s.send(b"GET /healthz HTTP/1.1\r\nX-a: b\r\n"[self.opened % 20 : self.opened % 20 + 1])
                        except OSError:
                            self.closed_by_server += 1
                            self._close(s)
            # Reopen what the server closed, at most RECONNECT_RATE a second.
            budget = max(1, int(RECONNECT_RATE * 0.05))
            have = Counter(self.socks.values())
            for kind, n in self.want.items():
                while have[kind] < n and budget > 0:
                    budget -= 1
                    if self._open(kind):
                        have[kind] += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in list(self.socks):
            self._close(s)
        self.sel.close()


def run_flood(addr: tuple[str, int], idle: int, slow: int) -> dict[str, object]:
    flood = Flood(addr, idle, slow)
    flood.fill()
    flood.start()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    try:
        for i in range(REAL_REQUESTS):
            request = _announce(20000 + i) if i % 2 == 0 else _HEALTHZ
            t0 = time.perf_counter()
            try:
                reply = send_and_read(addr, request, REAL_TIMEOUT, half_close=False)
                status = status_of(reply)
            except OSError as exc:
                status = None
                statuses[type(exc).__name__] += 1
            took = time.perf_counter() - t0
            if status is not None:
                statuses[str(status)] += 1
                if status == 200:
                    latencies.append(took)
            time.sleep(REAL_SPACING)
    finally:
        held = Counter(flood.socks.values())
        flood.stop()
    return {
        "scenario": "flood",
        "idle": idle,
        "slowloris": slow,
        "held_at_end": dict(held),
        "flood_opened": flood.opened,
        "flood_closed_by_server": flood.closed_by_server,
        "flood_failed_opens": flood.failed_opens,
        "real_requests": REAL_REQUESTS,
        "answered_200": len(latencies),
        "within_1s": sum(t <= GOAL_SECONDS for t in latencies),
        "statuses": dict(statuses),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
    }


def run_malformed(addr: tuple[str, int], n: int, tracker: Child | None) -> dict[str, object]:
    requests = malformed_requests(n)
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    examples_5xx: list[str] = []

    def work(part: list[bytes]) -> None:
        for data in part:
            try:
                reply = send_and_read(addr, data, 10.0, half_close=True)
                status = status_of(reply)
                key = "no reply (closed)" if status is None else f"{status // 100}xx"
            except OSError as exc:
                key = type(exc).__name__
                reply = b""
            with lock:
                statuses[key] += 1
                if key == "5xx" and len(examples_5xx) < 5:
                    examples_5xx.append(repr(data[:80]) + " -> " + repr(reply[:80]))

    threads = [threading.Thread(target=work, args=(requests[i::MALFORMED_THREADS],)) for i in range(MALFORMED_THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    log = tracker.stderr if tracker is not None else ""
    return {
        "scenario": "malformed",
        "requests": n,
        "seconds": round(elapsed, 1),
        "answers": dict(sorted(statuses.items())),
        "5xx": statuses["5xx"],
        "tracebacks_in_log": log.count("Traceback"),
        "examples_5xx": examples_5xx,
    }


def _raise_fd_limit() -> None:
    """The flood holds over 1,000 sockets: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    _raise_fd_limit()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, help="a running tracker's HTTP port; without it one is started")
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--slow", type=int, default=200)
    p.add_argument("--malformed", type=int, default=10_000)
    p.add_argument("--scenario", choices=("flood", "malformed", "both"), default="both")
    p.add_argument("--tracker-args", default="", help="extra arguments for the tracker this bench starts")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="http-flood-") as logdir:
        tracker = None
        if args.port is None:
            cmd = ["-m", "tracker", "run", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"]
            tracker = Child.python("tracker", [*cmd, *args.tracker_args.split()], Path(logdir))
            try:
                port = int(tracker.wait_for(_HTTP_LINE, 15).group(2))
            except BenchError as exc:
                tracker.stop()
                raise SystemExit(f"tracker did not start: {exc}") from None
        else:
            port = args.port
        addr = ("127.0.0.1", port)
        try:
            if args.scenario in ("flood", "both"):
                print(json.dumps(run_flood(addr, args.idle, args.slow)), flush=True)
            if args.scenario in ("malformed", "both"):
                print(json.dumps(run_malformed(addr, args.malformed, tracker)), flush=True)
        finally:
            if tracker is not None:
                rc = tracker.stop(10)
                if rc != 0:
                    print(tracker.tail(20), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
