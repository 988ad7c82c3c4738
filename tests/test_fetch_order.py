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
from tests.doubles import fetch_complete, honest_seeder, make_file

FAST = FetchPolicy(first_response_timeout=1.0, stall_timeout=10.0, backoff_min=0.05)


@contextlib.contextmanager
def seeders(cf: CascadeFile, data: Path, n: int) -> Iterator[list[tuple[str, int, bool]]]:
    """``n`` real block servers of ``data`` on 127.0.0.1, as tracker records; stopped on leaving."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(honest_seeder(cf, data, max_workers=2)) for _ in range(n)]
        yield [("127.0.0.1", server.address[1], True) for server in servers]


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
    return fetch_complete(cf, out, lambda: peers, FAST, add=peers)[0]


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
