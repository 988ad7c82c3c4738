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
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Self, TypeVar

from cascade.metafile import CascadeFile, default_data_path, parse_cascade, read_cascade
from cascade.wire import (
    BLOCK_REQUEST_SIZE,
    TRACKER_REQUEST_SIZE,
    BlockStatus,
    PeerList,
    PeerRecord,
    TrackerCommand,
    pack_block_response_header,
    unpack_block_request_from,
)
from peer.fetcher import Fetcher, FetchPolicy, FetchResult, PeerInfo
from peer.localdata import check_data, create_metafile
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from peer.tracker_client import TrackerAddress, announce
from tests.procs import Proc

REPO = Path(__file__).resolve().parent.parent

MODES = ("corrupt", "close", "silent", "once", "strict")


ServerT = TypeVar("ServerT", bound="LoopbackServer")


class LoopbackServer:
    """A listener on 127.0.0.1 (port 0) serving each connection in a thread; ``stop`` closes everything.

    Subclasses write :meth:`_serve` for one connection; an ``OSError`` there
    ends that connection, which is closed for them.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.connections = 0

    def start(self) -> Self:
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
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.append(conn)
            self.connections += 1
        threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except OSError:
            return
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._conns.remove(conn)
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


def started(stack: contextlib.ExitStack, servers: Iterable[ServerT]) -> list[ServerT]:
    """Start each of ``servers`` (made one at a time), every one stopped when ``stack`` closes."""
    out = []
    for server in servers:
        out.append(server.start())
        stack.callback(server.stop)
    return out


class DoubleServer(LoopbackServer):
    """A block server double on 127.0.0.1; ``start`` binds, ``stop`` closes everything."""

    def __init__(self, mode: str, cf: CascadeFile, data_path: Path) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        super().__init__()
        self.mode = mode
        self.cf = cf
        self.data_path = data_path
        self.requests = 0

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
                _magic, marker, rest, index, cascade_hash = unpack_block_request_from(request)
                if self.mode == "strict" and marker + rest != bytes(16):
                    conn.sendall(pack_block_response_header(BlockStatus.BAD_REQUEST, 16) + b"reserved bytes!!")
                    return
                if cascade_hash != self.cf.cascade_hash or index >= self.cf.block_count:
                    conn.sendall(pack_block_response_header(BlockStatus.INVALID_HASH, 0))
                    return
                length = self.cf.block_length(index)
                ok = pack_block_response_header(BlockStatus.OK, length)
                if self.mode == "corrupt":
                    conn.sendall(ok + bytes([index % 251 + 1]) * length)
                    continue
                body = os.pread(fd, length, self.cf.block_offset(index))
                conn.sendall(ok + body)
                if self.mode in ("close", "strict"):
                    return  # close after every response
        finally:
            if fd >= 0:
                os.close(fd)


@contextlib.contextmanager
def honest_seeder(cf: CascadeFile, data: Path, **limits: Any) -> Iterator[BlockServer]:
    """A real :class:`BlockServer` on 127.0.0.1 seeding ``data``, stopped (and its store closed) on leaving.

    ``limits`` are :class:`BlockServerConfig` fields.
    """
    store = BlockStore.open_for_seeding(cf, data)
    try:
        server = BlockServer("127.0.0.1", 0, BlockServerConfig(**limits))
        server.add_store(store)
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        store.close()


# --- peers that cannot help: dead addresses and tricklers ------------------------


def refused_addresses(stack: contextlib.ExitStack, n: int, ports: int = 8) -> list[tuple[str, int]]:
    """``n`` distinct loopback addresses where a connect is refused at once.

    A few ports are held bound (never listening) on 127.0.0.1 for the life of
    ``stack``, so nothing else takes them; the addresses spread over
    127.0.x.y with those ports, where nothing listens either.
    """
    held = []
    for _ in range(ports):
        sock = stack.enter_context(socket.socket())
        sock.bind(("127.0.0.1", 0))
        held.append(sock.getsockname()[1])
    out: list[tuple[str, int]] = []
    for k in range(n):
        host = k // ports
        out.append((f"127.0.{host // 250}.{host % 250 + 1}", held[k % ports]))
    return out


def hanging_addresses(stack: contextlib.ExitStack, n: int) -> list[tuple[str, int]]:
    """``n`` loopback addresses where a connect hangs: listeners with a full, never-accepted backlog.

    Each listener has ``listen(0)`` and is filled by connections made here, so
    the kernel drops further SYNs, like a host that is gone. A probe connect
    to every listener at once checks it. Everything is closed with ``stack``.
    """
    listeners: list[tuple[str, int]] = []
    for _ in range(n):
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        listeners.append(listener.getsockname()[:2])
    unfilled = list(listeners)
    for _round in range(8):  # bounded: Linux queues one connection for a backlog of 0
        if not unfilled:
            return listeners
        for addr in unfilled:
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(addr)
        # Probe them all at once: a probe that connects found room, so that listener gets another filler.
        probes = []
        for addr in unfilled:
            probe = stack.enter_context(socket.socket())
            probe.setblocking(False)
            probe.connect_ex(addr)
            probes.append((addr, probe))
        _, writable, _ = select.select([], [p for _a, p in probes], [], 0.3)
        unfilled = [addr for addr, probe in probes if probe in writable]
    raise RuntimeError(f"could not fill the backlog of {unfilled}")


class TrickleServer(LoopbackServer):
    """Accepts block requests and answers each with a valid header, then one body byte per ``interval`` s."""

    def __init__(self, cf: CascadeFile, interval: float = 1.0, data_path: Path | None = None) -> None:
        super().__init__()
        self.cf = cf
        self.interval = interval
        self.data_path = data_path or Path(os.devnull)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        request = _read_exact(conn, BLOCK_REQUEST_SIZE)
        if request is None:
            return
        _magic, _marker, _rest, index, _hash = unpack_block_request_from(request)
        length = self.cf.block_length(index) if index < self.cf.block_count else 1
        conn.sendall(pack_block_response_header(BlockStatus.OK, length))
        # Stop two bytes short, so that the block never completes (bounded by ``length``).
        for _ in range(max(0, length - 2)):
            if self._stop.wait(self.interval):
                return
            conn.sendall(b"x")


class SlowServer(TrickleServer):
    """Serves correct blocks, kept open, but waits ``interval`` s before each response: slow, never silent."""

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        fd = os.open(self.data_path, os.O_RDONLY)
        try:
            while not self._stop.wait(self.interval):
                request = _read_exact(conn, BLOCK_REQUEST_SIZE)
                if request is None:
                    return
                _magic, _marker, _rest, index, _hash = unpack_block_request_from(request)
                if index >= self.cf.block_count:
                    return
                length = self.cf.block_length(index)
                conn.sendall(
                    pack_block_response_header(BlockStatus.OK, length)
                    + os.pread(fd, length, self.cf.block_offset(index))
                )
        finally:
            os.close(fd)


class FakeTracker(LoopbackServer):
    """A binary-protocol tracker that answers every request with the same ``records``, in their order.

    It serves one connection at a time, in its accepting thread.
    """

    def __init__(self, records: list[PeerRecord]) -> None:
        super().__init__()
        self.reply = PeerList(tuple(records)).encode()
        self.requests = 0

    def _accepted(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                if _read_exact(conn, TRACKER_REQUEST_SIZE) is not None:
                    self.requests += 1
                    conn.sendall(self.reply)


def subscribe_all(tracker: TrackerAddress, cascade_hash: bytes, addresses: list[tuple[str, int]]) -> None:
    """Subscribe every address at ``tracker``, one binary-protocol request each (as one client could)."""
    for ip, port in addresses:
        announce(tracker, TrackerCommand.SUBSCRIBE, cascade_hash, ip, port, 5.0)


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


def partial_files(out: Path) -> list[Path]:
    """Files a fetch of ``out`` may have left: ``out`` itself, or ``out.part`` and the like beside it."""
    # Any name holding out's (``d.bin.part``, ``.d.bin.part``, ``d.bin.partial``...): the folder holds nothing else.
    beside = sorted(p for p in out.parent.glob(f"*{out.name}*") if p != out and not p.name.endswith(".cascade"))
    return [p for p in (*beside, out) if p.is_file()]


def verified_blocks(out: Path, cf: CascadeFile) -> set[int]:
    """The blocks that verify in whatever partial file the fetch left (empty if there is none)."""
    found: set[int] = set()
    for p in partial_files(out):
        check = check_data(p, cf, whole_file=False)
        found |= {i for i, ok in enumerate(check.valid) if ok}
    return found


def fetch_complete(
    cf: CascadeFile,
    out: Path,
    list_peers: Callable[[], Iterable[PeerInfo]],
    policy: FetchPolicy,
    add: Iterable[PeerInfo] = (),
) -> tuple[Fetcher, FetchResult]:
    """Fetch ``cf`` into ``out`` in this process (``add``: peers given before the first listing).

    Asserts that the fetch completed with the right bytes; raises what :meth:`Fetcher.run` raises.
    """
    store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
    try:
        fetcher = Fetcher(store, list_peers, policy=policy)
        fetcher.add_peers(add)
        result = fetcher.run()
    finally:
        store.close()
    assert result.complete
    assert sha256_file(out) == cf.file_hash
    return fetcher, result


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
