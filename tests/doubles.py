"""Misbehaving peers for the fetch tests, and :class:`Swarm`, which runs real ones.

Modes:

- ``corrupt``: answers every request with status 0, the right length and wrong bytes.
- ``close``: serves correct blocks but closes after every response (like the
  widely used C server, and ignoring ``KEEPOPEN``).
- ``silent``: accepts connections, reads requests and never answers.
- ``strict``: answers status 4 to requests with non-zero reserved bytes (so to
  ``KEEPOPEN``), serves plain ones and closes after each response.
- ``once``: answers the first request on a connection, then ignores the rest
  without closing (a server that does not know about pipelining).

As a process::

    python -m tests.doubles MODE FILE.cascade --data PATH --tracker HOST:PORT

listens on 127.0.0.1 (port 0), prints ``peer listening on 127.0.0.1:PORT`` as
its first stderr line, subscribes at the tracker and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from cascade.metafile import CascadeFile, default_data_path, parse_cascade, read_cascade
from cascade.wire import BLOCK_REQUEST_SIZE, TrackerCommand
from peer.localdata import create_metafile
from peer.tracker_client import TrackerAddress, announce
from tests.procs import Proc

REPO = Path(__file__).resolve().parent.parent

MODES = ("corrupt", "close", "silent", "once", "strict")
_REQUEST = struct.Struct(">8s8s8xQ32s")
_HEADER = struct.Struct(">BQ")


class DoubleServer:
    """A block server double on 127.0.0.1; ``start`` binds, ``stop`` closes everything."""

    def __init__(self, mode: str, cf: CascadeFile, data_path: Path) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.cf = cf
        self.data_path = data_path
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.requests = 0

    def start(self) -> DoubleServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        fd = os.open(self.data_path, os.O_RDONLY) if self.mode in ("close", "once", "strict") else -1
        answered = False
        try:
            while not self._stop.is_set():
                request = _read_exact(conn, BLOCK_REQUEST_SIZE)
                if request is None:
                    return
                self.requests += 1
                if self.mode == "silent" or (self.mode == "once" and answered):
                    continue
                answered = True
                _magic, _marker, index, cascade_hash = _REQUEST.unpack(request)
                if self.mode == "strict" and request[8:24] != bytes(16):
                    conn.sendall(_HEADER.pack(4, 16) + b"reserved bytes!!")
                    return
                if cascade_hash != self.cf.cascade_hash or index >= self.cf.block_count:
                    conn.sendall(_HEADER.pack(1, 0))
                    return
                length = self.cf.block_length(index)
                if self.mode == "corrupt":
                    conn.sendall(_HEADER.pack(0, length) + bytes([index % 251 + 1]) * length)
                    continue
                body = os.pread(fd, length, self.cf.block_offset(index))
                conn.sendall(_HEADER.pack(0, length) + body)
                if self.mode in ("close", "strict"):
                    return  # close after every response
        except OSError:
            return
        finally:
            if fd >= 0:
                os.close(fd)
            with self._lock, contextlib.suppress(ValueError):
                self._conns.remove(conn)
            conn.close()


def _read_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except TimeoutError:
            continue
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def make_file(folder: Path, name: str, size: int, block_size: int, seed: int = 1) -> tuple[Path, CascadeFile]:
    """Random data (NUL bytes included) at ``folder/name`` and its ``.cascade``; returns (cascade path, cf)."""
    data = folder / name
    data.write_bytes(random.Random(seed).randbytes(size))
    raw = create_metafile(data, block_size)
    cascade = folder / f"{name}.cascade"
    cascade.write_bytes(raw)
    return cascade, parse_cascade(raw)


def sha256_file(path: Path) -> bytes:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def last_json(proc: Proc) -> dict[str, Any]:
    """The JSON object on the last line of a process's stdout."""
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout from {proc.args}; stderr:\n{proc.stderr}"
    doc: dict[str, Any] = json.loads(lines[-1])
    return doc


class Swarm:
    """A tracker and peer processes on loopback, every one stopped by PID in :meth:`stop`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[Proc] = []
        self.tracker_port = 0

    def start(self, *args: str, cwd: Path = REPO) -> Proc:
        proc = Proc(args, cwd=cwd)
        self.procs.append(proc)
        return proc

    def start_tracker(self) -> int:
        proc = self.start("tracker", "run", "--host", "127.0.0.1", "--port", "0")
        self.tracker_port = proc.wait_listening()
        return self.tracker_port

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.tracker_port}"

    def wait_subscribed(self, cf: CascadeFile, port: int, timeout: float = 15.0) -> None:
        """Poll the tracker until ``port`` is a good peer of ``cf`` (listing from port 0, which fetchers skip)."""
        deadline = time.monotonic() + timeout
        address = TrackerAddress("127.0.0.1", self.tracker_port)
        while time.monotonic() < deadline:
            peers = announce(address, TrackerCommand.LIST, cf.cascade_hash, "127.0.0.1", 0, 5.0)
            if any(p.port == port and p.good for p in peers):
                return
            time.sleep(0.02)
        raise TimeoutError(f"port {port} never subscribed at the tracker")

    def seeder(self, cascade: Path, cf: CascadeFile, *extra: str) -> tuple[Proc, int]:
        proc = self.start("peer", "seed", str(cascade), "--tracker", self.tracker, "--listen", "127.0.0.1:0", *extra)
        port = proc.wait_listening()
        self.wait_subscribed(cf, port)
        return proc, port

    def double(self, mode: str, cascade: Path, cf: CascadeFile) -> tuple[Proc, int]:
        proc = self.start("tests.doubles", mode, str(cascade), "--tracker", self.tracker)
        port = proc.wait_listening()
        self.wait_subscribed(cf, port)
        return proc, port

    def fetcher(self, cascade: Path, out: Path, *extra: str) -> Proc:
        return self.start(
            "peer",
            "fetch",
            str(cascade),
            "--out",
            str(out),
            "--tracker",
            self.tracker,
            "--listen",
            "127.0.0.1:0",
            "--json",
            *extra,
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.doubles")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("cascade_file")
    parser.add_argument("--data")
    parser.add_argument("--tracker", required=True)
    args = parser.parse_args(argv)
    cf = read_cascade(args.cascade_file)
    data = Path(args.data) if args.data else default_data_path(args.cascade_file)
    server = DoubleServer(args.mode, cf, data).start()
    host, port = server.address
    print(f"peer listening on {host}:{port}", file=sys.stderr, flush=True)
    thost, _, tport = args.tracker.rpartition(":")
    announce(TrackerAddress(thost, int(tport)), TrackerCommand.SUBSCRIBE, cf.cascade_hash, host, port, 5.0)
    print(f"{args.mode} double subscribed", file=sys.stderr, flush=True)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.wait(0.2):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
