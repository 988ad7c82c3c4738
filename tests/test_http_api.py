"""The tracker's HTTP API, spoken to with `requests` (and raw sockets) against a real `tracker run` process."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cascade.metafile import encode_cascade
from cascade.wire import TrackerCommand
from peer.tracker_client import TrackerAddress, announce
from tests.procs import Proc, messages
from tracker.cascade_store import CascadeStore
from tracker.http_api import HttpConfig, TrackerHttpServer
from tracker.swarms import SwarmRegistry

TOKEN = "s3cret-token"
HTTP_LINE = r"tracker http on (\S+):(\d+)"
MAX_UPLOAD = 16 << 20  # tracker.cascade_store.DEFAULT_MAX_FILE_SIZE


@dataclass
class Tracker:
    proc: Proc
    port: int  # binary protocol
    http: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"


def start(*extra: str, env: dict[str, str] | None = None) -> Tracker:
    proc = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", *extra], env=env)
    try:
        port = proc.wait_listening()
        http = int(proc.wait_for_line(HTTP_LINE).group(2))
    except BaseException:
        proc.stop()
        raise
    return Tracker(proc, port, http)


@pytest.fixture(scope="module")
def tracker() -> Iterator[Tracker]:
    t = start("--api-token", TOKEN, "--max-peers", "5")
    try:
        yield t
    finally:
        assert t.proc.stop() == 0
        assert "Traceback" not in t.proc.stderr


def cascade_bytes(seed: int, length: int = 1000, block: int = 256) -> bytes:
    data = hashlib.sha256(str(seed).encode()).digest() * (length // 32 + 1)
    data = data[:length]
    hashes = b"".join(hashlib.sha256(data[i : i + block]).digest() for i in range(0, length, block))
    return encode_cascade(length, block, hashlib.sha256(data).digest(), hashes)


def unique_hash() -> str:
    return hashlib.sha256(f"{time.monotonic_ns()}".encode()).hexdigest()


def post_announce(t: Tracker, doc: object, **kw: object) -> requests.Response:
    return requests.post(f"{t.url}/api/v1/announce", json=doc, timeout=5, **kw)  # type: ignore[arg-type]


def assert_error(r: requests.Response, status: int, text: str = "") -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    doc = r.json()
    assert isinstance(doc["error"], str) and doc["error"]
    assert text.lower() in doc["error"].lower()


def raw_request(t: Tracker, data: bytes, src: str = "127.0.0.1") -> bytes:
    """Send raw bytes and read the answer until the server closes."""
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((src, 0))
        s.connect(("127.0.0.1", t.http))
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def upload(t: Tracker, data: bytes, token: str | None = TOKEN, **kw: object) -> requests.Response:
    headers = dict(kw.pop("headers", {}) or {})  # type: ignore[call-overload]
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.put(f"{t.url}/api/v1/cascades", data=data, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


# --- health, paths, methods -------------------------------------------------------


@pytest.mark.process
def test_healthz(tracker: Tracker) -> None:
    lines = messages(tracker.proc.stderr)
    assert lines[0] == f"tracker listening on 127.0.0.1:{tracker.port}"
    assert lines[1] == f"tracker http on 127.0.0.1:{tracker.http}"
    r = requests.get(f"{tracker.url}/healthz", timeout=5)
    assert r.status_code == 200
    doc = r.json()
    assert doc["status"] == "ok" and doc["uptime_seconds"] >= 0
    assert {"swarms", "peers"} <= set(doc)


@pytest.mark.process
def test_unknown_path_is_404(tracker: Tracker) -> None:
    for path in ["/nope", "/api/v1", "/api/v2/swarms", "/cascades/", "/cascades/abc", "/../../etc/passwd"]:
        assert_error(requests.get(tracker.url + path, timeout=5), 404)


@pytest.mark.process
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/api/v1/swarms", "GET, HEAD"),
        ("GET", "/api/v1/announce", "POST"),
        ("PUT", "/api/v1/announce", "POST"),
        ("POST", "/api/v1/cascades", "GET, HEAD, PUT"),
        ("PUT", "/cascades/" + "ab" * 32 + ".cascade", "GET, HEAD"),
        ("PATCH", "/", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(tracker: Tracker, method: str, path: str, allow: str) -> None:
    r = requests.request(method, tracker.url + path, data=b"{}", timeout=5)
    assert_error(r, 405, "not allowed")
    assert r.headers["Allow"] == allow


@pytest.mark.process
def test_head_has_no_body(tracker: Tracker) -> None:
    r = requests.head(f"{tracker.url}/healthz", timeout=5)
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["Content-Length"]) > 0


@pytest.mark.process
def test_garbage_and_unknown_methods_get_json_errors_and_the_server_keeps_serving(tracker: Tracker) -> None:
    reply = raw_request(tracker, b"\x00\xffgarbage\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400"), reply[:100]
    assert b'{"error": ' in reply
    # A method llhttp does not know is a malformed request (http.server said 501).
    reply = raw_request(tracker, b"BREW /healthz HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400"), reply[:100]
    assert b'{"error": ' in reply
    reply = raw_request(tracker, b"GET /healthz HTTP/1.0\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n")
    assert reply.split(b" ")[1] in (b"400", b"431"), reply[:100]
    assert requests.get(f"{tracker.url}/healthz", timeout=5).status_code == 200


@pytest.mark.process
def test_idle_connections_do_not_block_others(tracker: Tracker) -> None:
    idle = [socket.create_connection(("127.0.0.1", tracker.http), timeout=5) for _ in range(4)]
    try:
        # Answered while four connections sit idle (how fast is bench/http_flood.py's business).
        assert requests.get(f"{tracker.url}/healthz", timeout=5).status_code == 200
    finally:
        for s in idle:
            s.close()


# --- announce ---------------------------------------------------------------------


@pytest.mark.process
def test_announce_subscribe_then_list_same_rules_as_tcp(tracker: Tracker) -> None:
    h = unique_hash()
    r = post_announce(tracker, {"cascade_hash": h, "ip": "10.0.0.1", "port": 7001, "action": "subscribe"})
    assert r.status_code == 200 and r.json() == {"peers": []}
    r = post_announce(tracker, {"cascade_hash": h, "ip": "10.0.0.2", "port": 7002, "action": "list"})
    peers = r.json()["peers"]
    assert [(p["ip"], p["port"], p["good"]) for p in peers] == [("10.0.0.1", 7001, True)]
    assert abs(peers[0]["last_seen"] - time.time()) < 5
    # The lister was enrolled with good=0; a subscriber sees both, never itself.
    r = post_announce(tracker, {"cascade_hash": h, "ip": "10.0.0.1", "port": 7001, "action": "subscribe"})
    assert {(p["ip"], p["good"]) for p in r.json()["peers"]} == {("10.0.0.2", False)}
    # The same swarm answers the binary protocol.
    records = announce(
        TrackerAddress("127.0.0.1", tracker.port), TrackerCommand.LIST, bytes.fromhex(h), "10.0.0.3", 7003
    )
    assert {(p.ip, p.good) for p in records} == {("10.0.0.1", True), ("10.0.0.2", False)}


@pytest.mark.process
def test_announce_zero_address_is_the_client_address(tracker: Tracker) -> None:
    h = unique_hash()
    body = json.dumps({"cascade_hash": h, "ip": "0.0.0.0", "port": 7100, "action": "subscribe"}).encode()
    request = b"POST /api/v1/announce HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert raw_request(tracker, request, src="127.0.0.2").startswith(b"HTTP/1.0 200")
    r = post_announce(tracker, {"cascade_hash": h, "port": 7101, "action": "list"})  # ip defaults to 0.0.0.0
    assert [(p["ip"], p["port"]) for p in r.json()["peers"]] == [("127.0.0.2", 7100)]


@pytest.mark.process
def test_announce_reply_is_a_subset_of_max_peers(tracker: Tracker) -> None:
    h = unique_hash()
    for i in range(9):
        post_announce(tracker, {"cascade_hash": h, "ip": f"10.1.0.{i + 1}", "port": 8000, "action": "subscribe"})
    r = post_announce(tracker, {"cascade_hash": h, "ip": "10.1.1.1", "port": 8000, "action": "list"})
    peers = r.json()["peers"]
    assert len(peers) == 5  # --max-peers 5
    assert all(p["good"] for p in peers)
    doc = requests.get(f"{tracker.url}/api/v1/swarms/{h}/peers", timeout=5).json()
    assert doc["seeders"] == 9 and doc["others"] == 1 and len(doc["peers"]) == 10


@pytest.mark.process
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"ip": "1.2.3.4", "port": 1, "action": "list"}', "cascade_hash"),
        (b'{"cascade_hash": "abc", "port": 1, "action": "list"}', "hex"),
        (b'{"cascade_hash": 12, "port": 1, "action": "list"}', "cascade_hash"),
        (b'{"cascade_hash": "' + b"zz" * 32 + b'", "port": 1, "action": "list"}', "hex"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "port": "1", "action": "list"}', "port"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "port": 70000, "action": "list"}', "port"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "port": -1, "action": "list"}', "port"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "port": true, "action": "list"}', "port"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "action": "list"}', "port"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "port": 1, "ip": "::1", "action": "list"}', "IPv4"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "port": 1, "ip": 5, "action": "list"}', "ip"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "port": 1, "action": "seed"}', "action"),
        (b'{"cascade_hash": "' + b"ab" * 32 + b'", "port": 1}', "action"),
    ],
)
def test_announce_bad_input_is_400(tracker: Tracker, body: bytes, message: str) -> None:
    r = requests.post(f"{tracker.url}/api/v1/announce", data=body, timeout=5)
    assert_error(r, 400, message)


@pytest.mark.process
def test_announce_without_length_is_411_and_chunked_too(tracker: Tracker) -> None:
    reply = raw_request(tracker, b"POST /api/v1/announce HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 411"), reply[:100]
    assert b"Content-Length" in reply

    def chunks() -> Iterator[bytes]:
        yield b'{"cascade_hash": "'
        yield b"ab" * 32 + b'", "port": 1, "action": "list"}'

    assert_error(requests.post(f"{tracker.url}/api/v1/announce", data=chunks(), timeout=5), 411, "chunked")


@pytest.mark.process
def test_announce_oversized_or_lying_length(tracker: Tracker) -> None:
    assert_error(requests.post(f"{tracker.url}/api/v1/announce", data=b" " * 70000, timeout=5), 413, "limit")
    # A length far beyond what is sent: refused from the header, before reading anything.
    reply = raw_request(tracker, b"POST /api/v1/announce HTTP/1.0\r\nContent-Length: 99999999999\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.0 413"), reply[:100]
    reply = raw_request(tracker, b"POST /api/v1/announce HTTP/1.0\r\nContent-Length: -5\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 400"), reply[:100]
    # A body shorter than its length: the client closes its side, the server answers 400.
    with socket.create_connection(("127.0.0.1", tracker.http), timeout=5) as s:
        s.sendall(b"POST /api/v1/announce HTTP/1.0\r\nContent-Length: 100\r\n\r\n{}")
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.0 400"), reply[:100]


# --- swarms -----------------------------------------------------------------------


@pytest.mark.process
def test_swarms_and_peers(tracker: Tracker) -> None:
    h = unique_hash()
    post_announce(tracker, {"cascade_hash": h, "ip": "10.2.0.1", "port": 9001, "action": "subscribe"})
    post_announce(tracker, {"cascade_hash": h, "ip": "10.2.0.2", "port": 9002, "action": "list"})
    doc = requests.get(f"{tracker.url}/api/v1/swarms", timeout=5).json()
    assert doc["truncated"] is False and doc["count"] == len(doc["swarms"])
    mine = [s for s in doc["swarms"] if s["cascade_hash"] == h]
    assert len(mine) == 1
    assert mine[0]["seeders"] == 1 and mine[0]["others"] == 1 and mine[0]["peers"] == 2
    assert mine[0]["name"] is None and mine[0]["last_activity"] <= time.time() + 1
    doc = requests.get(f"{tracker.url}/api/v1/swarms/{h}/peers", timeout=5).json()
    assert doc["cascade_hash"] == h
    assert [(p["ip"], p["port"], p["good"]) for p in doc["peers"]] == [
        ("10.2.0.1", 9001, True),
        ("10.2.0.2", 9002, False),
    ]
    # Each peer's age: whole seconds since the tracker last saw it.
    assert all(isinstance(p["age"], int) and 0 <= p["age"] <= 5 for p in doc["peers"])


def test_announce_stopped_drops_the_peer_at_once(tracker: Tracker) -> None:
    h = unique_hash()
    seeder = {"cascade_hash": h, "ip": "10.4.0.1", "port": 9201}
    assert post_announce(tracker, {**seeder, "action": "subscribe"}).status_code == 200
    post_announce(tracker, {"cascade_hash": h, "ip": "10.4.0.2", "port": 9202, "action": "list"})
    r = post_announce(tracker, {**seeder, "action": "stopped"})
    assert r.status_code == 200 and r.json() == {"peers": []}
    doc = requests.get(f"{tracker.url}/api/v1/swarms/{h}/peers", timeout=5).json()
    assert [(p["ip"], p["good"]) for p in doc["peers"]] == [("10.4.0.2", False)]
    # Saying it twice, or for a swarm the tracker never saw, is no error.
    assert post_announce(tracker, {**seeder, "action": "stopped"}).status_code == 200
    r = post_announce(tracker, {"cascade_hash": unique_hash(), "ip": "10.4.0.1", "port": 1, "action": "stopped"})
    assert r.status_code == 200
    metrics = requests.get(f"{tracker.url}/metrics", timeout=5).text
    assert metric(metrics, "cascade_tracker_requests_total", protocol="http", command="stopped", status="0") >= 3


@pytest.mark.process
def test_peers_of_unknown_or_malformed_hash(tracker: Tracker) -> None:
    assert_error(requests.get(f"{tracker.url}/api/v1/swarms/{unique_hash()}/peers", timeout=5), 404, "no swarm")
    assert_error(requests.get(f"{tracker.url}/api/v1/swarms/xyz/peers", timeout=5), 400, "hex")
    assert_error(requests.get(f"{tracker.url}/api/v1/swarms/{'ab' * 33}/peers", timeout=5), 400, "hex")


# --- uploads and downloads --------------------------------------------------------


@pytest.mark.process
def test_upload_needs_the_token(tracker: Tracker) -> None:
    data = cascade_bytes(1)
    r = upload(tracker, data, token=None)
    assert_error(r, 401, "Bearer")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_error(upload(tracker, data, token="wrong"), 403, "token")
    assert_error(upload(tracker, data, headers={"Authorization": "Basic abc"}, token=None), 401)
    assert_error(requests.get(f"{tracker.url}/cascades/{hashlib.sha256(data).hexdigest()}.cascade", timeout=5), 404)


@pytest.mark.process
def test_upload_download_list(tracker: Tracker) -> None:
    data = cascade_bytes(2, length=1000, block=100)
    h = hashlib.sha256(data).hexdigest()
    r = upload(tracker, data, params={"name": "report 2024.pdf"})
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["cascade_hash"] == h and doc["new"] is True and doc["name"] == "report 2024.pdf"
    assert doc["url"] == f"{tracker.url}/cascades/{h}.cascade"
    assert r.headers["Location"] == f"/cascades/{h}.cascade"
    # The same bytes again: 200, nothing new, the first name stays.
    r = upload(tracker, data, params={"name": "other"})
    assert r.status_code == 200 and r.json()["new"] is False and r.json()["name"] == "report 2024.pdf"

    r = requests.get(doc["url"], timeout=5)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["X-Cascade-Name"] == "report%202024.pdf"
    assert hashlib.sha256(r.content).hexdigest() == h

    listed = requests.get(f"{tracker.url}/api/v1/cascades", timeout=5).json()["cascades"]
    mine = [c for c in listed if c["cascade_hash"] == h]
    assert mine == [
        {
            "cascade_hash": h,
            "name": "report 2024.pdf",
            "data_length": 1000,
            "block_size": 100,
            "block_count": 10,
            "size": len(data),
            "stored_at": mine[0]["stored_at"],
            "path": f"/cascades/{h}.cascade",
        }
    ]


@pytest.mark.process
def test_upload_name_from_header_and_without_name(tracker: Tracker) -> None:
    data = cascade_bytes(3)
    r = upload(tracker, data, headers={"X-Cascade-Name": "caf%C3%A9.txt"})
    assert r.status_code == 201 and r.json()["name"] == "café.txt"
    r = requests.get(f"{tracker.url}/cascades/{r.json()['cascade_hash']}.cascade", timeout=5)
    assert r.headers["X-Cascade-Name"] == "caf%C3%A9.txt"
    data = cascade_bytes(4)
    r = upload(tracker, data)
    assert r.status_code == 201 and r.json()["name"] is None
    r = requests.get(f"{tracker.url}/cascades/{r.json()['cascade_hash']}.cascade", timeout=5)
    assert "X-Cascade-Name" not in r.headers


@pytest.mark.process
@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".", "bad\nname", "x" * 300, "a\\b"])
def test_upload_bad_name_is_400(tracker: Tracker, name: str) -> None:
    assert_error(upload(tracker, cascade_bytes(5), params={"name": name}), 400, "name")


@pytest.mark.process
@pytest.mark.parametrize(
    "data",
    [b"", b"not a cascade file at all, just text padded out to 64 bytes or more......", cascade_bytes(6)[:-1]],
)
def test_upload_invalid_cascade_is_400(tracker: Tracker, data: bytes) -> None:
    assert_error(upload(tracker, data), 400, "not a valid .cascade")


@pytest.mark.process
def test_upload_oversized_is_413_and_missing_length_411(tracker: Tracker) -> None:
    r = upload(tracker, b"\0" * (MAX_UPLOAD + 1))
    assert_error(r, 413, "limit")
    request = f"PUT /api/v1/cascades HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
    assert raw_request(tracker, request).startswith(b"HTTP/1.0 411")
    assert requests.get(f"{tracker.url}/healthz", timeout=5).status_code == 200


@pytest.mark.process
def test_download_unknown_or_malformed_is_404(tracker: Tracker) -> None:
    assert_error(requests.get(f"{tracker.url}/cascades/{unique_hash()}.cascade", timeout=5), 404)
    assert_error(requests.get(f"{tracker.url}/cascades/{'zz' * 32}.cascade", timeout=5), 404)
    assert_error(requests.get(f"{tracker.url}/cascades/..%2f..%2fetc.cascade", timeout=5), 404)


# --- the status page and metrics ------------------------------------------------


@pytest.mark.process
def test_status_page_escapes_what_clients_sent(tracker: Tracker) -> None:
    data = cascade_bytes(7)
    h = hashlib.sha256(data).hexdigest()
    evil = "<img src=x onerror=alert(1)> \"'&"
    assert upload(tracker, data, params={"name": evil}).status_code == 201
    post_announce(tracker, {"cascade_hash": h, "ip": "10.3.0.1", "port": 9100, "action": "subscribe"})
    r = requests.get(tracker.url + "/", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.text
    assert re.search(r'<meta http-equiv="refresh" content="\d+">', page)
    assert h in page and "10.3.0.1:9100" in page
    assert re.search(r"10\.3\.0\.1:9100 \(seeder, seen \d+ s ago\)", page), page
    assert "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt; &quot;&#x27;&amp;" in page
    swarms = requests.get(f"{tracker.url}/api/v1/swarms", timeout=5).json()["swarms"]
    assert [s["name"] for s in swarms if s["cascade_hash"] == h] == [evil]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample, read with prometheus_client's own parser (label order is free)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no {name} {labels} in:\n{text}")


@pytest.mark.process
def test_metrics_count_both_protocols(tracker: Tracker) -> None:
    before = requests.get(f"{tracker.url}/metrics", timeout=5).text
    h = unique_hash()
    announce(TrackerAddress("127.0.0.1", tracker.port), TrackerCommand.LIST, bytes.fromhex(h), "10.4.0.1", 1)
    post_announce(tracker, {"cascade_hash": h, "ip": "10.4.0.2", "port": 2, "action": "subscribe"})
    post_announce(tracker, {"cascade_hash": h, "port": 2, "action": "bogus"})
    r = requests.get(f"{tracker.url}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert "# TYPE cascade_tracker_requests_total counter" in text

    def grew(name: str, **labels: str) -> float:
        try:
            old = metric(before, name, **labels)
        except AssertionError:
            old = 0.0
        return metric(text, name, **labels) - old

    assert grew("cascade_tracker_requests_total", protocol="tcp", command="list", status="0") == 1
    assert grew("cascade_tracker_requests_total", protocol="http", command="subscribe", status="0") == 1
    assert grew("cascade_tracker_requests_total", protocol="http", command="invalid", status="1") == 1
    assert grew("cascade_tracker_http_responses_total", route="announce", code="400") == 1
    assert grew("cascade_tracker_http_responses_total", route="metrics", code="200") == 1
    assert metric(text, "cascade_tracker_swarms") >= 1
    assert metric(text, "cascade_tracker_peers") >= 2
    assert metric(text, "cascade_tracker_uptime_seconds") > 0
    assert metric(text, "cascade_tracker_cascade_files") >= 0


# --- limits and persistence (their own processes) ---------------------------------


@pytest.mark.process
def test_allow_list_and_uploads_survive_a_restart(tmp_path: Path) -> None:
    allowed = cascade_bytes(10)
    other = cascade_bytes(11)
    allow_file = tmp_path / "allow.txt"
    allow_file.write_text(hashlib.sha256(allowed).hexdigest() + "\n")
    state = tmp_path / "state.sqlite"
    args = ("--state", str(state), "--allow", str(allow_file))
    t = start(*args)
    try:
        r = upload(t, allowed, token=None, params={"name": "kept.bin"})
        assert r.status_code == 201, r.text
        assert_error(upload(t, other, token=None), 403, "not tracked")
        h_other = hashlib.sha256(other).hexdigest()
        assert_error(post_announce(t, {"cascade_hash": h_other, "port": 1, "action": "list"}), 403, "not tracked")
    finally:
        assert t.proc.stop() == 0
    folder = tmp_path / "state.sqlite.cascades"
    h = hashlib.sha256(allowed).hexdigest()
    assert sorted(p.name for p in folder.iterdir()) == [f"{h}.cascade", f"{h}.name"]
    assert {p.name for p in tmp_path.iterdir()} <= {"allow.txt", "state.sqlite", "state.sqlite.cascades"} | {
        p.name for p in tmp_path.glob("state.sqlite-*")
    }
    t = start(*args)
    try:
        r = requests.get(f"{t.url}/cascades/{h}.cascade", timeout=5)
        assert r.status_code == 200 and r.content == allowed
        listed = requests.get(f"{t.url}/api/v1/cascades", timeout=5).json()["cascades"]
        assert [(c["cascade_hash"], c["name"]) for c in listed] == [(h, "kept.bin")]
    finally:
        assert t.proc.stop() == 0


@pytest.mark.process
def test_without_state_the_upload_folder_is_removed(tmp_path: Path) -> None:
    # The tracker's own TMPDIR: other test runs on this machine create such folders in /tmp too.
    tmp = tmp_path
    before = set(tmp.glob("cascade-tracker-files-*"))
    t = start(env={"TMPDIR": str(tmp_path)})
    try:
        assert upload(t, cascade_bytes(12), token=None).status_code == 201  # no --api-token: uploads are open
        created = set(tmp.glob("cascade-tracker-files-*")) - before
        assert len(created) == 1
        (folder,) = created
        assert [p.name for p in folder.iterdir()] == [hashlib.sha256(cascade_bytes(12)).hexdigest() + ".cascade"]
    finally:
        assert t.proc.stop() == 0
    assert not folder.exists()
    assert "Traceback" not in t.proc.stderr


@pytest.mark.process
def test_api_token_needs_http_port() -> None:
    proc = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--api-token", "x"])
    try:
        assert proc.wait(15) == 2  # bad usage
        lines = proc.stderr.strip().splitlines()
        assert lines == ["tracker: error: --api-token needs --http-port"]
    finally:
        proc.stop()


# --- timeouts, with the server in this process and short limits -----------------


@pytest.fixture
def quick_server(tmp_path: Path) -> Iterator[TrackerHttpServer]:
    config = HttpConfig(host="127.0.0.1", port=0, header_timeout=0.6, read_timeout=0.3)
    server = TrackerHttpServer(SwarmRegistry(), CascadeStore(tmp_path / "files"), config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def closed_within(sock: socket.socket, seconds: float, trickle: bool) -> float:
    """Seconds until the server closes ``sock``; sends a header byte every 0.05 s if ``trickle``."""
    started = time.monotonic()
    sock.setblocking(False)
    sock.sendall(b"GET /healthz HTTP/1.0\r\n")
    while time.monotonic() - started < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        if trickle:
            try:
                sock.send(b"X")
            except OSError:
                return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"still open after {seconds} s")


def address_of(server: TrackerHttpServer) -> tuple[str, int]:
    host, port = server.server_address[:2]
    return str(host), int(port)


@pytest.mark.loopback
def test_a_silent_client_is_dropped_after_the_read_timeout(quick_server: TrackerHttpServer) -> None:
    with socket.create_connection(address_of(quick_server), timeout=5) as s:
        closed_within(s, 3.0, trickle=False)  # raises if the server still holds it after 3 s


@pytest.mark.loopback
def test_a_trickling_client_is_cut_at_the_deadline(quick_server: TrackerHttpServer) -> None:
    with socket.create_connection(address_of(quick_server), timeout=5) as s:
        closed_within(s, 3.0, trickle=True)  # a byte every 0.05 s does not keep it open past the deadline
    r = requests.get(f"http://127.0.0.1:{quick_server.address[1]}/healthz", timeout=5)
    assert r.status_code == 200


@pytest.mark.process
def test_query_string_flood_is_400(tracker: Tracker) -> None:
    query = "&".join(f"f{i}=1" for i in range(50))
    r = requests.put(
        f"{tracker.url}/api/v1/cascades?{query}", data=b"x", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )
    assert_error(r, 400, "query")


@pytest.mark.process
def test_a_client_resetting_mid_request_is_no_traceback(tracker: Tracker) -> None:
    partials = [b"GET /healthz HTTP/1.0\r\nHost: x", b"PUT /api/v1/cascades HTTP/1.0\r\nContent-Length: 9000\r\n\r\nab"]
    for partial in partials:
        s = socket.create_connection(("127.0.0.1", tracker.http), timeout=5)
        s.sendall(partial)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # an RST, not a FIN
    assert requests.get(f"{tracker.url}/healthz", timeout=5).status_code == 200
    deadline = time.monotonic() + 5
    while True:
        text = requests.get(f"{tracker.url}/metrics", timeout=5).text
        if "http_connection_lost" in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert metric(text, "cascade_tracker_errors_total", kind="http_connection_lost") >= 1
    assert "Traceback" not in tracker.proc.stderr


@pytest.mark.process
def test_metrics_count_completions_and_show_the_busiest_swarms(tracker: Tracker) -> None:
    before = metric(requests.get(f"{tracker.url}/metrics", timeout=5).text, "cascade_tracker_completions_total")
    h = unique_hash()
    fetcher = {"cascade_hash": h, "ip": "10.5.0.1", "port": 9301}
    post_announce(tracker, {**fetcher, "action": "list"})
    post_announce(tracker, {**fetcher, "action": "subscribe"})  # it finished its download: one completion
    post_announce(tracker, {**fetcher, "action": "subscribe"})  # already a seeder: no second one
    post_announce(
        tracker, {"cascade_hash": h, "ip": "10.5.0.2", "port": 1, "action": "subscribe"}
    )  # seeder from the start
    for i in range(30):  # more peers than any other swarm of this module, so it is among the busiest
        post_announce(tracker, {"cascade_hash": h, "ip": f"10.5.1.{i + 1}", "port": 1, "action": "list"})
    text = requests.get(f"{tracker.url}/metrics", timeout=5).text
    assert metric(text, "cascade_tracker_completions_total") - before == 1
    assert metric(text, "cascade_tracker_swarm_seeders", cascade_hash=h) == 2
    assert metric(text, "cascade_tracker_swarm_peers", cascade_hash=h) == 32


@pytest.mark.loopback
def test_past_max_connections_the_oldest_idle_one_makes_room(tmp_path: Path) -> None:
    config = HttpConfig(host="127.0.0.1", port=0, max_connections=10)
    server = TrackerHttpServer(SwarmRegistry(), CascadeStore(tmp_path / "files"), config)
    server.start()
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(address_of(server), timeout=5) for _ in range(15)]
        r = requests.get(f"http://127.0.0.1:{server.address[1]}/healthz", timeout=5)
        assert r.status_code == 200
        deadline = time.monotonic() + 5
        while server.registry.counters().errors.get("http_evicted", 0) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.registry.counters().errors.get("http_evicted", 0) >= 6
        assert server.connection_count() <= 10
        # The first ones in were the ones closed.
        idle[0].settimeout(5)
        assert idle[0].recv(10) == b""
    finally:
        for s in idle:
            s.close()
        server.stop()
