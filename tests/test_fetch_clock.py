"""The fetcher's timeouts on virtual time: a minute of waiting for peers, checked without waiting it.

Real threads and a real output file, no server: the coordinator and the
hasher wait through a :class:`peer.clock.VirtualClock`, which moves on by
each wait's timeout at once.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.errors import CascadeTimeout
from peer.clock import VirtualClock
from peer.common import DEFAULT_ANNOUNCE_INTERVAL
from peer.fetcher import Fetcher, FetchPolicy, PeerInfo
from peer.localdata import check_data
from peer.storage import BlockStore
from tests.doubles import make_file

pytestmark = pytest.mark.loopback


def run_on_virtual_time(tmp_path: Path, listed: list[PeerInfo]) -> tuple[str, float, int]:
    """Fetch with nobody to serve; returns the stall line, the virtual seconds it took and the relists."""
    _, cf = make_file(tmp_path, "d.bin", 64 * 1024, 4096)
    out = tmp_path / "out"
    store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
    clock = VirtualClock()
    relists = 0

    def list_peers() -> list[PeerInfo]:
        nonlocal relists
        relists += 1
        return listed

    try:
        fetcher = Fetcher(store, list_peers, policy=FetchPolicy(), clock=clock)
        started = clock.now()
        with pytest.raises(CascadeTimeout) as info:
            fetcher.run()
        return str(info.value), clock.now() - started, relists
    finally:
        store.close()


@pytest.fixture
def refused() -> Iterator[list[PeerInfo]]:
    """Three addresses on 127.0.0.1 that are bound but not listening: every connect is refused."""
    socks = [socket.socket() for _ in range(3)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        yield [("127.0.0.1", s.getsockname()[1], False) for s in socks]
    finally:
        for s in socks:
            s.close()


STALL = FetchPolicy().stall_timeout


def test_no_peers_stalls_after_the_stall_timeout_of_virtual_time(tmp_path: Path) -> None:
    message, waited, relists = run_on_virtual_time(tmp_path, [])
    assert message == f"no peers for this file within {STALL:g} s"
    assert STALL < waited < STALL + 1
    # Hungry relists back off to relist_min / 2 while nothing downloads: about 4 a second, not 100.
    assert STALL < relists < STALL * 7


def test_refused_peers_stall_with_their_own_line(tmp_path: Path, refused: list[PeerInfo]) -> None:
    message, waited, _ = run_on_virtual_time(tmp_path, refused)
    assert message == f"none of 3 peers could be reached within {STALL:g} s"
    assert STALL < waited < STALL + 1


def test_a_fetch_outlasts_a_seeders_announce_interval_and_a_listing_gap() -> None:
    """After a tracker restart without --state, each seeder is listed again only at its next announce."""
    policy = FetchPolicy()
    assert policy.stall_timeout > DEFAULT_ANNOUNCE_INTERVAL + policy.relist_max
