"""Several real tracker processes on one real redis-server (``--store redis://...``).

What issue 12 asks of a shared store: a peer that announced at tracker A is
listed by tracker B at once (binary protocol and HTTP API alike); Redis going
away costs requests an error status (binary) or a 503 (HTTP) at once, never a
tracker, with one log line; and service resumes by itself when Redis is back.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cascade.metafile import encode_cascade
from cascade.wire import (
    PeerList,
    TrackerCommand,
    TrackerError,
    TrackerReply,
    TrackerRequest,
    TrackerStatus,
    decode_tracker_reply,
)
from tests.procs import Proc, start_tracker
from tests.procs import TrackerProcess as Tracker
from tests.redisfix import RedisServer

pytestmark = pytest.mark.process

LIST = TrackerCommand.LIST
SUBSCRIBE = TrackerCommand.SUBSCRIBE
H1 = bytes(range(32))
H2 = bytes(range(7, 39))
_RECOVERY_DEADLINE = 20.0  # seconds for a tracker to serve again once Redis is back; generous


@pytest.fixture
def trackers(redis_url: str) -> Iterator[tuple[Tracker, Tracker]]:
    a = start_tracker("--store", redis_url)
    try:
        b = start_tracker("--store", redis_url)
        try:
            yield a, b
        finally:
            b.proc.stop()
    finally:
        a.proc.stop()


def ask(port: int, command: TrackerCommand, ip: str, peer_port: int, h: bytes = H1) -> TrackerReply:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(TrackerRequest(command, h, ip, peer_port).encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return decode_tracker_reply(out)


def ask_until_served(port: int, command: TrackerCommand, ip: str, peer_port: int) -> TrackerReply:
    """Ask until the tracker answers with a peer list (it serves again), or ``_RECOVERY_DEADLINE`` passes."""
    deadline = time.monotonic() + _RECOVERY_DEADLINE
    while True:
        reply = ask(port, command, ip, peer_port)
        if isinstance(reply, PeerList) or time.monotonic() > deadline:
            return reply
        time.sleep(0.05)


def peers_of(reply: TrackerReply) -> set[tuple[str, int, bool]]:
    assert isinstance(reply, PeerList), reply
    return {(p.ip, p.port, p.good) for p in reply.peers}


def cascade_bytes(seed: int, length: int = 1000, block: int = 256) -> bytes:
    data = (hashlib.sha256(str(seed).encode()).digest() * (length // 32 + 1))[:length]
    hashes = b"".join(hashlib.sha256(data[i : i + block]).digest() for i in range(0, length, block))
    return encode_cascade(length, block, hashlib.sha256(data).digest(), hashes)


def test_a_peer_announced_at_one_tracker_is_listed_by_the_other(trackers: tuple[Tracker, Tracker]) -> None:
    a, b = trackers
    assert peers_of(ask(a.port, SUBSCRIBE, "10.0.0.1", 1)) == set()
    assert peers_of(ask(b.port, LIST, "10.0.0.2", 2)) == {("10.0.0.1", 1, True)}
    r = requests.post(
        f"{b.http}/api/v1/announce", json={"cascade_hash": H1.hex(), "ip": "10.0.0.3", "port": 3, "action": "list"}
    )
    assert r.status_code == 200, r.text
    assert {(p["ip"], p["port"]) for p in r.json()["peers"]} == {("10.0.0.1", 1), ("10.0.0.2", 2)}
    assert peers_of(ask(a.port, LIST, "10.0.0.1", 1)) == {("10.0.0.2", 2, False), ("10.0.0.3", 3, False)}
    for t in (a, b):
        swarms = requests.get(f"{t.http}/api/v1/swarms", timeout=5).json()
        assert [(s["cascade_hash"], s["seeders"], s["others"]) for s in swarms["swarms"]] == [(H1.hex(), 1, 2)]

    data = cascade_bytes(5)
    h = hashlib.sha256(data).hexdigest()
    up = requests.put(f"{a.http}/api/v1/cascades", data=data, params={"name": "shared.bin"}, timeout=5)
    assert up.status_code == 201, up.text
    down = requests.get(f"{b.http}/cascades/{h}.cascade", timeout=5)
    assert down.status_code == 200 and down.content == data
    assert down.headers["X-Cascade-Name"] == "shared.bin"
    metrics = requests.get(f"{b.http}/metrics", timeout=5).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert (
        samples[("cascade_tracker_requests_total", (("command", "subscribe"), ("protocol", "tcp"), ("status", "0")))]
        == 1
    )
    assert samples[("cascade_tracker_cascade_files", ())] == 1


def test_redis_going_away_costs_requests_not_trackers_and_service_resumes(redis_server: RedisServer) -> None:
    redis_server.stop()
    redis_server.start()  # fresh and empty, and it is this test's to stop
    allow = Path(redis_server.log_path).parent / "allow.txt"
    allow.write_text(H1.hex() + "\n")
    a = start_tracker("--store", redis_server.url, "--allow", str(allow))
    b: Tracker | None = None
    try:
        b = start_tracker("--store", redis_server.url)  # no --allow: uses the list A wrote
        assert peers_of(ask(a.port, SUBSCRIBE, "10.0.0.1", 1)) == set()
        redis_server.stop()
        for _ in range(3):
            for t in (a, b):
                reply = ask(t.port, LIST, "10.0.0.2", 2)
                assert isinstance(reply, TrackerError) and reply.status == TrackerStatus.UNAVAILABLE, reply
                r = requests.post(
                    f"{t.http}/api/v1/announce", json={"cascade_hash": H1.hex(), "port": 2, "action": "list"}, timeout=5
                )
                assert r.status_code == 503 and "unavailable" in r.json()["error"], r.text
                assert requests.get(f"{t.http}/api/v1/swarms", timeout=5).status_code == 503
        for t in (a, b):
            assert t.proc.popen.poll() is None
            assert t.proc.stderr.count("unavailable") == 1, t.proc.stderr  # one line, not one per request
            assert "Traceback" not in t.proc.stderr

        redis_server.start()  # same port, empty: no persistence
        assert peers_of(ask_until_served(a.port, SUBSCRIBE, "10.0.0.1", 1)) == set()
        a.proc.wait_for_line("is back")
        # B recovers too (its breaker lets a probe through within PROBE_INTERVAL) and shares the swarm again.
        assert peers_of(ask_until_served(b.port, LIST, "10.0.0.2", 2)) == {("10.0.0.1", 1, True)}
        b.proc.wait_for_line("is back")
        # The allow list came back with the tracker that holds it, not "every hash allowed".
        for t in (a, b):
            refused = ask(t.port, LIST, "10.0.0.2", 2, h=H2)
            assert isinstance(refused, TrackerError) and refused.status == 2, refused
    finally:
        if b is not None:
            assert b.proc.stop() == 0
        assert a.proc.stop() == 0
    assert "Traceback" not in a.proc.stderr


def test_unreachable_redis_at_start_is_one_line() -> None:
    from tests.redisfix import free_port

    proc = Proc(["tracker", "run", "--port", "0", "--store", f"redis://127.0.0.1:{free_port()}/0"])
    try:
        assert proc.wait(30) == 1
    finally:
        proc.stop()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach redis" in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--store", "mysql://x"], "--store must be"),
        (["--store", "sqlite:"], "needs a path"),
        (["--store", "redis://127.0.0.1:x/0"], "bad Redis URL"),
        (["--store", "redis://127.0.0.1:1/abc"], "database must be a number"),
        (["--store", "memory", "--state", "s.db"], "give one of them"),
    ],
)
def test_bad_store_options_are_one_line(args: list[str], word: str, tmp_path: Path) -> None:
    proc = Proc(["tracker", "run", "--port", "0", *args], cwd=tmp_path)
    try:
        assert proc.wait(30) == 2  # bad usage (cascade/command.py)
    finally:
        proc.stop()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], proc.stderr
