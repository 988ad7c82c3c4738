"""Every tracker failure is one clear line (issue 9, sections 5 and 6), on loopback.

Fake trackers here are real socket servers in this process: a binary one that
records each 54-byte request and answers with chosen bytes (and can keep the
connection open), and an HTTP one that records each announce body.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cascade.errors import ProtocolError, PublishRefused, TrackerUnreachable
from cascade.wire import PeerList, PeerRecord, TrackerCommand, TrackerRequest
from peer.announcer import Announcer, Backoff
from peer.http_client import upload_cascade
from peer.tracker_client import TrackerAddress, announce
from tracker.cascade_store import CascadeStore
from tracker.http_api import HttpConfig, TrackerHttpServer
from tracker.server import ServerConfig, TrackerServer
from tracker.swarms import SwarmRegistry

pytestmark = pytest.mark.loopback

HASH = bytes(range(32))
# Nesting deep enough to exhaust json's recursion limit.
DEEP_JSON = b"[" * 60_000
SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "poem.txt.cascade"


class FakeBinaryTracker:
    """Answers every request with ``reply``; ``keep_open`` holds the connection open afterwards."""

    def __init__(self, reply: bytes, keep_open: bool = False) -> None:
        self.reply = reply
        self.keep_open = keep_open
        self.requests: list[TrackerRequest] = []
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        held: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                conn.settimeout(5)
                data = b""
                while len(data) < 54:
                    chunk = conn.recv(54 - len(data))
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(TrackerRequest.decode(data))
                conn.sendall(self.reply)
                if self.keep_open:
                    held.append(conn)  # closed only when the test ends
                else:
                    conn.close()
        finally:
            for conn in held:
                conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


class FakeHttpTracker:
    """Records each announce body and answers with ``body`` (HTTP 200, with a Content-Length)."""

    def __init__(self, body: bytes, status: int = 200) -> None:
        self.body = body
        self.status = status
        self.announces: list[dict[str, object]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # an upload: its body is a .cascade, not JSON
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self._answer()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                fake.announces.append(json.loads(self.rfile.read(length)))
                self._answer()

            def _answer(self) -> None:
                # One read of the body a test may swap meanwhile: its length and its bytes must
                # agree (read twice, a swap between them sent 13 bytes under a length of 60,000).
                body = fake.body
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test reads what it needs from self.announces

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.address = TrackerAddress("127.0.0.1", self.port, f"http://127.0.0.1:{self.port}")
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def http_api(tmp_path: Path) -> Iterator[TrackerHttpServer]:
    server = TrackerHttpServer(SwarmRegistry(), CascadeStore(tmp_path / "files"), HttpConfig(host="127.0.0.1", port=0))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def binary_tracker() -> Iterator[int]:
    server = TrackerServer(SwarmRegistry(), ServerConfig(host="127.0.0.1", port=0))
    _, port = server.bind()
    server.start()
    try:
        yield port
    finally:
        server.shutdown()


def wait_until(predicate: object, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.01)
    return False


# --- the binary tracker reply is read by its length ------------------------------


def test_a_whole_reply_on_a_connection_left_open_is_enough() -> None:
    peer = PeerRecord("127.0.0.9", 7000, 5, True)
    fake = FakeBinaryTracker(PeerList((peer,)).encode(), keep_open=True)
    try:
        # Before the fix this waited for EOF and failed with "unreachable: timed out".
        peers = announce(TrackerAddress("127.0.0.1", fake.port), TrackerCommand.LIST, HASH, "127.0.0.1", 1, 3.0)
        assert peers == (peer,)
    finally:
        fake.stop()


def test_a_reply_cut_short_says_how_much_came() -> None:
    fake = FakeBinaryTracker(PeerList((PeerRecord("127.0.0.9", 7000, 5, True),)).encode()[:9])
    try:
        with pytest.raises(ProtocolError, match=r"closed after 4 of the 12 body bytes"):
            announce(TrackerAddress("127.0.0.1", fake.port), TrackerCommand.LIST, HASH, "127.0.0.1", 1, 3.0)
    finally:
        fake.stop()


# --- the wrong port ------------------------------------------------------------------


def test_http_reply_on_the_binary_protocol_names_the_http_port() -> None:
    fake = FakeBinaryTracker(b"HTTP/1.0 400 Bad request\r\nContent-Length: 0\r\n\r\n")
    try:
        with pytest.raises(ProtocolError) as info:
            announce(TrackerAddress("127.0.0.1", fake.port), TrackerCommand.LIST, HASH, "127.0.0.1", 1, 3.0)
        assert str(info.value) == (
            f"tracker 127.0.0.1:{fake.port} answered in HTTP: this looks like the tracker's HTTP port; "
            f"use http://127.0.0.1:{fake.port}"
        )
    finally:
        fake.stop()


def test_binary_client_at_the_real_http_port_is_told_so(http_api: TrackerHttpServer) -> None:
    port = http_api.address[1]
    # The HTTP server waits for a line end our 54 bytes lack; the client nudges it after the timeout.
    with pytest.raises(ProtocolError, match=rf"HTTP port; use http://127.0.0.1:{port}$"):
        announce(TrackerAddress("127.0.0.1", port), TrackerCommand.LIST, HASH, "127.0.0.1", 1, 0.5)


def test_http_client_at_the_binary_port_is_told_so_without_log_noise(
    binary_tracker: int, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = TrackerAddress("127.0.0.1", binary_tracker, f"http://127.0.0.1:{binary_tracker}")
    with caplog.at_level(logging.DEBUG), pytest.raises(TrackerUnreachable) as info:
        announce(tracker, TrackerCommand.LIST, HASH, "127.0.0.1", 1, 3.0)
    message = str(info.value)
    assert "binary port; use HOST:PORT without http://" in message
    assert message.count("tracker ") == 1 and "\n" not in message
    assert not [r for r in caplog.records if r.name.startswith("urllib3") and r.levelno >= logging.WARNING]


# --- JSON a tracker may send ---------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [DEEP_JSON, b'{"peers": ' + b"[" * 60_000, b"[]", b'{"peers": [1]}', b'{"peers": {}}', b"\xff", b'"x"'],
    ids=["deep", "deep-inside", "list", "peer-not-object", "peers-not-list", "not-utf8", "string"],
)
def test_any_http_reply_is_one_protocol_error(body: bytes) -> None:
    fake = FakeHttpTracker(body)
    try:
        with pytest.raises(ProtocolError) as info:
            announce(fake.address, TrackerCommand.LIST, HASH, "127.0.0.1", 1, 3.0)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300
    finally:
        fake.stop()


@pytest.mark.parametrize("status", [201, 400])
def test_publish_to_a_tracker_answering_deep_json_is_one_line(status: int) -> None:
    fake = FakeHttpTracker(DEEP_JSON, status)
    try:
        with pytest.raises(PublishRefused) as info:
            upload_cascade(SAMPLE, f"http://127.0.0.1:{fake.port}", None, None)
        assert "\n" not in str(info.value)
    finally:
        fake.stop()


def test_announcer_keeps_retrying_through_bad_replies(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeHttpTracker(DEEP_JSON)
    announcer = Announcer(fake.address, "127.0.0.1", 1, backoff=Backoff(initial=0.01, cap=0.02), interval=60)
    try:
        with caplog.at_level(logging.WARNING, logger="peer.announcer"):
            announcer.add(HASH)
            announcer.start()
            assert wait_until(lambda: len(fake.announces) >= 3)
            fake.body = json.dumps({"peers": []}).encode()  # the tracker recovers
            assert wait_until(lambda: announcer.successes >= 1)
        assert announcer.alive
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and warnings[0].exc_info is None  # one line, no traceback
        assert "nested too deeply" in warnings[0].getMessage()
    finally:
        announcer.stop()
        fake.stop()


# --- announcing a wildcard listener -------------------------------------------------------


def test_wildcard_listener_announces_the_local_address_binary() -> None:
    fake = FakeBinaryTracker(PeerList(()).encode())
    try:
        announce(TrackerAddress("127.0.0.1", fake.port), TrackerCommand.SUBSCRIBE, HASH, "0.0.0.0", 6000, 3.0)
        assert [(r.ip, r.port) for r in fake.requests] == [("127.0.0.1", 6000)]
    finally:
        fake.stop()


def test_wildcard_listener_announces_the_local_address_http() -> None:
    fake = FakeHttpTracker(b'{"peers": []}')
    try:
        announce(fake.address, TrackerCommand.SUBSCRIBE, HASH, "0.0.0.0", 6000, 3.0)
        assert [(a["ip"], a["port"]) for a in fake.announces] == [("127.0.0.1", 6000)]
    finally:
        fake.stop()


def test_an_explicit_address_is_sent_as_given() -> None:
    fake = FakeBinaryTracker(PeerList(()).encode())
    try:
        announce(TrackerAddress("127.0.0.1", fake.port), TrackerCommand.SUBSCRIBE, HASH, "192.0.2.7", 6000, 3.0)
        assert [r.ip for r in fake.requests] == ["192.0.2.7"]
    finally:
        fake.stop()
