"""Connection flood against ``peer seed`` (issue 9 section 4): do real requests still get answered?

Run ``python -m bench.flood [--rounds N] [--no-reconnect]``. For each scenario
it starts ``peer seed`` on a generated file, opens the flood from this process
(one address, 127.0.0.1, like the real requests), then makes 20 real block
requests, each on a fresh connection with a 5 s timeout, one every 0.25 s, and
prints one JSON object per scenario: answered, failed, latency figures, and
what the flood did. Scenarios:

- ``idle520``: 520 connections that never send anything (8 over the cap).
- ``full``: 1,000 idle connections, 100 slowloris writers (a 64-byte request
  sent one byte every 2 s) and 100 slowloris readers (four kept-open block
  requests, then one byte read every 2 s through a 4 KiB receive buffer).

With reconnecting on (the default) the flood reopens every connection the
server closes, at most ``RECONNECT_RATE`` a second, so it keeps holding its
count: the hardest case for a server that makes room by evicting.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.data import make_file
from bench.procs import Child
from cascade.metafile import parse_cascade
from cascade.wire import BLOCK_RESPONSE_HEADER_SIZE, BlockRequest, BlockStatus, unpack_block_response_header_from
from peer.localdata import create_metafile

REAL_REQUESTS = 20
REAL_INTERVAL = 0.25  # seconds between real requests, so they meet the flood in every state
REAL_TIMEOUT = 5.0
TRICKLE_INTERVAL = 2.0  # seconds between slowloris bytes (sent or read)
RECONNECT_RATE = 2000  # reconnects per second at most: enough to hold the count, not to run out of ports
FILE_SIZE = 8 << 20
BLOCK_SIZE = 256 << 10


@dataclass
class FloodStats:
    opened: int = 0
    closed_by_server: int = 0
    connect_failures: int = 0


@dataclass
class _Flooder:
    port: int
    request: bytes
    keep_requests: bytes
    reconnect: bool
    stats: FloodStats = field(default_factory=FloodStats)
    stop: threading.Event = field(default_factory=threading.Event)
    sel: selectors.DefaultSelector = field(default_factory=selectors.DefaultSelector)
    # socket -> (kind, bytes of the partial request sent so far)
    socks: dict[socket.socket, list[object]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)

    def open(self, kind: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if kind == "reader":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.settimeout(2.0)
            sock.connect(("127.0.0.1", self.port))
            if kind == "writer":
                sock.sendall(self.request[:1])
            elif kind == "reader":
                sock.sendall(self.keep_requests)
            sock.setblocking(False)
        except OSError:
            sock.close()
            self.stats.connect_failures += 1
            self.pending.append(kind)
            return
        self.stats.opened += 1
        self.socks[sock] = [kind, 1]
        if kind == "idle":
            self.sel.register(sock, selectors.EVENT_READ)

    def lost(self, sock: socket.socket) -> None:
        kind = str(self.socks.pop(sock)[0])
        if kind == "idle":
            self.sel.unregister(sock)
        sock.close()
        self.stats.closed_by_server += 1
        if self.reconnect:
            self.pending.append(kind)

    def run(self) -> None:
        next_trickle = time.monotonic() + TRICKLE_INTERVAL
        budget_at = time.monotonic()
        budget = 0.0
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.01):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if sock.recv(4096):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                self.lost(sock)
            now = time.monotonic()
            budget = min(RECONNECT_RATE / 10, budget + (now - budget_at) * RECONNECT_RATE)
            budget_at = now
            while self.pending and budget >= 1 and not self.stop.is_set():
                budget -= 1
                self.open(self.pending.pop())
            if now >= next_trickle:
                next_trickle = now + TRICKLE_INTERVAL
                self.trickle()

    def trickle(self) -> None:
        for sock, state in list(self.socks.items()):
            kind = state[0]
            try:
                if kind == "writer":
                    sent = int(str(state[1]))
                    sock.send(self.request[sent : sent + 1] if sent < len(self.request) - 1 else b"")
                    state[1] = min(sent + 1, len(self.request) - 1)  # never the last byte
                    if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                        self.lost(sock)
                elif kind == "reader" and sock.recv(1) == b"":
                    self.lost(sock)
            except BlockingIOError:
                continue
            except OSError:
                if sock in self.socks:
                    self.lost(sock)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.sel.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed without a full reply")
        buf += chunk
    return bytes(buf)


def _real_request(port: int, request: bytes, expected_length: int) -> float:
    """One block request on a fresh connection; its latency in seconds. Raises OSError or EOFError."""
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=REAL_TIMEOUT) as sock:
        sock.sendall(request)
        status, length = unpack_block_response_header_from(_recv_exact(sock, BLOCK_RESPONSE_HEADER_SIZE))
        if status != BlockStatus.OK or length != expected_length:
            raise EOFError(f"status {status}")
        _recv_exact(sock, length)
    return time.perf_counter() - t


def run_scenario(name: str, counts: dict[str, int], reconnect: bool, workdir: Path) -> dict[str, object]:
    data = workdir / "flood.bin"
    if not data.exists():
        make_file(data, FILE_SIZE)
        (workdir / "flood.bin.cascade").write_bytes(create_metafile(data, BLOCK_SIZE))
    cf = parse_cascade((workdir / "flood.bin.cascade").read_bytes())
    seed_args = ["seed", str(workdir / "flood.bin.cascade"), "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0"]
    seeder = Child.python(f"seed-{name}", ["-m", "peer", *seed_args], workdir)
    flooder: _Flooder | None = None
    thread: threading.Thread | None = None
    try:
        port = seeder.wait_listening()
        keep = b"".join(BlockRequest(i, cf.cascade_hash, True).encode() for i in range(4))
        flooder = _Flooder(port, BlockRequest(0, cf.cascade_hash, False).encode(), keep, reconnect)
        for kind, n in counts.items():
            for _ in range(n):
                flooder.open(kind)
        thread = threading.Thread(target=flooder.run, daemon=True)
        thread.start()
        latencies: list[float] = []
        failures: list[str] = []
        for i in range(REAL_REQUESTS):
            index = i % cf.block_count
            request = BlockRequest(index, cf.cascade_hash, False).encode()
            try:
                latencies.append(_real_request(port, request, cf.block_length(index)))
            except (OSError, EOFError) as exc:
                failures.append(type(exc).__name__)
            time.sleep(REAL_INTERVAL)  # pacing the client, not waiting for the server
        return {
            "scenario": name,
            "flood": counts,
            "reconnect": reconnect,
            "answered": len(latencies),
            "failed": len(failures),
            "failures": sorted(set(failures)),
            "max_latency_s": round(max(latencies), 4) if latencies else None,
            "median_latency_s": round(statistics.median(latencies), 4) if latencies else None,
            "within_1s": sum(1 for x in latencies if x <= 1.0),
            "flood_held": len(flooder.socks),
            "flood_opened": flooder.stats.opened,
            "flood_closed_by_server": flooder.stats.closed_by_server,
            "seeder_alive": seeder.poll() is None,
        }
    finally:
        if flooder is not None:
            flooder.stop.set()
        if thread is not None:
            thread.join(5.0)
        if flooder is not None:
            flooder.close()
        seeder.stop()


SCENARIOS: dict[str, dict[str, int]] = {
    "idle520": {"idle": 520},
    "full": {"idle": 1000, "writer": 100, "reader": 100},
}


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print one JSON line each; exit status 1 when a real request failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="run every scenario this many times")
    parser.add_argument("--no-reconnect", action="store_true", help="the flood does not reopen closed connections")
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append", help="run only these scenarios")
    args = parser.parse_args(argv)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="cascade-flood-") as tmp:
        for _ in range(args.rounds):
            for name in args.only or SCENARIOS:
                result = run_scenario(name, SCENARIOS[name], not args.no_reconnect, Path(tmp))
                failed += int(str(result["failed"]))
                print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
