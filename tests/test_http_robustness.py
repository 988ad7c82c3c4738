"""The HTTP face under hostile clients: malformed requests, idle and slowloris floods, keep-alive.

A real `tracker run` process; its log must never hold a traceback. The full
figures (1,000 idle + 200 slowloris, 10,000 malformed requests) are measured
by `bench/http_flood.py`; these are the same checks, smaller.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import pytest
import requests

from tests.test_http_api import Tracker, start, unique_hash

pytestmark = pytest.mark.process

IDLE = 200
SLOW = 50
REAL = 20


@pytest.fixture(scope="module")
def tracker() -> Iterator[Tracker]:
    t = start()
    try:
        yield t
    finally:
        assert t.proc.stop() == 0
        assert "Traceback" not in t.proc.stderr


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` and read one answer: its head, then Content-Length bytes (or until the server closes)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            while True:
                head, sep, body = got.partition(b"\r\n\r\n")
                if sep:
                    m = re.search(rb"(?im)^content-length: *(\d+)", head)
                    if m and len(body) >= int(m.group(1)):
                        break
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except ConnectionResetError:  # the server closed while a large request was still being sent
            pass
    return got


def announce_post(body: bytes, extra: bytes = b"") -> bytes:
    return b"POST /api/v1/announce HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


MALFORMED: list[tuple[str, bytes]] = [
    ("json nested 60,000 deep", announce_post(b"[" * 60_000)),
    ("json objects nested deep", announce_post(b'{"a":' * 10_000)),
    ("body not UTF-8", announce_post(b'{"cascade_hash": "\xff\xfe", "port": 1, "action": "list"}')),
    ("body UTF-16", announce_post('{"port": 1}'.encode("utf-16"))),
    ("binary garbage", b"\x00\xff\x16\x03\x01garbage\r\n\r\n"),
    ("TLS hello", bytes.fromhex("160301002a0100002603035f") + b"\x00" * 40),
    ("unknown method", b"BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("lower-case method", b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("NUL in method", b"G\x00T /healthz HTTP/1.1\r\n\r\n"),
    ("HTTP/2.0", b"GET /healthz HTTP/2.0\r\n\r\n"),
    ("HTTP/1.2", b"GET /healthz HTTP/1.2\r\n\r\n"),
    ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\n\r\n"),
    ("HTTX/1.1", b"GET /healthz HTTX/1.1\r\n\r\n"),
    ("no version", b"GET /healthz\r\n\r\n"),
    ("header 70 KB", b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n"),
    ("request line 70 KB", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"),
    ("1,000 headers", b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(1000)) + b"\r\n"),
    ("header without colon", b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n"),
    ("NUL in a header", b"GET /healthz HTTP/1.1\r\nHost: a\x00b\r\n\r\n"),
    ("negative length", b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: -5\r\n\r\n"),
    ("length not a number", b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n"),
    ("two lengths", b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
    (
        "length and chunked",
        b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    ("chunked garbage", b"POST /api/v1/announce HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"),
    ("chunked, unknown coding", b"POST /api/v1/announce HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("huge length", b"POST /api/v1/announce HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{}"),
    ("bad percent escape in hash", b"GET /api/v1/swarms/%zz/peers HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("query flood", b"GET /api/v1/cascades?" + b"&".join(b"f%d=1" % i for i in range(50)) + b" HTTP/1.1\r\n\r\n"),
    ("upload name not UTF-8", b"PUT /api/v1/cascades HTTP/1.1\r\nX-Cascade-Name: %ff\r\nContent-Length: 1\r\n\r\nx"),
]


@pytest.mark.parametrize(("what", "request_bytes"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_a_4xx_json_error(tracker: Tracker, what: str, request_bytes: bytes) -> None:
    reply = exchange(tracker.http, request_bytes)
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n")[0]
    assert status_line.startswith(b"HTTP/1."), (what, reply[:200])
    status = int(status_line.split(b" ")[1])
    assert 400 <= status < 500, (what, reply[:300])
    assert isinstance(json.loads(body)["error"], str), (what, body[:200])
    assert requests.get(f"{tracker.url}/healthz", timeout=5).status_code == 200
    assert "Traceback" not in tracker.proc.stderr


def test_keep_alive_serves_many_requests_on_one_connection(tracker: Tracker) -> None:
    h = unique_hash()
    with requests.Session() as session:
        for i in range(5):
            r = session.post(
                f"{tracker.url}/api/v1/announce",
                json={"cascade_hash": h, "ip": "10.9.0.1", "port": 9000 + i, "action": "list"},
                timeout=5,
            )
            assert r.status_code == 200
            assert r.headers.get("Connection", "keep-alive").lower() != "close"
    with socket.create_connection(("127.0.0.1", tracker.http), timeout=5) as s:
        s.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.count(b"HTTP/1.1 200 OK") == 2


def test_idle_and_slowloris_flood_does_not_lock_out_real_requests(tracker: Tracker) -> None:
    held: list[socket.socket] = []
    try:
        for _ in range(IDLE):
            held.append(socket.create_connection(("127.0.0.1", tracker.http), timeout=5))
        for i in range(SLOW):
            s = socket.create_connection(("127.0.0.1", tracker.http), timeout=5)
            held.append(s)
            s.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow-%d: " % i)
        answered = 0
        for _ in range(REAL):
            r = requests.get(f"{tracker.url}/healthz", timeout=5)
            answered += r.status_code == 200
        assert answered == REAL
        metrics = requests.get(f"{tracker.url}/metrics", timeout=5).text
        assert "cascade_tracker_http_connections " in metrics
    finally:
        for s in held:
            s.close()
