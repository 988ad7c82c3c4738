"""CASCADE_PORTABLE=1 really selects the fallbacks, and they serve correctly (over socketpairs).

The whole server and fetcher suites run a second time with the variable set
(scripts/test.sh); these tests pin down that the variable is honoured and test
the pieces a Mac or Windows user relies on: the selectors poller's one-shot
emulation, its cross-thread re-arming, and blocks sent without sendfile.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.wire import PeerList, TrackerCommand, TrackerRequest, decode_tracker_reply
from oscompat import detect
from oscompat.fileio import SEND_CHUNK
from oscompat.poller import IN, SelectorsPoller, make_poller
from peer.localdata import check_data
from peer.server import BlockServer
from peer.storage import BlockStore
from tests.test_peer_server import TIMEOUT, block, make_sample, read_response, req
from tests.test_tracker import H1
from tests.test_tracker_socketpair import read_all
from tracker.server import ServerConfig, TrackerServer
from tracker.swarms import SwarmRegistry

pytestmark = pytest.mark.socketpair


@pytest.fixture
def portable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASCADE_PORTABLE", "1")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def poll_until(poller: SelectorsPoller, fd: int) -> bool:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if any(f == fd for f, _ in poller.poll(0.05)):
            return True
    return False


def test_the_variable_selects_select_and_seek_read(portable: None) -> None:
    features = detect()
    assert features.portable and features.selector_name == "select"
    assert not (features.sendfile or features.positional_io or features.fallocate or features.defer_accept)
    assert isinstance(make_poller(features), SelectorsPoller)


def test_one_shot_fires_once_until_re_armed(portable: None, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    poller = make_poller(detect())
    assert isinstance(poller, SelectorsPoller)
    try:
        poller.register(b.fileno(), IN, oneshot=True)
        a.sendall(b"x")
        assert poll_until(poller, b.fileno())
        assert poller.poll(0.05) == []  # still readable, but it fired: a worker owns it now
        poller.modify(b.fileno(), IN, oneshot=True)
        assert poll_until(poller, b.fileno())
    finally:
        poller.close()


def test_a_re_arm_from_another_thread_wakes_the_poll(portable: None, pair: tuple[socket.socket, socket.socket]) -> None:
    # The server's rule: a worker re-arms a connection while the selector thread sits in
    # select(), then writes to the wake socket, so the next select() call watches it.
    a, b = pair
    wake_r, wake_w = socket.socketpair()
    poller = make_poller(detect())
    assert isinstance(poller, SelectorsPoller)
    polling = threading.Event()
    seen: list[int] = []

    def selector_thread() -> None:
        polling.set()
        deadline = time.monotonic() + TIMEOUT
        while b.fileno() not in seen and time.monotonic() < deadline:
            for fd, _ in poller.poll(TIMEOUT):
                seen.append(fd)
                if fd == wake_r.fileno():
                    wake_r.recv(64)

    try:
        poller.register(wake_r.fileno(), IN)
        a.sendall(b"x")
        t = threading.Thread(target=selector_thread)
        t.start()
        assert polling.wait(TIMEOUT)
        poller.modify(b.fileno(), IN, oneshot=True)  # from this thread, as a worker does
        wake_w.send(b"w")
        t.join(2 * TIMEOUT)
        assert b.fileno() in seen
    finally:
        poller.close()
        wake_r.close()
        wake_w.close()


def test_blocks_go_out_without_sendfile(portable: None, tmp_path: Path) -> None:
    # Blocks larger than the send loop's buffer, and a reader slower than the socketpair's buffer.
    sample = make_sample(tmp_path, "big.bin", 3 * (1 << 20) + 5, 1 << 20)
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path, check_data(sample.data_path, sample.cf))
    server = BlockServer("127.0.0.1", 0)
    try:
        assert server.features.selector_name == "select" and not store.pfile.native
        assert sample.cf.block_size > SEND_CHUNK
        server.add_store(store)
        server.start(listen=False)
        ours, theirs = socket.socketpair()
        with ours:
            ours.settimeout(TIMEOUT)
            server.serve_connection(theirs, "client")
            for i in (0, 3, 1, 3, 2):
                ours.sendall(req(i, sample.cf.cascade_hash, keep=True))
                status, body = read_response(ours)
                assert status == 0 and body == block(sample.data, sample.cf, i)
    finally:
        server.stop()
        store.close()


def test_the_tracker_answers_in_portable_mode(portable: None) -> None:
    server = TrackerServer(SwarmRegistry(seed=1), ServerConfig(host="127.0.0.1", port=0, workers=2))
    assert server.features.selector_name == "select" and server.max_connections <= 400
    server.start()
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(TIMEOUT)
        ours.sendall(TrackerRequest(TrackerCommand.SUBSCRIBE, H1, "10.0.0.1", 6666).encode())
        server.serve_connection(theirs, "127.0.0.1")
        reply = decode_tracker_reply(read_all(ours))
        assert isinstance(reply, PeerList)
    finally:
        ours.close()
        server.shutdown()
