"""Dead and slow peers cannot starve a fetch: the downloader in-process, beside peers that cannot help.

Dead peers are loopback addresses that refuse connects and listeners whose
backlog is full (connects hang). Tricklers answer with a valid header and
then one byte a second. Each fetch's own stall timeout bounds the test: it
fails if the fetch gives up.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from cascade.errors import CascadeTimeout
from peer.fetcher import Fetcher, FetchPolicy, PeerInfo
from peer.localdata import check_data
from peer.storage import BlockStore
from tests.doubles import (
    DoubleServer,
    SlowServer,
    TrickleServer,
    fetch_complete,
    hanging_addresses,
    honest_seeder,
    make_file,
    refused_addresses,
    sha256_file,
    started,
)

pytestmark = pytest.mark.loopback

# The bound of every fetch here: far above what a fetch needs, so only a fetch that gives up fails.
BOUND = FetchPolicy(stall_timeout=20.0)


def like_a_tracker(records: list[PeerInfo], per_reply: int = 50) -> Callable[[], list[PeerInfo]]:
    """Replies the way the tracker does: a window of ``per_reply`` at a random start of a shuffled list."""
    shuffled = list(records)
    random.shuffle(shuffled)

    def list_peers() -> list[PeerInfo]:
        start = random.randrange(len(shuffled))
        return (shuffled + shuffled)[start : start + per_reply]

    return list_peers


def test_thousands_of_dead_peers_listed_by_a_tracker(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 300_000, 16 << 10)
    with contextlib.ExitStack() as stack:
        dead = refused_addresses(stack, 1960) + hanging_addresses(stack, 40)
        honest = stack.enter_context(honest_seeder(cf, tmp_path / "d.bin", max_workers=2)).address
        records: list[PeerInfo] = [(ip, port, True, 1000) for ip, port in [*dead, honest]]
        _, result = fetch_complete(cf, tmp_path / "out", like_a_tracker(records), BOUND)
    assert result.sources == {f"{honest[0]}:{honest[1]}": cf.block_count}


def test_a_huge_tracker_reply_is_sampled_and_memory_stays_bounded(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 300_000, 16 << 10)
    with contextlib.ExitStack() as stack:
        dead = refused_addresses(stack, 12_000, ports=16) + hanging_addresses(stack, 20)
        honest = stack.enter_context(honest_seeder(cf, tmp_path / "d.bin", max_workers=2)).address
        # The same reply every time, the honest peer last: only sampling at random finds it.
        records: list[PeerInfo] = [(ip, port, True, 1000) for ip, port in [*dead, honest]]
        policy = FetchPolicy(stall_timeout=20.0, max_candidates=1000, max_dead=5000)
        store = BlockStore.open_for_fetching(cf, tmp_path / "out", check_data(tmp_path / "out", cf))
        fetcher = Fetcher(store, lambda: records, policy=policy)
        try:
            assert fetcher.run().complete
            assert len(fetcher.planner.peers) <= 1000 and len(fetcher.planner.dead) <= 5000
        finally:
            store.close()
    assert sha256_file(tmp_path / "out") == cf.file_hash


def test_tricklers_cannot_hold_every_slot(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 300_000, 16 << 10)
    with contextlib.ExitStack() as stack:
        tricklers = started(stack, (TrickleServer(cf) for _ in range(8)))
        honest = stack.enter_context(honest_seeder(cf, tmp_path / "d.bin", max_workers=2)).address
        # The tricklers were seen last: they are tried first and take every slot.
        peers: list[PeerInfo] = [(*t.address, True, 5000) for t in tricklers]
        peers.append((*honest, True, 1000))
        _, result = fetch_complete(cf, tmp_path / "out", lambda: peers, FetchPolicy(stall_timeout=20.0, max_peers=8))
    assert result.sources == {f"{honest[0]}:{honest[1]}": cf.block_count}
    assert sum(t.connections for t in tricklers) >= 1  # they were in the game


def test_a_far_slower_peer_gives_its_slot_to_an_untried_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, cf = make_file(tmp_path, "d.bin", 1 << 20, 4096)
    with contextlib.ExitStack() as stack:
        slow = SlowServer(cf, 0.5, tmp_path / "d.bin").start()  # a block each half second
        stack.callback(slow.stop)
        fast = stack.enter_context(honest_seeder(cf, tmp_path / "d.bin", max_workers=2)).address
        spare = stack.enter_context(honest_seeder(cf, tmp_path / "d.bin", max_workers=2)).address
        # Two slots, taken by the recently seen slow and fast peers; the spare one waits untried.
        peers: list[PeerInfo] = [(*slow.address, True, 5000), (*fast, True, 5000), (*spare, True, 1000)]
        # The rate limit makes the download last long enough (about 4 s) to judge the slow peer.
        policy = FetchPolicy(stall_timeout=20.0, max_peers=2, max_download_rate=256 << 10)
        caplog.set_level(logging.DEBUG, logger="peer.fetch")
        _, result = fetch_complete(cf, tmp_path / "out", lambda: peers, policy)
    assert any(
        f"peer {slow.address[0]}:{slow.address[1]}" in r.getMessage() and "untried" in r.getMessage()
        for r in caplog.records
    ), "the slow peer was never evicted"
    assert f"{spare[0]}:{spare[1]}" in result.sources


def test_recently_seen_peers_are_tried_first(tmp_path: Path) -> None:
    """With a single slot, the peer seen last is the first one tried: the stale silent ones never are."""
    _, cf = make_file(tmp_path, "d.bin", 100_000, 16 << 10)
    with contextlib.ExitStack() as stack:
        stale = started(stack, (DoubleServer("silent", cf, tmp_path / "d.bin") for _ in range(4)))
        honest = stack.enter_context(honest_seeder(cf, tmp_path / "d.bin", max_workers=2)).address
        peers: list[PeerInfo] = [(*s.address, True, 1000) for s in stale]
        peers.append((*honest, True, 5000))
        _, result = fetch_complete(cf, tmp_path / "out", lambda: peers, FetchPolicy(stall_timeout=20.0, max_peers=1))
    assert result.sources == {f"{honest[0]}:{honest[1]}": cf.block_count}
    assert [s.requests for s in stale] == [0, 0, 0, 0]


def test_when_the_only_peer_is_banned_the_error_says_why(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 50_000, 4096)
    with contextlib.ExitStack() as stack:
        bad = DoubleServer("corrupt", cf, tmp_path / "d.bin").start()
        stack.callback(bad.stop)
        peers: list[PeerInfo] = [(*bad.address, True)]
        store = BlockStore.open_for_fetching(cf, tmp_path / "out", check_data(tmp_path / "out", cf))
        stack.callback(store.close)
        fetcher = Fetcher(store, lambda: peers, policy=FetchPolicy(stall_timeout=1.0, backoff_min=0.05))
        with pytest.raises(CascadeTimeout, match=r"its only peer was banned: 127\.0\.0\.1:\d+ sent a corrupt block"):
            fetcher.run()


def test_download_rate_limit(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 320 << 10, 16 << 10)
    with honest_seeder(cf, tmp_path / "d.bin", max_workers=2) as server:
        peers: list[PeerInfo] = [(*server.address, True)]
        policy = FetchPolicy(stall_timeout=20.0, max_download_rate=128 << 10)
        _, result = fetch_complete(cf, tmp_path / "out", lambda: peers, policy)
    # A lower bound only (a slow machine cannot fail it): 320 KiB less a 64 KiB burst at 128 KiB/s.
    assert result.seconds >= 1.9
