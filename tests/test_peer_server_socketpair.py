"""The block server over ``socket.socketpair()``: PROTOCOL.md sections 3 and 5 without a port.

The same table as the process tests in test_peer_server.py (kept: they check
the real ``peer seed``), here against one in-process :class:`BlockServer` that
serves each socketpair end through :meth:`BlockServer.serve_connection`. Its
clock is virtual, so the timeouts are checked by advancing time, not by waiting.
The client side is written from the spec (raw requests, byte-level checks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cascade.wire import BLOCK_RESPONSE_HEADER_SIZE, unpack_block_response_header_from
from peer.localdata import check_data
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from tests.test_peer_server import TIMEOUT, Sample, block, make_sample, read_response, recv_exact, req

pytestmark = pytest.mark.socketpair

IDLE = 30.0
HEADER = 10.0


class VirtualClock:
    """Monotonic seconds that move only when a test (or the rate limiter's sleep) says so."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._lock = threading.Lock()
        self.slept = 0.0

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> bool:
        """The rate limiter's wait: time passes at once. False: never cut short."""
        with self._lock:
            self._now += seconds
            self.slept += seconds
        return False


class Harness:
    """One started BlockServer without a listening socket; :meth:`connect` hands it a socketpair end."""

    def __init__(self, config: BlockServerConfig) -> None:
        self.clock = VirtualClock()
        self.server = BlockServer("127.0.0.1", 0, config, clock=self.clock, sleep=self.clock.sleep)
        self.clients: list[socket.socket] = []

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.settimeout(TIMEOUT)
        self.clients.append(ours)
        self.server.serve_connection(theirs, "client")
        return ours

    def request(self, raw: bytes) -> tuple[int, bytes, bool]:
        """One request on a fresh connection: (status, body, server closed afterwards)."""
        sock = self.connect()
        sock.sendall(raw)
        status, body = read_response(sock)
        return status, body, closed(sock)

    def close(self) -> None:
        self.server.stop()
        for c in self.clients:
            c.close()


def closed(sock: socket.socket) -> bool:
    """True when the server closed the connection (EOF), waiting at most TIMEOUT."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def still_open(sock: socket.socket) -> bool:
    """True when the connection has neither data nor EOF waiting right now (no waiting)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(TIMEOUT)
    return False


@contextlib.contextmanager
def harness(*stores: BlockStore, **overrides: Any) -> Iterator[Harness]:
    """A started harness serving ``stores``; ``overrides`` are other :class:`BlockServerConfig` fields."""
    config = BlockServerConfig(max_workers=2, idle_timeout=IDLE, header_timeout=HEADER)
    h = Harness(dataclasses.replace(config, **overrides))
    try:
        for store in stores:
            h.server.add_store(store)
        h.server.start(listen=False)
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    # 65 blocks of 16 KiB, the last one 123 bytes.
    return make_sample(tmp_path_factory.mktemp("pair"), "sample.bin", 64 * 16384 + 123, 16384)


@pytest.fixture(scope="module")
def partial(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    """Blocks 3 and 5 corrupt and the last one cut short: served as status 2."""
    s = make_sample(tmp_path_factory.mktemp("pair-partial"), "partial.bin", 10 * 4096 + 100, 4096, seed=2)
    data = bytearray(s.data)
    data[3 * 4096 + 7] ^= 0xFF
    data[5 * 4096] ^= 0x01
    s.data_path.write_bytes(data[: 10 * 4096 + 50])
    return s


@pytest.fixture
def served(sample: Sample, partial: Sample) -> Iterator[Harness]:
    stores = [
        BlockStore.open_for_seeding(sample.cf, sample.data_path),
        BlockStore.open_for_seeding(partial.cf, partial.data_path, check_data(partial.data_path, partial.cf)),
    ]
    try:
        with harness(*stores) as h:
            yield h
    finally:
        for store in stores:
            store.close()


# --- status codes (section 3) ---------------------------------------------------------


def test_first_and_last_block_are_served_exactly_then_closed(served: Harness, sample: Sample) -> None:
    cf = sample.cf
    for index in (0, cf.block_count - 1):
        assert served.request(req(index, cf.cascade_hash)) == (0, block(sample.data, cf, index), True)
    assert len(block(sample.data, cf, cf.block_count - 1)) == 123


@pytest.mark.parametrize("keep", [False, True])
def test_block_past_the_end_is_status_3_and_closed(served: Harness, sample: Sample, keep: bool) -> None:
    for index in (sample.cf.block_count, 2**64 - 1):
        status, body, was_closed = served.request(req(index, sample.cf.cascade_hash, keep))
        assert (status, was_closed) == (3, True)
        assert b"too large" in body


@pytest.mark.parametrize("keep", [False, True])
def test_unknown_hash_is_status_1_and_closed(served: Harness, keep: bool) -> None:
    status, body, was_closed = served.request(req(0, bytes(range(32)), keep))
    assert (status, was_closed) == (1, True)
    assert body.decode("utf-8")


def test_garbage_request_is_status_4_and_closed(served: Harness) -> None:
    status, body, was_closed = served.request(random.Random(3).randbytes(64))
    assert (status, was_closed) == (4, True)
    assert b"parse" in body


def test_garbage_longer_than_a_request_still_gets_its_status(served: Harness) -> None:
    status, _, was_closed = served.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
    assert (status, was_closed) == (4, True)


@pytest.mark.parametrize("garbage", [b"hello\n", b"X", b"CASCADE2", b"\x00" * 20])
def test_short_garbage_gets_status_4_without_waiting_for_64_bytes(served: Harness, garbage: bytes) -> None:
    sock = served.connect()
    sock.sendall(garbage)  # and nothing more: the answer cannot be waiting for the rest
    status, body = read_response(sock)
    assert status == 4 and body
    assert closed(sock)


def test_request_in_7_byte_pieces(served: Harness, sample: Sample) -> None:
    raw = req(7, sample.cf.cascade_hash)
    ours, theirs = socket.socketpair()
    served.clients.append(ours)
    ours.settimeout(TIMEOUT)
    ours.sendall(raw[:7])  # already waiting when the server takes the socket: its first read is 7 bytes
    served.server.serve_connection(theirs)
    for i in range(7, len(raw), 7):
        ours.sendall(raw[i : i + 7])
    assert read_response(ours) == (0, block(sample.data, sample.cf, 7))
    assert closed(ours)


def test_garbage_in_reserved_bytes_is_ignored(served: Harness, sample: Sample) -> None:
    rng = random.Random(4)
    for _ in range(3):
        raw = bytearray(req(2, sample.cf.cascade_hash))
        raw[8:24] = rng.randbytes(16)  # PROTOCOL.md section 4: some clients do this
        assert served.request(bytes(raw)) == (0, block(sample.data, sample.cf, 2), True)


# --- kept-open connections (section 5) ---------------------------------------------------


def test_keepopen_marker_with_garbage_in_the_other_reserved_bytes(served: Harness, sample: Sample) -> None:
    raw = bytearray(req(1, sample.cf.cascade_hash, keep=True))
    raw[16:24] = b"\xff" * 8
    sock = served.connect()
    sock.sendall(bytes(raw) * 2)
    for _ in range(2):
        assert read_response(sock) == (0, block(sample.data, sample.cf, 1))


def test_keepopen_pipelined_requests_are_answered_in_order(served: Harness, sample: Sample) -> None:
    cf = sample.cf
    order = [5, 0, 64, 3, 3, 17, 42, 1, 63, 9]
    sock = served.connect()
    sock.sendall(b"".join(req(i, cf.cascade_hash, keep=True) for i in order))
    for index in order:
        assert read_response(sock) == (0, block(sample.data, cf, index))
    sock.sendall(req(11, cf.cascade_hash, keep=True))  # still open
    assert read_response(sock) == (0, block(sample.data, cf, 11))


def test_a_long_pipeline_arrives_whole_and_in_order(served: Harness, sample: Sample) -> None:
    """More requests than one fair share (64) and than one socket buffer holds: order and bytes survive."""
    cf = sample.cf
    order = [random.Random(9).randrange(cf.block_count) for _ in range(300)]
    sock = served.connect()
    sender = threading.Thread(target=sock.sendall, args=(b"".join(req(i, cf.cascade_hash, True) for i in order),))
    sender.start()
    try:
        for index in order:
            head = recv_exact(sock, BLOCK_RESPONSE_HEADER_SIZE)
            status, length = unpack_block_response_header_from(head)
            assert (status, recv_exact(sock, length)) == (0, block(sample.data, cf, index))
    finally:
        sender.join(TIMEOUT)


def test_keepopen_closes_after_an_error_status(served: Harness, sample: Sample) -> None:
    h = sample.cf.cascade_hash
    sock = served.connect()
    sock.sendall(req(0, h, keep=True) + req(999, h, keep=True) + req(1, h, keep=True))
    assert read_response(sock)[0] == 0
    assert read_response(sock)[0] == 3
    assert closed(sock), "requests after a status 3 must not be answered"


def test_without_keepopen_only_the_first_pipelined_request_is_answered(served: Harness, sample: Sample) -> None:
    h = sample.cf.cascade_hash
    sock = served.connect()
    sock.sendall(req(4, h) + req(5, h))
    assert read_response(sock) == (0, block(sample.data, sample.cf, 4))
    assert closed(sock)


def test_partial_file_gives_status_2_and_keeps_the_connection(served: Harness, partial: Sample) -> None:
    cf = partial.cf
    expected = {i: 0 for i in range(cf.block_count)}
    expected.update({3: 2, 5: 2, cf.block_count - 1: 2})
    sock = served.connect()
    sock.sendall(b"".join(req(i, cf.cascade_hash, keep=True) for i in range(cf.block_count)))
    for i in range(cf.block_count):
        status, body = read_response(sock)
        assert status == expected[i], i
        assert body == block(partial.data, cf, i) if status == 0 else b"not present" in body
    status, _, was_closed = served.request(req(3, cf.cascade_hash))
    assert (status, was_closed) == (2, True)


def test_blocks_written_while_serving_become_available(tmp_path: Path) -> None:
    s = make_sample(tmp_path, "growing.bin", 8 * 1024, 1024, seed=6)
    out = tmp_path / "out.bin"
    store = BlockStore.open_for_fetching(s.cf, out, check_data(out, s.cf, whole_file=False))
    try:
        with harness(store) as h:
            sock = h.connect()
            sock.sendall(req(2, s.cf.cascade_hash, keep=True))
            assert read_response(sock)[0] == 2
            assert store.write_block(2, block(s.data, s.cf, 2))
            sock.sendall(req(2, s.cf.cascade_hash, keep=True))
            assert read_response(sock) == (0, block(s.data, s.cf, 2))
    finally:
        store.close()


def test_a_handed_over_socket_counts_against_the_connection_limit(sample: Sample) -> None:
    """serve_connection takes a socket as accept does: at the cap, the longest-quiet connection makes room."""
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
    h0 = sample.cf.cascade_hash
    try:
        # One worker: it hands `first` back to the selector before it serves `second`,
        # so `first` is idle (a candidate) when the newcomer comes, whatever the load.
        with harness(store, max_connections=2, max_workers=1) as h:
            first, second = h.connect(), h.connect()
            for sock in (first, second):  # each answered in turn, a second apart on the clock
                sock.sendall(req(0, h0, keep=True))
                assert read_response(sock)[0] == 0
                h.clock.advance(1.0)
            newcomer = h.connect()
            newcomer.sendall(req(1, h0, keep=True))
            assert read_response(newcomer) == (0, block(sample.data, sample.cf, 1))
            assert closed(first)
            second.sendall(req(2, h0, keep=True))
            assert read_response(second) == (0, block(sample.data, sample.cf, 2))
    finally:
        store.close()


# --- timeouts on the virtual clock ---------------------------------------------------------


def test_silent_and_half_sent_clients_are_closed_after_the_header_timeout(served: Harness, sample: Sample) -> None:
    silent = served.connect()
    half = served.connect()
    half.sendall(req(1, sample.cf.cascade_hash)[:40])
    kept = served.connect()
    kept.sendall(req(1, sample.cf.cascade_hash, keep=True))
    assert read_response(kept)[0] == 0
    # serve_connection hands sockets over in order: all three are the server's by
    # now, so their deadlines were set before this jump.
    served.clock.advance(HEADER + 1)
    assert closed(silent) and closed(half)
    # The sweep that closed them saw the same time: a connection quiet *between*
    # requests is held to the idle timeout, not the header timeout.
    assert still_open(kept)
    # Its idle deadline counts from when the worker finished the reply, which may be
    # just after the jump above: one more second covers both.
    served.clock.advance(IDLE + 1)
    assert closed(kept)


def test_a_trickled_request_keeps_the_deadline_of_its_first_byte(served: Harness, sample: Sample) -> None:
    """Slowloris: each byte in time, the whole never. A byte must not buy a fresh header timeout."""
    raw = req(1, sample.cf.cascade_hash)
    trickle = served.connect()
    # Sockets are adopted in the order handed over: once this answer is in, the
    # trickling one is the server's, its deadline set before any jump below.
    assert served.request(raw)[0] == 0
    for i in range(20):
        try:
            trickle.sendall(raw[i : i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return  # closed by the server already: what this test wants
        served.clock.advance(HEADER / 8)  # 2.5 header timeouts in all, never more than 1/8 between bytes
    assert closed(trickle)


def test_upload_rate_is_one_bucket_for_every_connection(tmp_path: Path) -> None:
    """3 MiB at 2 MiB/s over two connections takes 1.5 s of (virtual) time, as one limit, not two."""
    big = make_sample(tmp_path, "big.bin", 3 << 20, 64 << 10, seed=4)
    store = BlockStore.open_for_seeding(big.cf, big.data_path)
    received = [0, 0]
    try:
        with harness(store, upload_rate=2 << 20) as h:
            socks = [h.connect(), h.connect()]

            def pull(k: int) -> None:
                blocks = range(k, big.cf.block_count, 2)
                socks[k].sendall(b"".join(req(i, big.cf.cascade_hash, keep=True) for i in blocks))
                for i in blocks:
                    status, body = read_response(socks[k])
                    assert status == 0 and body == block(big.data, big.cf, i)
                    received[k] += len(body)

            threads = [threading.Thread(target=pull, args=(k,)) for k in (0, 1)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(TIMEOUT)
            slept = h.clock.slept
    finally:
        store.close()
    assert sum(received) == 3 << 20
    # The bucket starts empty; every byte waits for its share of the one rate.
    assert slept == pytest.approx(1.5, abs=0.05)
