"""A seeder under attack or losing its data: connection floods, slowloris, data files changed under it.

In-process :class:`BlockServer` on 127.0.0.1 with small limits, so a flood of a
few dozen connections shows what 1,000 would (``python -m bench.faults --only flood``
runs the full-size one against ``peer seed``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peer.datawatch import DataWatcher, pass_interval
from peer.localdata import check_data
from peer.server import BlockServer
from peer.storage import BlockStore, disk_signature
from tests.test_peer_server import (
    TIMEOUT,
    Sample,
    block,
    closed_by_server,
    connect,
    make_sample,
    read_response,
    req,
    request,
    serving,
    wait_until,
)

pytestmark = pytest.mark.loopback


def connect_from(source: str, port: int) -> socket.socket:
    """A connection from another loopback address (all of 127.0.0.0/8 is local on Linux)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


@pytest.fixture
def sample(tmp_path: Path) -> Sample:
    return make_sample(tmp_path, "flood.bin", 16 * 1024 + 7, 1024, seed=21)


# --- connection floods ------------------------------------------------------------------


@pytest.fixture
def flood() -> Iterator[list[socket.socket]]:
    """The flood's client sockets, which a test appends to; all closed at the end."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_idle_and_slowloris_flood_does_not_lock_out_real_requests(sample: Sample, flood: list[socket.socket]) -> None:
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
    with serving(store, max_workers=2, max_connections=16) as server:
        port = server.address[1]
        for n in range(48):  # three times the limit: idle ones and half-sent requests
            sock = connect(port)
            if n % 3 == 0:
                sock.sendall(req(1, sample.cf.cascade_hash)[:20])
            flood.append(sock)
        for i in range(sample.cf.block_count):
            with connect(port) as sock:
                sock.sendall(req(i, sample.cf.cascade_hash))
                assert read_response(sock) == (0, block(sample.data, sample.cf, i))
        # The oldest flood connections made room; the server stayed within its limit.
        assert closed_by_server(flood[0])
        assert server.evicted >= 48 - 16
        assert len(server._conns) <= 16


def test_a_flood_beyond_the_default_limits_does_not_lock_out_real_requests(
    sample: Sample, flood: list[socket.socket]
) -> None:
    """600 idle and 50 slowloris connections against the limits ``peer seed`` runs with (512 at once)."""
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
    with serving(store) as server:
        port = server.address[1]
        # With select() (CASCADE_PORTABLE) the cap is lower and this process must keep its
        # descriptor numbers, client and server side, below 1024: fewer idle ones, still over the cap.
        idle = 600 if not server.features.select_only else server.max_connections - 20
        for n in range(idle + 50):
            sock = connect(port)
            if n >= idle:
                sock.sendall(req(0, sample.cf.cascade_hash)[:3])  # a request begun and never finished
            flood.append(sock)
        for i in (0, 5, 15):
            status, body, _ = request(port, req(i, sample.cf.cascade_hash))
            assert (status, body) == (0, block(sample.data, sample.cf, i)), f"block {i} was not served"


def test_a_kept_open_client_survives_a_flood_from_another_address(sample: Sample, flood: list[socket.socket]) -> None:
    """A host holding more than half the slots loses its own connections first."""
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
    with serving(store, max_workers=2, max_connections=8) as server:
        port = server.address[1]
        with connect(port) as user:  # from 127.0.0.1, and older than every flood connection
            user.sendall(req(0, sample.cf.cascade_hash, keep=True))
            assert read_response(user)[0] == 0
            for _ in range(30):
                flood.append(connect_from("127.0.0.2", port))
            wait_until(lambda: server.evicted >= 30 - 7, "the flood to be accepted")
            user.sendall(req(1, sample.cf.cascade_hash, keep=True))
            assert read_response(user) == (0, block(sample.data, sample.cf, 1))


def test_a_request_trickled_byte_by_byte_is_cut_off_at_the_header_timeout(sample: Sample) -> None:
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
    with serving(store, max_workers=2, header_timeout=0.3) as server:
        port = server.address[1]
        raw = req(0, sample.cf.cascade_hash)
        closed = False
        with connect(port) as sock:
            pause = threading.Event()
            for n in range(len(raw)):  # one byte every 50 ms would take 3.2 s: never finishes
                try:
                    sock.sendall(raw[n : n + 1])
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                pause.wait(0.05)
            assert closed or closed_by_server(sock)
        # A whole request right away is answered as ever.
        with connect(port) as sock:
            sock.sendall(raw)
            assert read_response(sock)[0] == 0


def test_a_kept_open_connection_may_idle_longer_than_the_header_timeout(sample: Sample) -> None:
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
    with (
        serving(store, max_workers=2, header_timeout=0.2) as server,
        connect(server.address[1]) as sock,
    ):
        sock.sendall(req(0, sample.cf.cascade_hash, keep=True))
        assert read_response(sock)[0] == 0
        threading.Event().wait(0.6)  # quiet between requests: idle_timeout (30 s) applies, not 0.2 s
        sock.sendall(req(1, sample.cf.cascade_hash, keep=True))
        assert read_response(sock) == (0, block(sample.data, sample.cf, 1))


# --- a data file that changes under the seeder ---------------------------------------------


@contextlib.contextmanager
def watched(sample: Sample) -> Iterator[tuple[BlockServer, BlockStore, DataWatcher, list[tuple[int, int]]]]:
    """A served store and a watcher whose checks the test runs itself (``check_once``)."""
    seen = disk_signature(sample.data_path)
    check = check_data(sample.data_path, sample.cf, whole_file=False)
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path, check)
    changes: list[tuple[int, int]] = []
    watcher = DataWatcher(on_change=lambda _s, before, after: changes.append((before, after)))
    watcher.add(store, seen)
    with serving(store, max_workers=2) as server:
        yield server, store, watcher, changes


def status(port: int, index: int, sample: Sample) -> int:
    with connect(port) as sock:
        sock.sendall(req(index, sample.cf.cascade_hash))
        return read_response(sock)[0]


def test_a_block_changed_in_place_is_no_longer_served(sample: Sample, caplog: pytest.LogCaptureFixture) -> None:
    with watched(sample) as (server, store, watcher, changes):
        port = server.address[1]
        watcher.check_once()
        assert changes == []  # nothing changed: nothing re-verified
        with open(sample.data_path, "r+b") as f:
            f.seek(3 * 1024 + 5)
            f.write(b"X")
        os.utime(sample.data_path, ns=(1, 1))  # a write within the same clock tick must still be seen
        with caplog.at_level(logging.WARNING, logger="peer"):
            watcher.check_once()
        assert changes == [(17, 16)]
        assert [r.getMessage() for r in caplog.records] == [
            f"{sample.data_path}: data file was modified; 16/17 blocks verified; 1 no longer match and are not served"
        ]
        assert status(port, 3, sample) == 2
        assert status(port, 4, sample) == 0
        assert store.verified_count == 16


def test_a_shrunk_file_serves_only_what_is_left(sample: Sample, caplog: pytest.LogCaptureFixture) -> None:
    with watched(sample) as (server, _store, watcher, changes):
        port = server.address[1]
        os.truncate(sample.data_path, 10 * 1024 + 100)
        with caplog.at_level(logging.WARNING, logger="peer"):
            watcher.check_once()
        assert changes == [(17, 10)]
        assert "changed size (16391 -> 10340 bytes); 10/17 blocks verified; 7 no longer match" in caplog.text
        assert [status(port, i, sample) for i in (0, 9, 10, 16)] == [0, 0, 2, 2]


def test_a_replaced_file_is_served_from_the_new_file(sample: Sample, caplog: pytest.LogCaptureFixture) -> None:
    with watched(sample) as (server, _store, watcher, changes):
        port = server.address[1]
        new = bytearray(sample.data)
        new[0] ^= 1  # block 0 differs, the rest is the same
        tmp = sample.data_path.with_suffix(".new")
        tmp.write_bytes(new)
        os.replace(tmp, sample.data_path)
        with caplog.at_level(logging.WARNING, logger="peer"):
            watcher.check_once()
        assert changes == [(17, 16)]
        assert "data file was replaced; 16/17 blocks verified" in caplog.text
        assert status(port, 0, sample) == 2
        with connect(port) as sock:
            sock.sendall(req(5, sample.cf.cascade_hash))
            assert read_response(sock) == (0, block(sample.data, sample.cf, 5))


def test_a_deleted_file_is_no_longer_served_until_it_is_back(sample: Sample, caplog: pytest.LogCaptureFixture) -> None:
    with watched(sample) as (server, _store, watcher, changes):
        port = server.address[1]
        os.unlink(sample.data_path)
        with caplog.at_level(logging.WARNING, logger="peer"):
            watcher.check_once()
            watcher.check_once()  # still gone: no second line
        assert changes == [(17, 0)]
        assert [r.getMessage() for r in caplog.records] == [
            f"{sample.data_path}: the data file is gone; no longer serving its blocks"
        ]
        assert status(port, 0, sample) == 2
        caplog.clear()
        sample.data_path.write_bytes(sample.data)
        with caplog.at_level(logging.WARNING, logger="peer"):
            watcher.check_once()
        assert changes[-1] == (0, 17)
        assert "data file is back; 17/17 blocks verified" in caplog.text
        assert status(port, 16, sample) == 0


def test_the_watcher_thread_notices_a_change_by_itself(sample: Sample) -> None:
    with watched(sample) as (server, _store, _unused, _changes):
        store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
        changed = threading.Event()
        watcher = DataWatcher(interval=0.05, on_change=lambda *_: changed.set())
        watcher.add(store, disk_signature(sample.data_path))
        server.add_store(store)
        watcher.start()
        try:
            os.truncate(sample.data_path, 1024)
            assert changed.wait(TIMEOUT)
            assert status(server.address[1], 1, sample) == 2
        finally:
            watcher.stop()
            store.close()


def test_requests_wake_the_watcher_when_the_file_changed(sample: Sample, caplog: pytest.LogCaptureFixture) -> None:
    """The server's fstat every few requests notices an edit long before the watcher's next look."""
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
    watcher = DataWatcher(interval=3600.0)
    watcher.add(store, disk_signature(sample.data_path))
    with serving(store, max_workers=2) as server:
        server.add_store(store, watcher.wake)
        watcher.start()
        try:
            port = server.address[1]
            with open(sample.data_path, "r+b") as f:
                f.seek(2 * 1024)
                f.write(b"changed")
            os.utime(sample.data_path, ns=(1, 1))
            with caplog.at_level(logging.WARNING, logger="peer"):
                deadline = time.monotonic() + TIMEOUT
                while status(port, 2, sample) == 0:  # every few requests one fstat
                    assert time.monotonic() < deadline, "the edit was never noticed"
                wait_until(lambda: store.verified_count == 16, "re-verification")
            assert status(port, 3, sample) == 0
            assert "data file was modified; 16/17 blocks verified" in caplog.text
        finally:
            watcher.stop()


@pytest.mark.parametrize(
    ("files", "interval", "expected"),
    [(1, 2.0, 2.0), (4000, 2.0, 2.0), (10_000, 2.0, 5.0), (100_000, 2.0, 50.0), (10, 0.05, 0.05)],
)
def test_the_watchers_passes_are_spaced_for_many_files(files: int, interval: float, expected: float) -> None:
    """A seeder of 10,000 members spent 5-9 % of a core on stats at a pass every 2 s."""
    assert pass_interval(files, interval) == expected
