"""The block server against real ``python -m peer seed`` processes (PROTOCOL.md sections 3-5).

The client side here is written from the spec with raw sockets, so these tests
check bytes on the wire, not our own client code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cascade.metafile import CascadeFile, parse_cascade
from cascade.wire import BLOCK_RESPONSE_HEADER_SIZE, BlockRequest, unpack_block_response_header_from
from peer.localdata import check_data, create_metafile
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from tests.procs import Proc

TIMEOUT = 10.0


# --- a raw client written from the spec -----------------------------------------


@contextlib.contextmanager
def serving(store: BlockStore, **limits: Any) -> Iterator[BlockServer]:
    """An in-process BlockServer on 127.0.0.1 serving ``store``; stops it, then closes the store.

    ``limits`` are :class:`BlockServerConfig` fields.
    """
    try:
        server = BlockServer("127.0.0.1", 0, BlockServerConfig(**limits))
        try:
            server.add_store(store)
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        store.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    status, length = unpack_block_response_header_from(recv_exact(sock, BLOCK_RESPONSE_HEADER_SIZE))
    assert length <= 1 << 24, f"absurd body length {length}"
    return status, recv_exact(sock, length)


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed the connection (EOF) within TIMEOUT."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def wait_until(predicate: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def request(port: int, raw: bytes) -> tuple[int, bytes, bool]:
    """One request on a fresh connection: (status, body, server closed afterwards)."""
    with connect(port) as sock:
        sock.sendall(raw)
        status, body = read_response(sock)
        return status, body, closed_by_server(sock)


def req(index: int, cascade_hash: bytes, keep: bool = False) -> bytes:
    return BlockRequest(index, cascade_hash, keep).encode()


def block(data: bytes, cf: CascadeFile, index: int) -> bytes:
    start = cf.block_offset(index)
    return data[start : start + cf.block_length(index)]


# --- sample files and seeders ----------------------------------------------------


@dataclass
class Sample:
    cascade_path: Path
    data_path: Path
    cf: CascadeFile
    data: bytes


def make_sample(folder: Path, name: str, size: int, block_size: int, seed: int = 1) -> Sample:
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    data[: min(size, 4096)] = bytes(min(size, 4096))  # NUL bytes on the wire too
    data_path = folder / name
    data_path.write_bytes(data)
    raw = create_metafile(data_path, block_size)
    cascade_path = folder / f"{name}.cascade"
    cascade_path.write_bytes(raw)
    return Sample(cascade_path, data_path, parse_cascade(raw), bytes(data))


def start_seeder(*args: str) -> tuple[Proc, int]:
    proc = Proc(["peer", "seed", *args, "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0"])
    try:
        port = proc.wait_listening()
        # Serving starts after verification: wait for the per-file lines.
        files = sum(1 for a in args if a.endswith(".cascade"))
        deadline = time.monotonic() + TIMEOUT
        while proc.stderr.count("blocks verified") < files:
            assert time.monotonic() < deadline, proc.stderr
            assert proc.popen.poll() is None, proc.stderr
            time.sleep(0.02)
    except BaseException:
        proc.stop()
        raise
    return proc, port


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peer-server")


@pytest.fixture(scope="module")
def sample(folder: Path) -> Sample:
    # 65 blocks of 16 KiB, the last one 123 bytes.
    return make_sample(folder, "sample.bin", 64 * 16384 + 123, 16384)


@pytest.fixture(scope="module")
def partial(folder: Path) -> Sample:
    """A file whose blocks 3 and 5 are corrupt and whose last block is cut short."""
    s = make_sample(folder, "partial.bin", 10 * 4096 + 100, 4096, seed=2)
    data = bytearray(s.data)
    data[3 * 4096 + 7] ^= 0xFF
    data[5 * 4096] ^= 0x01
    s.data_path.write_bytes(data[: 10 * 4096 + 50])
    return s


@pytest.fixture(scope="module")
def seeder(sample: Sample, partial: Sample) -> Iterator[tuple[Proc, int]]:
    proc, port = start_seeder(str(sample.cascade_path), str(partial.cascade_path))
    try:
        yield proc, port
    finally:
        proc.stop()


# --- status codes -----------------------------------------------------------------


@pytest.mark.process
def test_first_and_last_block_are_served_exactly(seeder: tuple[Proc, int], sample: Sample) -> None:
    _, port = seeder
    cf = sample.cf
    for index in (0, cf.block_count - 1):
        status, body, closed = request(port, req(index, cf.cascade_hash))
        assert status == 0
        assert body == block(sample.data, cf, index)
        assert closed, "a request without KEEPOPEN must be answered and closed"
    assert len(block(sample.data, cf, cf.block_count - 1)) == 123


@pytest.mark.process
@pytest.mark.parametrize("keep", [False, True])
def test_block_past_the_end_is_status_3_and_closed(seeder: tuple[Proc, int], sample: Sample, keep: bool) -> None:
    _, port = seeder
    for index in (sample.cf.block_count, 2**64 - 1):
        status, body, closed = request(port, req(index, sample.cf.cascade_hash, keep))
        assert status == 3
        assert b"too large" in body
        assert closed


@pytest.mark.process
@pytest.mark.parametrize("keep", [False, True])
def test_unknown_hash_is_status_1_and_closed(seeder: tuple[Proc, int], keep: bool) -> None:
    _, port = seeder
    status, body, closed = request(port, req(0, hashlib.sha256(b"nobody serves this").digest(), keep))
    assert status == 1
    assert body.decode("utf-8")
    assert closed


@pytest.mark.process
def test_garbage_request_is_status_4_and_closed(seeder: tuple[Proc, int]) -> None:
    _, port = seeder
    status, body, closed = request(port, random.Random(3).randbytes(64))
    assert status == 4
    assert b"parse" in body
    assert closed


@pytest.mark.process
def test_garbage_longer_than_a_request_still_gets_its_status(seeder: tuple[Proc, int]) -> None:
    """Unread bytes at close would reset the connection and lose the reply; the server drains them."""
    _, port = seeder
    status, _, closed = request(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
    assert status == 4
    assert closed


@pytest.mark.process
@pytest.mark.parametrize("garbage", [b"hello\n", b"X", b"CASCADE2", b"\x00" * 20])
def test_short_garbage_gets_status_4_without_waiting_for_64_bytes(seeder: tuple[Proc, int], garbage: bytes) -> None:
    _, port = seeder
    with connect(port) as sock:
        sock.settimeout(5.0)  # far below the seeder's idle timeout
        sock.sendall(garbage)
        status, body = read_response(sock)
        assert status == 4 and body
        assert closed_by_server(sock)


@pytest.mark.process
def test_request_in_7_byte_pieces(seeder: tuple[Proc, int], sample: Sample) -> None:
    _, port = seeder
    raw = req(7, sample.cf.cascade_hash)
    with connect(port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(raw), 7):
            sock.sendall(raw[i : i + 7])
            time.sleep(0.01)
        status, body = read_response(sock)
        assert (status, body) == (0, block(sample.data, sample.cf, 7))
        assert closed_by_server(sock)


@pytest.mark.process
def test_garbage_in_reserved_bytes_is_ignored(seeder: tuple[Proc, int], sample: Sample) -> None:
    _, port = seeder
    rng = random.Random(4)
    for _ in range(3):
        raw = bytearray(req(2, sample.cf.cascade_hash))
        raw[8:24] = rng.randbytes(16)
        status, body, closed = request(port, bytes(raw))
        assert (status, body) == (0, block(sample.data, sample.cf, 2))
        assert closed, "only KEEPOPEN keeps a connection open"


@pytest.mark.process
def test_keepopen_marker_with_garbage_in_the_other_reserved_bytes(seeder: tuple[Proc, int], sample: Sample) -> None:
    _, port = seeder
    raw = bytearray(req(1, sample.cf.cascade_hash, keep=True))
    raw[16:24] = b"\xff" * 8
    with connect(port) as sock:
        sock.sendall(bytes(raw) * 2)
        for _ in range(2):
            assert read_response(sock) == (0, block(sample.data, sample.cf, 1))


@pytest.mark.process
def test_fuzz_then_still_serving(seeder: tuple[Proc, int], sample: Sample) -> None:
    """Random bytes, truncated requests and clients that reset mid-reply leave the server unharmed."""
    proc, port = seeder
    rng = random.Random(12)
    valid = req(0, sample.cf.cascade_hash, keep=True)
    for n in range(300):
        kind = n % 3
        with connect(port) as sock:
            if kind == 0:
                sock.sendall(rng.randbytes(rng.randrange(1, 300)))
            elif kind == 1:
                sock.sendall(valid[: rng.randrange(1, 64)])
            else:
                sock.sendall(valid * rng.randrange(1, 20))
                # Close with a reset while the server is still sending.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    status, body, closed = request(port, req(sample.cf.block_count - 1, sample.cf.cascade_hash))
    assert (status, body, closed) == (0, block(sample.data, sample.cf, sample.cf.block_count - 1), True)
    assert proc.popen.poll() is None
    assert "Traceback" not in proc.stderr


@pytest.mark.process
def test_a_client_flooding_garbage_is_cut_off_and_holds_nothing(seeder: tuple[Proc, int], sample: Sample) -> None:
    _, port = seeder
    flood = connect(port)
    stopped = threading.Event()
    outcome: list[str] = []

    def pour() -> None:
        chunk = b"\xee" * 65536
        deadline = time.monotonic() + TIMEOUT
        try:
            while time.monotonic() < deadline and not stopped.is_set():
                flood.sendall(chunk)
            outcome.append("still open")
        except OSError:
            outcome.append("cut off")

    th = threading.Thread(target=pour, daemon=True)
    th.start()
    try:
        for i in range(5):  # everyone else is served meanwhile (how soon: bench/server_timing.py)
            assert request(port, req(i, sample.cf.cascade_hash))[0] == 0
        th.join(TIMEOUT + 1)
        assert outcome == ["cut off"]
    finally:
        stopped.set()
        th.join(TIMEOUT + 1)
        flood.close()


# --- kept-open connections ------------------------------------------------------------


@pytest.mark.process
def test_keepopen_pipelined_requests_are_answered_in_order(seeder: tuple[Proc, int], sample: Sample) -> None:
    _, port = seeder
    cf = sample.cf
    order = [5, 0, 64, 3, 3, 17, 42, 1, 63, 9]
    with connect(port) as sock:
        sock.sendall(b"".join(req(i, cf.cascade_hash, keep=True) for i in order))
        for index in order:
            assert read_response(sock) == (0, block(sample.data, cf, index))
        # Still open: one more request on the same connection.
        sock.sendall(req(11, cf.cascade_hash, keep=True))
        assert read_response(sock) == (0, block(sample.data, cf, 11))


@pytest.mark.process
def test_keepopen_closes_after_an_error_status(seeder: tuple[Proc, int], sample: Sample) -> None:
    _, port = seeder
    h = sample.cf.cascade_hash
    with connect(port) as sock:
        sock.sendall(req(0, h, keep=True) + req(999, h, keep=True) + req(1, h, keep=True))
        assert read_response(sock)[0] == 0
        assert read_response(sock)[0] == 3
        assert closed_by_server(sock), "requests after a status 3 must not be answered"


@pytest.mark.process
def test_without_keepopen_only_the_first_pipelined_request_is_answered(
    seeder: tuple[Proc, int], sample: Sample
) -> None:
    _, port = seeder
    h = sample.cf.cascade_hash
    with connect(port) as sock:
        sock.sendall(req(4, h) + req(5, h))
        assert read_response(sock) == (0, block(sample.data, sample.cf, 4))
        assert closed_by_server(sock)


@pytest.mark.process
def test_partial_file_gives_status_2_and_keeps_the_connection(seeder: tuple[Proc, int], partial: Sample) -> None:
    _, port = seeder
    cf = partial.cf
    expected = {i: 0 for i in range(cf.block_count)}
    expected.update({3: 2, 5: 2, cf.block_count - 1: 2})
    with connect(port) as sock:
        sock.sendall(b"".join(req(i, cf.cascade_hash, keep=True) for i in range(cf.block_count)))
        for i in range(cf.block_count):
            status, body = read_response(sock)
            assert status == expected[i], i
            if status == 0:
                assert body == block(partial.data, cf, i)
            else:
                assert b"not present" in body
    status, _, closed = request(port, req(3, cf.cascade_hash))
    assert status == 2 and closed


@pytest.mark.process
@pytest.mark.portable
def test_two_hundred_concurrent_downloads_with_bounded_threads(seeder: tuple[Proc, int], sample: Sample) -> None:
    proc, port = seeder
    cf = sample.cf
    n_conns, per_conn = 200, 32
    threads_before = thread_count(proc.pid)
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    wants: dict[socket.socket, list[int]] = {}
    got: dict[socket.socket, bytearray] = {}
    rng = random.Random(5)
    try:
        for _ in range(n_conns):
            sock = connect(port)
            # A small receive window keeps the server blocked on us, so the transfers overlap.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            socks.append(sock)
        for sock in socks:
            wants[sock] = [rng.randrange(cf.block_count) for _ in range(per_conn)]
            sock.sendall(b"".join(req(i, cf.cascade_hash, keep=True) for i in wants[sock]))
            got[sock] = bytearray()
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        by_fd = {s.fileno(): s for s in socks}
        expected = {s: sum(9 + cf.block_length(i) for i in wants[s]) for s in socks}
        peak_threads = 0
        deadline = time.monotonic() + 30
        remaining = set(socks)
        reads = 0
        while remaining:
            assert time.monotonic() < deadline, f"{len(remaining)} downloads unfinished"
            for key, _ in sel.select(0.5):
                sock = by_fd[key.fd]
                chunk = sock.recv(65536)
                assert chunk, "server closed a kept-open connection"
                got[sock] += chunk
                if len(got[sock]) >= expected[sock]:
                    sel.unregister(sock)
                    remaining.discard(sock)
            reads += 1
            if reads % 50 == 0:
                peak_threads = max(peak_threads, thread_count(proc.pid))
        for sock in socks:
            buf = memoryview(got[sock])
            assert len(buf) == expected[sock]
            pos = 0
            for i in wants[sock]:
                status, length = unpack_block_response_header_from(buf, pos)
                assert (status, length) == (0, cf.block_length(i))
                assert buf[pos + 9 : pos + 9 + length] == block(sample.data, cf, i)
                pos += 9 + length
        # The pool is fixed: 200 connections add no threads.
        assert peak_threads <= threads_before + 2, (threads_before, peak_threads)
        assert peak_threads <= 40
        assert rss_kib(proc.pid) < 200_000
    finally:
        sel.close()
        for sock in socks:
            sock.close()


# --- the server object in-process: a store that gains blocks while it is served ------


@pytest.mark.loopback
def test_blocks_written_while_serving_become_available(tmp_path: Path) -> None:
    s = make_sample(tmp_path, "growing.bin", 8 * 1024, 1024, seed=6)
    out = tmp_path / "out.bin"
    store = BlockStore.open_for_fetching(s.cf, out, check_data(out, s.cf, whole_file=False))
    with serving(store, max_workers=2) as server:
        port = server.address[1]
        with connect(port) as sock:
            sock.sendall(req(2, s.cf.cascade_hash, keep=True))
            assert read_response(sock)[0] == 2
            assert store.write_block(2, block(s.data, s.cf, 2))
            sock.sendall(req(2, s.cf.cascade_hash, keep=True))
            assert read_response(sock) == (0, block(s.data, s.cf, 2))


@pytest.mark.loopback
def test_stop_is_quick_with_a_client_that_does_not_read(tmp_path: Path) -> None:
    s = make_sample(tmp_path, "stall.bin", 4 << 20, 1 << 20, seed=7)
    store = BlockStore.open_for_seeding(s.cf, s.data_path)
    server = BlockServer("127.0.0.1", 0, BlockServerConfig(max_workers=2))
    server.add_store(store)
    server.start()
    try:
        with connect(server.address[1]) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"".join(req(i, s.cf.cascade_hash, keep=True) for i in range(4)))
            recv_exact(sock, 100)
            idle = [connect(server.address[1]) for _ in range(5)]
            server.stop(timeout=1.5)
            # stop() joins its threads for at most 1.5 s: all gone means all ended within it,
            # however loaded the machine (the time itself: bench/server_timing.py).
            assert not any(th.is_alive() for th in threading.enumerate() if th.name.startswith("peer-worker"))
            for c in idle:
                c.close()
    finally:
        store.close()


@pytest.mark.loopback
def test_slow_readers_do_not_hold_the_workers(tmp_path: Path) -> None:
    s = make_sample(tmp_path, "slow.bin", 16 << 20, 4 << 20, seed=10)
    store = BlockStore.open_for_seeding(s.cf, s.data_path)
    stalled: list[socket.socket] = []
    # An hour of idle timeout: a worker pinned by a stalled reader would stay pinned,
    # so the answer below (before any of them reads) shows they were parked instead.
    with serving(store, max_workers=2, idle_timeout=3600.0) as server:
        try:
            port = server.address[1]
            order = [0, 1, 2, 3]
            for _ in range(6):  # three times the pool, none of them reading
                sock = connect(port)
                sock.sendall(b"".join(req(i, s.cf.cascade_hash, keep=True) for i in order))
                stalled.append(sock)
            status, body, _ = request(port, req(3, s.cf.cascade_hash))
            assert (status, body) == (0, block(s.data, s.cf, 3))
            # Parked responses resume intact once their readers wake up.
            for sock in stalled:
                for i in order:
                    assert read_response(sock) == (0, block(s.data, s.cf, i))
        finally:
            for sock in stalled:
                sock.close()


@pytest.mark.loopback
def test_a_busy_pipelining_client_does_not_monopolise_a_worker(tmp_path: Path) -> None:
    s = make_sample(tmp_path, "busy.bin", 64 * 16384, 16384, seed=11)
    store = BlockStore.open_for_seeding(s.cf, s.data_path)
    with serving(store, max_workers=1) as server:
        total = 8000
        done = [0]
        port = server.address[1]
        busy = connect(port)
        first = threading.Event()

        def reader() -> None:
            for _ in range(total):
                read_response(busy)
                done[0] += 1
                first.set()

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        busy.sendall(b"".join(req(i % 64, s.cf.cascade_hash, keep=True) for i in range(total)))
        assert first.wait(TIMEOUT)
        status, _, _ = request(port, req(1, s.cf.cascade_hash))
        assert status == 0
        # Unfair, it would come after every busy request but what the socket buffers hold (< 1000 blocks).
        assert done[0] < total - 1500, "the second client waited for the busy one to finish"
        th.join(30)
        assert done[0] == total
        busy.close()


@pytest.mark.loopback
def test_at_the_connection_limit_the_longest_idle_connection_makes_room(tmp_path: Path) -> None:
    s = make_sample(tmp_path, "few.bin", 1024, 1024, seed=8)
    store = BlockStore.open_for_seeding(s.cf, s.data_path)
    with serving(store, max_workers=2, max_connections=3) as server:
        port = server.address[1]
        held = [connect(port) for _ in range(3)]
        for c in held[1:]:  # two are served; the first, quiet since it connected, is the oldest
            c.sendall(req(0, s.cf.cascade_hash, keep=True))
            assert read_response(c)[0] == 0
        with connect(port) as extra:  # the newcomer is served, not refused
            extra.sendall(req(0, s.cf.cascade_hash))
            assert read_response(extra)[0] == 0
        assert closed_by_server(held[0])
        for c in held[1:]:
            c.sendall(req(0, s.cf.cascade_hash, keep=True))
            assert read_response(c)[0] == 0
        for c in held:
            c.close()


@pytest.mark.process
def test_no_data_file_is_read_whole(tmp_path: Path) -> None:
    """A 64 MiB file served over one connection leaves the seeder's memory flat."""
    s = make_sample(tmp_path, "large.bin", 64 << 20, 1 << 20, seed=9)
    proc, port = start_seeder(str(s.cascade_path))
    try:
        with connect(port) as sock:
            sock.sendall(b"".join(req(i, s.cf.cascade_hash, keep=True) for i in range(s.cf.block_count)))
            digest = hashlib.sha256()
            for _ in range(s.cf.block_count):
                status, body = read_response(sock)
                assert status == 0
                digest.update(body)
            assert digest.digest() == s.cf.file_hash
        assert rss_kib(proc.pid) < 64 << 10
    finally:
        proc.stop()
        os.unlink(s.data_path)
