"""The tracker's binary protocol over ``socket.socketpair()``: PROTOCOL.md section 2 without a port.

The same conformance table as test_tracker.py (kept: it checks the real
``tracker run``), against one in-process :class:`TrackerServer` that takes each
socketpair end through :meth:`TrackerServer.serve_connection`, with the source
address it would have seen. The read deadline runs on a virtual clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from cascade.wire import (
    TRACKER_REQUEST_SIZE,
    PeerList,
    PeerRecord,
    TrackerCommand,
    TrackerError,
    TrackerReply,
    TrackerRequest,
    TrackerStatus,
    decode_tracker_reply,
)
from tests.test_tracker import BODY, CONFORMANCE, H1, H2, addrs, header
from tracker.server import ServerConfig, TrackerServer, _Loop
from tracker.swarms import SwarmRegistry

pytestmark = pytest.mark.socketpair

LIST = TrackerCommand.LIST
SUBSCRIBE = TrackerCommand.SUBSCRIBE
TIMEOUT = 5.0
READ_TIMEOUT = 5.0


class VirtualClock:
    def __init__(self) -> None:
        self._now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class Harness:
    """A started TrackerServer without a listening socket; :meth:`connect` hands it a socketpair end."""

    def __init__(self, config: ServerConfig, allowed: frozenset[bytes] | None) -> None:
        self.clock = VirtualClock()
        self.registry = SwarmRegistry(seed=1, allowed=allowed)
        self.server = TrackerServer(self.registry, config, clock=self.clock)
        self.clients: list[socket.socket] = []

    def connect(self, src: str = "127.0.0.1", first: bytes = b"") -> socket.socket:
        """A connection from ``src``; ``first`` is already sent when the server takes it (as TCP_DEFER_ACCEPT does)."""
        ours, theirs = socket.socketpair()
        ours.settimeout(TIMEOUT)
        self.clients.append(ours)
        ours.sendall(first)
        self.server.serve_connection(theirs, src)
        return ours

    def exchange(
        self, payload: bytes, src: str = "127.0.0.1", chunked: bool = False, half_close: bool = False
    ) -> bytes:
        """Send ``payload`` from ``src``; everything read until the tracker closes."""
        if chunked:
            s = self.connect(src)
            for i in range(len(payload)):
                s.sendall(payload[i : i + 1])
        else:
            s = self.connect(src, payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return read_all(s)

    def announce(
        self, command: TrackerCommand, ip: str, port: int, h: bytes = H1, src: str = "127.0.0.1"
    ) -> tuple[PeerRecord, ...]:
        reply = decode_tracker_reply(self.exchange(TrackerRequest(command, h, ip, port).encode(), src))
        assert isinstance(reply, PeerList), reply
        return reply.peers


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@contextlib.contextmanager
def harness(max_connections: int | None = None, allowed: frozenset[bytes] | None = None) -> Iterator[Harness]:
    config = ServerConfig(host="127.0.0.1", port=0, workers=2, read_timeout=READ_TIMEOUT)
    if max_connections is not None:
        config = dataclasses.replace(config, max_connections=max_connections)
    h = Harness(config, allowed)
    h.server.start()
    try:
        yield h
    finally:
        for c in h.clients:  # first, so no lingering close waits for them
            c.close()
        h.server.shutdown()


@pytest.fixture
def tracker() -> Iterator[Harness]:
    with harness() as h:
        yield h


def after_read_timeout(h: Harness, s: socket.socket) -> bytes:
    """Advance the clock past the read timeout until ``s`` gets its answer; everything it reads.

    Usually once: a second jump covers a worker that read the clock for the
    deadline just after the first (two workers take handed sockets at once).
    """
    for _ in range(10):
        h.clock.advance(READ_TIMEOUT + 0.5)
        if select.select([s], [], [], 1.0)[0]:
            return read_all(s)
    raise AssertionError("no answer after ten read timeouts")


def error(raw: bytes) -> TrackerError:
    reply: TrackerReply = decode_tracker_reply(raw)
    assert isinstance(reply, TrackerError), reply
    return reply


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "bytewise"])
def test_conformance_table(tracker: Harness, chunked: bool) -> None:
    for name, payload, word in CONFORMANCE:
        reply = error(tracker.exchange(payload, chunked=chunked))
        assert reply.status == TrackerStatus.BAD_REQUEST and word in reply.message, (name, reply)
    for command in (LIST, SUBSCRIBE):
        raw = tracker.exchange(TrackerRequest(command, H2, "10.0.0.9", 9).encode(), chunked=chunked)
        assert isinstance(decode_tracker_reply(raw), PeerList)
        # trailing bytes (a newline from a hand-made client) are ignored, and the reply still arrives
        raw = tracker.exchange(TrackerRequest(command, H2, "10.0.0.8", 8).encode() + b"\n" * 100, chunked=chunked)
        assert isinstance(decode_tracker_reply(raw), PeerList)


def test_a_wrong_field_is_answered_before_the_rest_arrives(tracker: Harness) -> None:
    for payload, word in [(b"XXXX", "magic"), (header(version=9)[:8], "version"), (header(command=7)[:12], "command")]:
        s = tracker.connect()
        s.sendall(payload)  # and then nothing: the answer must not wait for the other bytes
        assert word in error(read_all(s)).message


def test_short_request_gets_a_message(tracker: Harness) -> None:
    for size in (1, 15, 16, 53):
        reply = error(tracker.exchange((header() + BODY)[:size], half_close=True))
        assert f"{size} bytes" in reply.message


def test_enrolment_good_flag_and_requester_exclusion(tracker: Harness) -> None:
    before = int(time.time())
    assert tracker.announce(SUBSCRIBE, "127.0.0.2", 7001, src="127.0.0.2") == ()
    got = tracker.announce(LIST, "127.0.0.3", 7002, src="127.0.0.3")
    assert addrs(got) == [("127.0.0.2", 7001)] and got[0].good
    assert before <= got[0].last_seen <= int(time.time())
    got = tracker.announce(LIST, "127.0.0.4", 7003, src="127.0.0.4")
    assert addrs(got) == [("127.0.0.2", 7001), ("127.0.0.3", 7002)]
    assert [p.good for p in got] == [True, False]
    got = tracker.announce(LIST, "127.0.0.2", 7001, src="127.0.0.2")  # never itself
    assert sorted(addrs(got)) == [("127.0.0.3", 7002), ("127.0.0.4", 7003)]
    assert tracker.announce(LIST, "127.0.0.3", 7002, h=H2) == ()  # another swarm is separate


def test_any_address_is_replaced_by_the_source(tracker: Harness) -> None:
    assert tracker.announce(SUBSCRIBE, "0.0.0.0", 7005, src="127.0.0.5") == ()
    got = tracker.announce(LIST, "0.0.0.0", 7006, src="127.0.0.6")
    assert addrs(got) == [("127.0.0.5", 7005)] and got[0].good
    got = tracker.announce(LIST, "0.0.0.0", 7005, src="127.0.0.5")  # the requester itself, by source address
    assert addrs(got) == [("127.0.0.6", 7006)]


def test_a_refused_hash_gets_status_not_allowed() -> None:
    with harness(allowed=frozenset({H1})) as h:
        assert h.announce(SUBSCRIBE, "10.0.0.1", 1) == ()
        reply = error(h.exchange(TrackerRequest(LIST, H2, "10.0.0.1", 1).encode()))
        assert reply.status == TrackerStatus.NOT_ALLOWED and H2.hex() in reply.message


def test_a_slow_client_is_answered_when_the_read_timeout_passes(tracker: Harness) -> None:
    s = tracker.connect()
    s.sendall(header()[:10])
    fresh = tracker.connect()
    fresh.sendall(header()[:4])
    assert tracker.announce(LIST, "10.0.0.1", 1) == ()  # served meanwhile: a parked client holds no worker
    reply = error(after_read_timeout(tracker, s))
    assert reply.status == TrackerStatus.BAD_REQUEST and "10 bytes" in reply.message
    assert "4 bytes" in error(after_read_timeout(tracker, fresh)).message


def test_bytes_not_yet_read_at_the_deadline_are_answered_not_reset() -> None:
    """The race CI hit: the worker parked a silent client, the client's bytes arrived,
    and the deadline was noticed before the worker read them. Closing with them unread
    resets the connection (AF_UNIX and TCP alike) and the client loses the reply."""
    server = TrackerServer(SwarmRegistry(seed=1), ServerConfig(host="127.0.0.1", port=0, read_timeout=READ_TIMEOUT))
    loop = _Loop(server.features)
    ours, theirs = socket.socketpair()
    with ours, contextlib.closing(loop.ep):
        ours.settimeout(TIMEOUT)
        theirs.setblocking(False)
        conn = server._park(theirs, "127.0.0.1", b"", loop)
        assert conn is not None
        ours.sendall(header()[:4] + bytes(2000))  # more than a request: the reply still counts only a short one
        server._expire(conn, loop)
        reply = error(read_all(ours))
    assert reply.status == TrackerStatus.BAD_REQUEST and f"{TRACKER_REQUEST_SIZE - 1} bytes" in reply.message


def test_max_connections_caps_parked_clients() -> None:
    with harness(max_connections=4) as h:
        held = [h.connect(first=b"CA") for _ in range(12)]  # parked: taken, waiting for the rest
        answered: list[socket.socket] = []
        deadline = time.monotonic() + TIMEOUT
        while len(answered) < 8 and time.monotonic() < deadline:
            answered = select.select(held, [], [], 0.05)[0]  # readable: an answer (and EOF) for those beyond the cap
        assert len(answered) == 8
        assert all(error(read_all(s)).status == TrackerStatus.FULL for s in answered)
        # A whole request is still answered at once: only parking is capped.
        assert h.announce(LIST, "10.0.0.2", 2) == ()
        for s in held:  # the four parked ones time out
            if s not in answered:
                assert "2 bytes" in error(after_read_timeout(h, s)).message
