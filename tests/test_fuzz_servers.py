"""Property-based fuzzing of the request parsers of the block server and the tracker (issue 9, section 7).

Each server runs in this process on 127.0.0.1 (port 0) for the whole module;
hypothesis sends it random bytes and damaged requests over real sockets. The
contract, for every input:

- the answer is well-formed protocol (or nothing, for an incomplete request),
  never a traceback: no ERROR record is logged by the server (its
  ``log.exception`` for an unexpected error), and the HTTP API never answers 500;
- the server goes on serving a correct request afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.errors import CascadeError
from cascade.metafile import CascadeFile
from cascade.wire import (
    BLOCK_MAGIC,
    KEEPOPEN,
    TRACKER_REQUEST_SIZE,
    BlockResponse,
    BlockResponseReader,
    PeerList,
    TrackerCommand,
    TrackerError,
    TrackerRequest,
    decode_tracker_reply,
)
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from tests.doubles import make_file
from tracker.cascade_store import CascadeStore
from tracker.http_api import HttpConfig, TrackerHttpServer
from tracker.server import ServerConfig, TrackerServer
from tracker.swarms import SwarmRegistry

pytestmark = pytest.mark.loopback

# Arbitrary: each example is a connection or two, a few ms; this keeps the module within seconds.
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
TIMEOUT = 5.0  # seconds any single read may take before the test fails; far above what loopback needs


class _Errors(logging.Handler):
    """Collects ERROR records: the servers log an unexpected exception with ``log.exception``."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def errors_logged(*names: str) -> Iterator[_Errors]:
    handler = _Errors()
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset ends it too: what came before counts)."""
    sock.settimeout(TIMEOUT)
    got = bytearray()
    for _ in range(10_000):  # bounded; each pass reads at least one byte or ends
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return bytes(got)


def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, and return the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already answered and closed: what it sent is still readable
        return read_to_eof(sock)


# --- the block server ----------------------------------------------------------------


@dataclass
class Seeder:
    server: BlockServer
    cf: CascadeFile
    blocks: list[bytes]
    errors: _Errors

    @property
    def port(self) -> int:
        return self.server.address[1]


@pytest.fixture(scope="module")
def seeder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeder]:
    folder = tmp_path_factory.mktemp("fuzz-seed")
    # 5 blocks of 1000 bytes and a short last one: small enough that every reply fits the read size.
    _, cf = make_file(folder, "d.bin", 5500, 1000, seed=3)
    data = (folder / "d.bin").read_bytes()
    blocks = [data[cf.block_offset(i) : cf.block_offset(i) + cf.block_length(i)] for i in range(cf.block_count)]
    store = BlockStore.open_for_seeding(cf, folder / "d.bin")
    server = BlockServer("127.0.0.1", 0, BlockServerConfig(max_workers=2, idle_timeout=2.0))
    server.add_store(store)
    with errors_logged("peer.server") as errors:
        server.start()
        try:
            yield Seeder(server, cf, blocks, errors)
        finally:
            server.stop()
            store.close()


def block_requests(cascade_hash: bytes, count: int) -> st.SearchStrategy[bytes]:
    """64-byte requests built field by field, with values at and past every edge."""
    index = st.one_of(st.sampled_from([0, count - 1, count, count + 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
    return st.builds(
        lambda magic, marker, reserved, i, h: magic + marker + reserved + i.to_bytes(8, "big") + h,
        st.one_of(st.just(BLOCK_MAGIC), st.binary(min_size=8, max_size=8)),
        st.one_of(st.just(KEEPOPEN), st.just(bytes(8)), st.binary(min_size=8, max_size=8)),
        st.one_of(st.just(bytes(8)), st.binary(min_size=8, max_size=8)),
        index,
        st.one_of(st.just(cascade_hash), st.binary(min_size=32, max_size=32)),
    )


def check_block_replies(seeder: Seeder, answer: bytes, payload: bytes) -> None:
    """Every reply in ``answer`` is a whole, valid block response; data replies carry a real block."""
    reader = BlockResponseReader(64 << 10)
    reader.feed(answer)
    replies: list[BlockResponse] = []
    for _ in range(len(payload) // 64 + 2):
        try:
            reply = reader.next()
        except CascadeError as exc:
            raise AssertionError(f"malformed reply to {payload!r}: {exc}") from exc
        if reply is None:
            break
        replies.append(reply)
    assert not reader.pending, f"a reply was cut short: {answer!r}"
    assert len(replies) <= len(payload) // 64 + 1
    for reply in replies:
        assert 0 <= reply.status <= 4, reply
        if reply.status == 0:
            assert reply.body in seeder.blocks
        else:
            assert reply.message


def assert_still_serving(seeder: Seeder) -> None:
    request = BLOCK_MAGIC + bytes(16) + (1).to_bytes(8, "big") + seeder.cf.cascade_hash
    answer = exchange(seeder.port, request)
    assert BlockResponse.decode(answer) == BlockResponse(0, seeder.blocks[1])
    assert not seeder.errors.records, seeder.errors.records[0].getMessage()


@st.composite
def block_payloads(draw: st.DrawFn, cascade_hash: bytes, count: int) -> bytes:
    parts = draw(st.lists(st.one_of(block_requests(cascade_hash, count), st.binary(max_size=80)), max_size=4))
    payload = b"".join(parts)
    return payload[: draw(st.integers(0, len(payload)))] if draw(st.booleans()) else payload


def test_block_server_takes_any_bytes(seeder: Seeder) -> None:
    @FUZZ
    @given(block_payloads(seeder.cf.cascade_hash, seeder.cf.block_count))
    def one(payload: bytes) -> None:
        check_block_replies(seeder, exchange(seeder.port, payload), payload)

    one()
    assert_still_serving(seeder)


def test_block_server_takes_any_request_one_byte_at_a_time(seeder: Seeder) -> None:
    @settings(FUZZ, max_examples=20)
    @given(block_requests(seeder.cf.cascade_hash, seeder.cf.block_count))
    def one(request: bytes) -> None:
        with socket.create_connection(("127.0.0.1", seeder.port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for i in range(len(request)):
                    sock.sendall(request[i : i + 1])
                sock.shutdown(socket.SHUT_WR)
            check_block_replies(seeder, read_to_eof(sock), request)

    one()
    assert_still_serving(seeder)


# --- the tracker: binary protocol ------------------------------------------------------


@pytest.fixture(scope="module")
def tracker() -> Iterator[tuple[TrackerServer, int, _Errors]]:
    server = TrackerServer(SwarmRegistry(), ServerConfig(host="127.0.0.1", port=0, workers=1, read_timeout=1.0))
    with errors_logged("tracker", "tracker.server", "tracker.swarms") as errors:
        _, port = server.bind()
        server.start()
        try:
            yield server, port, errors
        finally:
            server.shutdown()


valid_tracker_requests = st.builds(
    lambda c, h, p: TrackerRequest(c, h, "127.0.0.1", p).encode(),
    st.sampled_from(list(TrackerCommand)),
    st.binary(min_size=32, max_size=32),
    st.integers(0, 0xFFFF),
)


@st.composite
def tracker_payloads(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.one_of(valid_tracker_requests, st.binary(max_size=120))))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def test_tracker_takes_any_bytes(tracker: tuple[TrackerServer, int, _Errors]) -> None:
    server, port, errors = tracker

    @FUZZ
    @given(tracker_payloads())
    def one(payload: bytes) -> None:
        answer = exchange(port, payload)
        if not answer:
            return
        try:
            reply = decode_tracker_reply(answer)
        except CascadeError as exc:
            raise AssertionError(f"malformed reply to {payload!r}: {answer!r}") from exc
        if len(payload) < TRACKER_REQUEST_SIZE:
            assert isinstance(reply, TrackerError)

    one()
    assert server.alive
    assert not errors.records, errors.records[0].getMessage()
    request = TrackerRequest(TrackerCommand.LIST, bytes(32), "127.0.0.1", 0).encode()
    assert isinstance(decode_tracker_reply(exchange(port, request)), PeerList)


# --- the tracker: HTTP API bodies and path parameters ------------------------------------


@pytest.fixture(scope="module")
def http_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = HttpConfig(host="127.0.0.1", port=0)
    server = TrackerHttpServer(SwarmRegistry(), CascadeStore(tmp_path_factory.mktemp("http-files")), config)
    server.start()
    try:
        host, port = server.address
        yield f"http://{host}:{port}"
    finally:
        server.stop()


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False),
        st.text(max_size=70),
        st.binary(min_size=32, max_size=32).map(bytes.hex),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
announce_docs = st.fixed_dictionaries(
    {},
    optional={
        "cascade_hash": json_values,
        "port": st.one_of(st.integers(-1, 70000), json_values),
        "ip": st.one_of(st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "1.2.3", "999.0.0.1"]), json_values),
        "action": st.one_of(st.sampled_from(["list", "subscribe"]), json_values),
    },
)
bodies = st.one_of(
    announce_docs.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100),
)


def assert_json_answer(r: requests.Response) -> None:
    assert r.status_code != 500, r.text
    doc = r.json()
    assert isinstance(doc, dict)
    if r.status_code >= 400:
        assert doc.get("error"), doc


def test_http_announce_takes_any_body(http_api: str) -> None:
    with requests.Session() as session:

        @FUZZ
        @given(bodies)
        def one(body: bytes) -> None:
            r = session.post(f"{http_api}/api/v1/announce", data=body, timeout=TIMEOUT)
            assert_json_answer(r)

        one()


def test_http_path_parameters_take_any_text(http_api: str) -> None:
    with requests.Session() as session:

        @settings(FUZZ, max_examples=60)
        @given(st.text(max_size=80))
        def one(text: str) -> None:
            quoted = urllib.parse.quote(text, safe="")
            for path in (f"/api/v1/swarms/{quoted}/peers", f"/cascades/{quoted}.cascade"):
                r = session.get(f"{http_api}{path}", timeout=TIMEOUT)
                if r.status_code != 200 or path.startswith("/api"):
                    assert_json_answer(r)

        one()
