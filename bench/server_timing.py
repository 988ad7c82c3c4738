"""How fast the servers answer and stop under hostile clients: the timing goals the tests no longer assert.

Run ``python -m bench.server_timing``. Tests check what happens (a request is
answered, a process exits 0, a slow client is cut off); a loaded machine can
make any of it slow, so how *soon* is measured here, one JSON line per case
with its target and PASS or MISS:

- ``seed_stop_busy``: ``peer seed`` holding 20 idle connections, a half-sent
  request and a reader that does not read, from SIGTERM to exit (target < 2 s).
- ``seed_garbage_flood``: block requests on fresh connections while one client
  pours garbage at the seeder (target: each answered < 1 s).
- ``seed_idle_timeout``: ``--idle-timeout 0.5``: a silent, a half-sent and a
  kept-open connection closed by the server (target < 3 s).
- ``server_slow_readers``: an in-process server with 2 workers and 6 clients
  that do not read their replies, a request on a fresh connection (target < 2 s),
  then ``stop`` with a client that does not read (target < 1.8 s).
- ``tracker_idle``: ``tracker run`` holding 60 idle or half-sent connections,
  a list request (target < 2 s), then SIGTERM to exit (target < 2 s).
- ``tracker_read_timeout``: ``--read-timeout 0.5``, a client that sent 10
  bytes gets its error and the close (target < 3 s).

Every process is stopped by its PID; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.data import make_file
from bench.procs import Child
from cascade.metafile import parse_cascade
from cascade.wire import (
    BLOCK_RESPONSE_HEADER_SIZE,
    TRACKER_REPLY_HEADER_SIZE,
    BlockRequest,
    TrackerCommand,
    TrackerRequest,
    tracker_request_header,
    unpack_block_response_header_from,
)
from peer.localdata import create_metafile
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore

TIMEOUT = 10.0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _response(sock: socket.socket) -> int:
    status, length = unpack_block_response_header_from(_recv_exact(sock, BLOCK_RESPONSE_HEADER_SIZE))
    _recv_exact(sock, length)
    return status


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _until_closed(sock: socket.socket) -> None:
    while sock.recv(65536):
        pass


def _report(case: str, figures: dict[str, float], targets: dict[str, float]) -> bool:
    results = {name: figures[name] < limit for name, limit in targets.items()}
    doc = {
        "case": case,
        **{k: round(v, 4) for k, v in figures.items()},
        "targets": {f"{k} < {v:g} s": results[k] for k, v in targets.items()},
    }
    print(json.dumps(doc), flush=True)
    for name, limit in targets.items():
        print(f"  {'PASS' if results[name] else 'MISS'}  {case}: {name} {figures[name]:.3f} s (< {limit:g} s)")
    return all(results.values())


class _Files:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.data = work / "timing.bin"
        make_file(self.data, 16 << 20)
        self.cascade = work / "timing.bin.cascade"
        self.cascade.write_bytes(create_metafile(self.data, 256 << 10))
        self.cf = parse_cascade(self.cascade.read_bytes())

    def req(self, index: int, keep: bool = False) -> bytes:
        return BlockRequest(index % self.cf.block_count, self.cf.cascade_hash, keep).encode()

    def seeder(self, name: str, *extra: str) -> tuple[Child, int]:
        args = ["-m", "peer", "seed", str(self.cascade), "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0"]
        child = Child.python(name, [*args, *extra], self.work)
        return child, child.wait_listening()


def seed_stop_busy(f: _Files) -> bool:
    child, port = f.seeder("seed-stop")
    socks: list[socket.socket] = []
    try:
        socks = [_connect(port) for _ in range(20)]
        half = _connect(port)
        half.sendall(f.req(0)[:30])
        stalled = _connect(port)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"".join(f.req(i, True) for i in range(40)))
        _recv_exact(stalled, 100)
        socks += [half, stalled]
        t = time.perf_counter()
        child.popen.send_signal(signal.SIGTERM)
        child.wait(TIMEOUT)
        return _report("seed_stop_busy", {"exit": time.perf_counter() - t}, {"exit": 2.0})
    finally:
        for s in socks:
            s.close()
        child.stop()


def seed_garbage_flood(f: _Files) -> bool:
    child, port = f.seeder("seed-garbage")
    stop = threading.Event()
    flood = _connect(port)

    def pour() -> None:
        chunk = b"\xee" * 65536
        deadline = time.monotonic() + TIMEOUT
        try:
            while time.monotonic() < deadline and not stop.is_set():
                flood.sendall(chunk)
        except OSError:
            pass  # cut off: what the seeder should do

    th = threading.Thread(target=pour, daemon=True)
    th.start()
    try:
        worst = 0.0
        for i in range(5):

            def one(index: int = i) -> None:
                with _connect(port) as sock:
                    sock.sendall(f.req(index))
                    _response(sock)

            worst = max(worst, _timed(one))
        return _report("seed_garbage_flood", {"max_request": worst}, {"max_request": 1.0})
    finally:
        stop.set()
        th.join(TIMEOUT + 1)
        flood.close()
        child.stop()


def seed_idle_timeout(f: _Files) -> bool:
    child, port = f.seeder("seed-idle", "--idle-timeout", "0.5")
    socks: list[socket.socket] = []
    try:
        silent, half, kept = _connect(port), _connect(port), _connect(port)
        socks = [silent, half, kept]
        half.sendall(f.req(1)[:40])
        kept.sendall(f.req(1, True))
        _response(kept)
        t = time.perf_counter()
        for s in socks:
            _until_closed(s)
        return _report("seed_idle_timeout", {"all_closed": time.perf_counter() - t}, {"all_closed": 3.0})
    finally:
        for s in socks:
            s.close()
        child.stop()


def server_slow_readers(f: _Files) -> bool:
    store = BlockStore.open_for_seeding(f.cf, f.data)
    server = BlockServer("127.0.0.1", 0, BlockServerConfig(max_workers=2))
    server.add_store(store)
    server.start()
    stalled: list[socket.socket] = []
    port = server.address[1]
    try:
        for _ in range(6):  # three times the pool, none of them reading
            sock = _connect(port)
            sock.sendall(b"".join(f.req(i, True) for i in range(16)))
            stalled.append(sock)

        def one() -> None:
            with _connect(port) as sock:
                sock.sendall(f.req(3))
                _response(sock)

        request = _timed(one)
        stop = _timed(lambda: server.stop(timeout=1.5))
        figures = {"request": request, "stop": stop}
        return _report("server_slow_readers", figures, {"request": 2.0, "stop": 1.8})
    finally:
        server.stop()
        store.close()
        for s in stalled:
            s.close()


def _tracker(work: Path, name: str, *extra: str) -> tuple[Child, int]:
    args = ["-m", "tracker", "run", "--host", "127.0.0.1", "--port", "0", *extra]
    child = Child.python(name, args, work)
    return child, child.wait_listening()


def _list(port: int) -> None:
    with _connect(port) as s:
        s.sendall(TrackerRequest(TrackerCommand.LIST, bytes(32), "10.0.0.2", 2).encode())
        _until_closed(s)


def tracker_idle(work: Path) -> bool:
    child, port = _tracker(work, "tracker-idle", "--read-timeout", "30", "--workers", "2")
    idle: list[socket.socket] = []
    try:
        for i in range(60):
            s = _connect(port)
            if i % 2:
                s.sendall(tracker_request_header(TrackerCommand.LIST)[: 1 + i % 15])
            idle.append(s)
        request = _timed(lambda: _list(port))
        t = time.perf_counter()
        child.popen.send_signal(signal.SIGTERM)
        child.wait(TIMEOUT)
        figures = {"list": request, "exit": time.perf_counter() - t}
        return _report("tracker_idle", figures, {"list": 2.0, "exit": 2.0})
    finally:
        for s in idle:
            s.close()
        child.stop()


def tracker_read_timeout(work: Path) -> bool:
    child, port = _tracker(work, "tracker-read", "--read-timeout", "0.5")
    try:
        with _connect(port) as s:
            s.sendall(tracker_request_header(TrackerCommand.LIST)[:10])
            t = time.perf_counter()
            got = b""
            while chunk := s.recv(100):
                got += chunk
            dropped = time.perf_counter() - t
        assert len(got) > TRACKER_REPLY_HEADER_SIZE and got[0] != 0, got
        return _report("tracker_read_timeout", {"dropped": dropped}, {"dropped": 3.0})
    finally:
        child.stop()


def main(argv: list[str] | None = None) -> int:
    """Run every case; exit status 1 when a target was missed."""
    argparse.ArgumentParser(
        prog="python -m bench.server_timing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cascade-timing-") as tmp:
        work = Path(tmp)
        files = _Files(work)
        results = [
            seed_stop_busy(files),
            seed_garbage_flood(files),
            seed_idle_timeout(files),
            server_slow_readers(files),
            tracker_idle(work),
            tracker_read_timeout(work),
        ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
