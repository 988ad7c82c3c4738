"""`tracker run` as a real process on loopback, spoken to byte by byte."""

from __future__ import annotations

import hashlib
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cascade.metafile import encode_cascade
from cascade.wire import (
    TRACKER_HEADER_SIZE,
    PeerList,
    PeerRecord,
    TrackerCommand,
    TrackerError,
    TrackerRequest,
    decode_tracker_reply,
    pack_tracker_request_header,
)
from oscompat import detect
from tests.procs import Proc

pytestmark = pytest.mark.process

LIST = TrackerCommand.LIST
SUBSCRIBE = TrackerCommand.SUBSCRIBE
H1 = bytes(range(32))
H2 = bytes(range(100, 132))


def start(*extra: str) -> tuple[Proc, int]:
    proc = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", *extra])
    try:
        port = proc.wait_listening()
    except BaseException:
        proc.stop()
        raise
    return proc, port


@pytest.fixture
def tracker() -> Iterator[int]:
    proc, port = start()
    try:
        yield port
    finally:
        proc.stop()


def exchange(
    port: int, payload: bytes, src: str = "127.0.0.1", chunked: bool = False, half_close: bool = False
) -> bytes:
    """Send ``payload`` from ``src`` and return everything read until the tracker closes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        if chunked:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(payload)):
                s.sendall(payload[i : i + 1])
        else:
            s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def announce(
    port: int, command: TrackerCommand, ip: str, peer_port: int, h: bytes = H1, src: str = "127.0.0.1"
) -> tuple[PeerRecord, ...]:
    reply = decode_tracker_reply(exchange(port, TrackerRequest(command, h, ip, peer_port).encode(), src=src))
    assert isinstance(reply, PeerList), reply
    return reply.peers


def addrs(peers: tuple[PeerRecord, ...]) -> list[tuple[str, int]]:
    return [(p.ip, p.port) for p in peers]


def header(magic: bytes = b"CASC", version: int = 1, command: int = 1, length: int = 38) -> bytes:
    return pack_tracker_request_header(magic, version, command, length)


BODY = TrackerRequest(LIST, H1, "10.0.0.1", 6666).encode()[TRACKER_HEADER_SIZE:]

CONFORMANCE = [
    ("wrong magic", header(magic=b"CASX") + BODY, "magic"),
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(28), "magic"),
    ("version 0", header(version=0) + BODY, "version"),
    ("version 2", header(version=2) + BODY, "version"),
    ("command 0", header(command=0) + BODY, "command"),
    ("command 3", header(command=3) + BODY, "command"),
    ("length 37", header(length=37) + BODY, "length"),
    ("length 39", header(length=39) + BODY, "length"),
    ("length 0", header(length=0), "length"),
    ("huge length", header(length=0xFFFFFFFF) + BODY, "length"),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "bytewise"])
def test_conformance_table(tracker: int, chunked: bool) -> None:
    for name, payload, word in CONFORMANCE:
        raw = exchange(tracker, payload, chunked=chunked)
        reply = decode_tracker_reply(raw)
        assert isinstance(reply, TrackerError), name
        assert reply.status != 0 and word in reply.message, (name, reply)
    for command in (LIST, SUBSCRIBE):
        raw = exchange(tracker, TrackerRequest(command, H2, "10.0.0.9", 9).encode(), chunked=chunked)
        assert raw[0] == 0 and len(raw) >= 5
        assert isinstance(decode_tracker_reply(raw), PeerList)
        # trailing bytes (say a newline from a hand-made client) are ignored, and the reply still arrives
        raw = exchange(tracker, TrackerRequest(command, H2, "10.0.0.8", 8).encode() + b"\n" * 100, chunked=chunked)
        assert raw[0] == 0 and isinstance(decode_tracker_reply(raw), PeerList)


def test_a_wrong_field_is_answered_before_the_rest_arrives(tracker: int) -> None:
    for payload, word in [(b"XXXX", "magic"), (header(version=9)[:8], "version"), (header(command=7)[:12], "command")]:
        with socket.create_connection(("127.0.0.1", tracker), timeout=5) as s:
            s.sendall(payload)  # and then nothing: the answer must not wait for the other bytes
            got = b""
            while chunk := s.recv(100):
                got += chunk
        reply = decode_tracker_reply(got)
        assert isinstance(reply, TrackerError) and word in reply.message


def test_short_request_gets_a_message(tracker: int) -> None:
    for size in (1, 15, 16, 53):
        reply = decode_tracker_reply(exchange(tracker, (header() + BODY)[:size], half_close=True))
        assert isinstance(reply, TrackerError) and f"{size} bytes" in reply.message


def test_enrolment_good_flag_and_last_seen(tracker: int) -> None:
    before = int(time.time())
    assert announce(tracker, SUBSCRIBE, "127.0.0.2", 7001, src="127.0.0.2") == ()
    got = announce(tracker, LIST, "127.0.0.3", 7002, src="127.0.0.3")
    assert addrs(got) == [("127.0.0.2", 7001)] and got[0].good
    assert before <= got[0].last_seen <= int(time.time())
    got = announce(tracker, LIST, "127.0.0.4", 7003, src="127.0.0.4")
    assert addrs(got) == [("127.0.0.2", 7001), ("127.0.0.3", 7002)]
    assert [p.good for p in got] == [True, False]
    assert before <= got[1].last_seen <= int(time.time())
    # the subscriber lists: it never sees itself, and it stays good for others
    got = announce(tracker, LIST, "127.0.0.2", 7001, src="127.0.0.2")
    assert sorted(addrs(got)) == [("127.0.0.3", 7002), ("127.0.0.4", 7003)]
    got = announce(tracker, LIST, "127.0.0.3", 7002, src="127.0.0.3")
    assert addrs(got)[0] == ("127.0.0.2", 7001) and got[0].good
    assert ("127.0.0.3", 7002) not in addrs(got)
    # another swarm is separate
    assert announce(tracker, LIST, "127.0.0.3", 7002, h=H2, src="127.0.0.3") == ()


def test_any_address_is_replaced_by_the_source(tracker: int) -> None:
    assert announce(tracker, SUBSCRIBE, "0.0.0.0", 7005, src="127.0.0.5") == ()
    got = announce(tracker, LIST, "0.0.0.0", 7006, src="127.0.0.6")
    assert addrs(got) == [("127.0.0.5", 7005)] and got[0].good
    assert addrs(announce(tracker, LIST, "127.0.0.9", 1, src="127.0.0.9")) == [("127.0.0.5", 7005), ("127.0.0.6", 7006)]
    got = announce(tracker, LIST, "0.0.0.0", 7005, src="127.0.0.5")  # the requester itself, by source address
    assert sorted(addrs(got)) == [("127.0.0.6", 7006), ("127.0.0.9", 1)]
    assert all(p.ip != "0.0.0.0" for p in got)


def test_max_peers_subset_good_first() -> None:
    proc, port = start("--max-peers", "4")
    try:
        for i in range(3):
            announce(port, SUBSCRIBE, "10.1.0.1", 100 + i)
        for i in range(6):
            announce(port, LIST, "10.2.0.1", 200 + i)
        orders = set()
        for _ in range(20):
            got = announce(port, LIST, "10.3.0.1", 300)
            assert len(got) == 4 and [p.good for p in got] == [True, True, True, False]
            assert ("10.3.0.1", 300) not in addrs(got)
            orders.add(tuple(addrs(got)))
        assert len(orders) > 1  # random order and subset
    finally:
        proc.stop()


def test_peer_ttl_expires_a_peer() -> None:
    proc, port = start("--peer-ttl", "1")
    try:
        announce(port, SUBSCRIBE, "10.0.0.1", 1)
        assert addrs(announce(port, LIST, "10.0.0.2", 2)) == [("10.0.0.1", 1)]
        deadline = time.monotonic() + 6
        while announce(port, LIST, "10.0.0.2", 2):
            assert time.monotonic() < deadline, "peer never expired"
            time.sleep(0.05)
    finally:
        proc.stop()


def test_allow_list_by_hex_and_by_cascade_file(tmp_path: Path) -> None:
    meta = encode_cascade(10, 4, bytes(32), bytes(96))
    (tmp_path / "notes.txt.cascade").write_bytes(meta)
    meta_hash = hashlib.sha256(meta).digest()
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# allowed\n{H1.hex()}\n\nnotes.txt.cascade\n")
    proc, port = start("--allow", str(allow))
    try:
        assert announce(port, SUBSCRIBE, "10.0.0.1", 1) == ()
        assert announce(port, SUBSCRIBE, "10.0.0.1", 1, h=meta_hash) == ()
        reply = decode_tracker_reply(exchange(port, TrackerRequest(LIST, H2, "10.0.0.1", 1).encode()))
        assert isinstance(reply, TrackerError) and reply.status != 0 and H2.hex() in reply.message
        assert addrs(announce(port, LIST, "10.0.0.2", 2)) == [("10.0.0.1", 1)]
    finally:
        proc.stop()
    allow.write_text("not-a-hash\n")
    bad = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--allow", str(allow)])
    try:
        assert bad.wait(15) != 0
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and "allow.txt:1" in lines[0] and "Traceback" not in bad.stderr
    finally:
        bad.stop()


def test_state_survives_a_sigterm_restart(tmp_path: Path) -> None:
    state = tmp_path / "tracker.sqlite"
    proc, port = start("--state", str(state))
    try:
        announce(port, SUBSCRIBE, "10.0.0.1", 1)
        before = announce(port, LIST, "10.0.0.2", 2)
        proc.signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        proc.stop()
    proc, port = start("--state", str(state))
    try:
        got = announce(port, LIST, "10.0.0.3", 3)
        assert addrs(got) == [("10.0.0.1", 1), ("10.0.0.2", 2)]
        assert [p.good for p in got] == [True, False]
        assert got[0].last_seen == before[0].last_seen  # last-seen survives
        proc.signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        proc.stop()


def test_bad_state_file_is_one_line_error(tmp_path: Path) -> None:
    state = tmp_path / "junk.sqlite"
    state.write_bytes(b"this is not a database" * 100)
    proc = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--state", str(state)])
    try:
        assert proc.wait(15) != 0
        assert "state file" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        proc.stop()


@pytest.mark.parametrize(
    "args, word",
    [(["--port", "70000"], "port"), (["--peer-ttl", "0"], "peer-ttl"), (["--max-peers", "x"], "max-peers")],
)
def test_bad_options(args: list[str], word: str) -> None:
    proc = Proc(["tracker", "run", *args])
    try:
        assert proc.wait(15) == 2
        assert word in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finally:
        proc.stop()


def test_port_in_use_is_one_line_error(tracker: int) -> None:
    proc = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", str(tracker)])
    try:
        assert proc.wait(15) != 0
        assert "cannot listen" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        proc.stop()


def _fuzz_one(port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while (chunk := s.recv(4096)) and len(got) < 100_000:
                got += chunk
        except OSError:
            if len(payload) > 4096:  # far more than 54 bytes: the tracker stopped reading and reset
                return
            raise
    assert len(got) <= 5 + 12 * 50


def test_fuzz_then_still_serving() -> None:
    proc, port = start("--read-timeout", "1")
    rng = random.Random(1234)
    valid = TrackerRequest(LIST, H1, "10.0.0.1", 1).encode()
    payloads = []
    for i in range(3000):
        kind = i % 5
        if kind == 0:
            payloads.append(rng.randbytes(rng.randrange(0, 120)))
        elif kind == 1:
            payloads.append(valid[: rng.randrange(0, 54)])
        elif kind == 2:
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(54)] = rng.randrange(256)
            payloads.append(bytes(mutated))
        elif kind == 3:
            payloads.append(header() + rng.randbytes(rng.randrange(0, 60)))
        else:
            payloads.append(TrackerRequest(SUBSCRIBE, rng.randbytes(32), "0.0.0.0", rng.randrange(65536)).encode())
    payloads += [bytes(1 << 20), header(length=1 << 20) + rng.randbytes(1 << 20)]
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: _fuzz_one(port, p), payloads))
        assert proc.popen.poll() is None
        assert announce(port, SUBSCRIBE, "10.0.0.7", 7) is not None
        assert ("10.0.0.7", 7) in addrs(announce(port, LIST, "10.0.0.8", 8))
    finally:
        assert proc.stop() == 0


def test_idle_connections_do_not_block_a_list() -> None:
    proc, port = start("--read-timeout", "30", "--workers", "2")
    idle: list[socket.socket] = []
    try:
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                s.sendall(header()[: 1 + i % 15])  # a slow client, stuck mid-request
            idle.append(s)
        # With a 30 s read timeout a worker held by them would hold this answer past the
        # client's 5 s timeout; how soon it comes is measured in bench/server_timing.py.
        announce(port, SUBSCRIBE, "10.0.0.1", 1)
        got = announce(port, LIST, "10.0.0.2", 2)
        assert addrs(got) == [("10.0.0.1", 1)]
        proc.signal(signal.SIGTERM)  # while they are still held: exit 0, not after their 30 s
        assert proc.wait(5) == 0
    finally:
        for s in idle:
            s.close()
        proc.stop()


def test_slow_client_is_dropped_after_the_read_timeout() -> None:
    proc, port = start("--read-timeout", "0.5")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(header()[:10])
            got = b""
            while chunk := s.recv(100):  # the 5 s socket timeout is far past the 0.5 s read timeout
                got += chunk
        reply = decode_tracker_reply(got)
        assert isinstance(reply, TrackerError) and "10 bytes" in reply.message
    finally:
        proc.stop()


def test_max_connections_caps_parked_clients() -> None:
    proc, port = start("--max-connections", "4", "--read-timeout", "30")
    held: list[socket.socket] = []
    try:
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"CA")  # parked: accepted, waiting for the rest
            held.append(s)
        deadline = time.monotonic() + 5
        closed: list[socket.socket] = []
        while len(closed) < 8 and time.monotonic() < deadline:
            closed = select.select(held, [], [], 0.05)[0]  # readable = EOF or an error reply: let go
        assert len(closed) == 8
        if detect().defer_accept:
            assert addrs(announce(port, LIST, "10.0.0.2", 2)) == []
        else:
            # Without TCP_DEFER_ACCEPT (macOS, Windows, CASCADE_PORTABLE) a connection accepted
            # before its request arrives is parked too, so at the cap it may be told FULL and retry.
            # (A refusal closes at once, so its reply may be lost to a reset.)
            request = TrackerRequest(LIST, H1, "10.0.0.2", 2).encode()
            answered = False
            for _ in range(50):  # bounded; a request answered whole ends it
                try:
                    reply = decode_tracker_reply(exchange(port, request))
                except ConnectionResetError:
                    continue
                if isinstance(reply, PeerList):
                    answered = reply.peers == ()
                    break
            assert answered
    finally:
        for s in held:
            s.close()
        proc.stop()


def test_many_concurrent_clients_beside_idle_connections(tracker: int) -> None:
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            for i in range(40):
                command = SUBSCRIBE if i % 2 else LIST
                peers = announce(tracker, command, f"10.9.{n}.1", 1000 + i, h=H2)
                assert len(peers) <= 50 and (f"10.9.{n}.1", 1000 + i) not in addrs(peers)
        except BaseException as exc:
            errors.append(exc)

    idle = [socket.create_connection(("127.0.0.1", tracker), timeout=5) for _ in range(40)]
    try:
        for s in idle[::2]:
            s.sendall(b"CASC")  # half of them parked mid-request, the others never accepted yet
        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for s in idle:
            s.close()
    assert not errors, errors[0]
    got = announce(tracker, LIST, "10.0.0.1", 1, h=H2)
    assert len(got) == 50 and all(p.good for p in got[:50])
