"""Block order in the downloader: file order unless two peers really answer (the head-of-file race: test_planner)."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.metafile import CascadeFile
from peer.fetcher import Fetcher, FetchPolicy
from peer.localdata import check_data
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from tests.doubles import make_file, sha256_file

FAST = FetchPolicy(first_response_timeout=1.0, stall_timeout=10.0, backoff_min=0.05)


@contextlib.contextmanager
def seeders(cf: CascadeFile, data: Path, n: int) -> Iterator[list[tuple[str, int, bool]]]:
    """``n`` real block servers of ``data`` on 127.0.0.1, as tracker records; stopped on leaving."""
    with contextlib.ExitStack() as stack:
        peers = []
        for _ in range(n):
            store = BlockStore.open_for_seeding(cf, data)
            stack.callback(store.close)
            server = BlockServer("127.0.0.1", 0, BlockServerConfig(max_workers=2))
            server.add_store(store)
            server.start()
            stack.callback(server.stop)
            peers.append(("127.0.0.1", server.address[1], True))
        yield peers


@contextlib.contextmanager
def dead_peers(n: int) -> Iterator[list[tuple[str, int, bool]]]:
    """Addresses the tracker might still list for fetchers that exited: bound, never listening (refused)."""
    with contextlib.ExitStack() as stack:
        peers = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            peers.append(("127.0.0.1", sock.getsockname()[1], False))
        yield peers


def fetch(cf: CascadeFile, out: Path, peers: list[tuple[str, int, bool]]) -> Fetcher:
    store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
    fetcher = Fetcher(store, lambda: peers, policy=FAST)
    try:
        fetcher.add_peers(peers)
        assert fetcher.run().complete
    finally:
        store.close()
    assert sha256_file(out) == cf.file_hash
    return fetcher


@pytest.mark.loopback
def test_dead_peers_listed_beside_one_seeder_keep_file_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, cf = make_file(tmp_path, "d.bin", 1 << 20, 4096)
    data = tmp_path / "d.bin"
    caplog.set_level(logging.DEBUG, logger="peer.fetch")
    with seeders(cf, data, 1) as live, dead_peers(3) as dead:
        fetcher = fetch(cf, tmp_path / "out", live + dead)
    assert fetcher.planner.sequential
    assert "random order" not in caplog.text


@pytest.mark.loopback
def test_two_answering_seeders_switch_to_random_order(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, cf = make_file(tmp_path, "d.bin", 4 << 20, 4096)
    data = tmp_path / "d.bin"
    caplog.set_level(logging.DEBUG, logger="peer.fetch")
    with seeders(cf, data, 2) as live:
        fetcher = fetch(cf, tmp_path / "out", live)
    assert "2 peers answer: blocks in random order" in caplog.text
    assert len(fetcher.partial_result(0).sources) == 2
