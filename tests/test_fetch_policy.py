"""The fetcher's small decisions about peers, as pure functions: ranking, sampling, fan-out, eviction, blame."""

from __future__ import annotations

import random

import pytest

from peer.planner import (
    FetchPolicy,
    PeerState,
    Session,
    banned_message,
    candidate_rank,
    connect_budget,
    next_hungry_gap,
    pick_evictee,
    sample_best,
)

pytestmark = pytest.mark.unit


def test_good_and_recently_seen_peers_are_tried_first() -> None:
    now = 1_800_000_000
    stale_good = PeerState(("127.0.0.1", 1), good=True, last_seen=now - 3600)
    fresh_good = PeerState(("127.0.0.1", 2), good=True, last_seen=now)
    fresh_plain = PeerState(("127.0.0.1", 3), good=False, last_seen=now)
    failed = PeerState(("127.0.0.1", 4), good=True, last_seen=now, failures=1)
    answered = PeerState(("127.0.0.1", 5), good=False, last_seen=0, answered=True)
    ranked = sorted([failed, fresh_plain, stale_good, fresh_good, answered], key=candidate_rank)
    assert ranked == [answered, fresh_good, stale_good, fresh_plain, failed]


def test_a_huge_reply_is_sampled_best_first_and_differently_each_time() -> None:
    infos = [(("127.0.0.1", port), False, 100, 0) for port in range(1, 10_001)]
    infos[5000] = (("127.0.0.1", 99_999), True, 100, 0)  # the only good one, mid-list
    infos[6000] = (("127.0.0.1", 88_888), True, 100, 1)  # good, but it failed before
    first = sample_best(infos, 50)
    assert len(first) == 50 and first[0][0] == ("127.0.0.1", 99_999)
    assert ("127.0.0.1", 88_888) not in [addr for addr, *_ in first]
    random.seed(1)
    second = sample_best(infos, 50)
    assert set(first) != set(second)  # 49 of 9,999 at random: equal only by a 1e-100 chance
    assert sample_best(infos[:10], 50) == infos[:10]


@pytest.mark.parametrize(
    ("free", "pending", "streak", "expected"),
    [
        (8, 0, 0, 8),  # a healthy swarm: one connect per free slot
        (8, 8, 0, 0),
        (8, 0, 30, 38),  # dead addresses widen the fan-out ...
        (8, 10, 500, 54),  # ... up to the limit of pending connects
        (0, 0, 500, 0),  # no free slot: no connect
    ],
)
def test_connect_budget(free: int, pending: int, streak: int, expected: int) -> None:
    assert connect_budget(free, pending, streak, 64) == expected


def _session(port: int, rate: float, started: float = 0.0) -> Session:
    s = Session(PeerState(("127.0.0.1", port)), started=started)
    s.rate = rate
    return s


def test_a_peer_far_below_the_median_is_evicted() -> None:
    pol = FetchPolicy()
    slow = _session(1, 1_000.0)
    sessions = [slow, _session(2, 5e6), _session(3, 6e6), _session(4, 4e6)]
    assert pick_evictee(sessions, 10.0, pol) is slow
    silent = _session(5, 0.0)
    assert pick_evictee([*sessions, silent], 10.0, pol) is silent


def test_no_eviction_among_equals_too_early_or_alone() -> None:
    pol = FetchPolicy()
    assert pick_evictee([_session(1, 1e6), _session(2, 2e6), _session(3, 1.5e6)], 10.0, pol) is None
    young = _session(1, 1_000.0, started=9.5)
    assert pick_evictee([young, _session(2, 5e6), _session(3, 5e6)], 10.0, pol) is None
    assert pick_evictee([_session(1, 0.0)], 10.0, pol) is None
    assert pick_evictee([_session(1, 0.0), _session(2, 0.0)], 10.0, pol) is None  # nothing measured


def test_a_silent_session_is_judged_only_once_one_block_would_have_been_too_slow() -> None:
    pol = FetchPolicy()
    fast = [_session(2, 1e6), _session(3, 1e6)]  # the bar: 0.125 x 1e6 = 125,000 B/s
    waiting = _session(1, 0.0)
    waiting.outstanding.append(7)
    # A 1 MiB block takes 8.4 s at the bar: until then its silence proves nothing.
    assert pick_evictee([waiting, *fast], 8.0, pol, block_size=1 << 20) is None
    assert pick_evictee([waiting, *fast], 8.5, pol, block_size=1 << 20) is waiting
    assert pick_evictee([waiting, *fast], 8.0, pol, block_size=4096) is waiting


def test_a_super_seeder_or_a_peer_whose_map_is_on_its_way_is_never_evicted() -> None:
    pol = FetchPolicy()
    fast = [_session(2, 1e6), _session(3, 1e6)]
    seeder = _session(1, 1_000.0)
    seeder.peer.holds, seeder.peer.held, seeder.peer.offer = bytearray(b"\1" * 8), 8, bytearray(8)
    assert pick_evictee([seeder, *fast], 10.0, pol) is None
    seeder.peer.offer = None  # a complete peer that does not super-seed is judged like any
    assert pick_evictee([seeder, *fast], 10.0, pol) is seeder
    unmapped = _session(4, 0.0)
    unmapped.peer.maps = True  # it answers maps, and the first of this session has not come
    assert pick_evictee([unmapped, *fast], 10.0, pol) is None
    # A fast super-seeder still sets the median that a slow peer is judged against.
    seeder.peer.offer, seeder.rate = bytearray(8), 1e6
    slow = _session(5, 1_000.0)
    assert pick_evictee([seeder, slow], 10.0, pol) is slow


def test_the_stall_message_blames_banned_peers_only_when_they_were_all_there_was() -> None:
    bad = PeerState(("127.0.0.1", 7), banned=True, ban_reason="sent a corrupt block 3")
    untried = PeerState(("127.0.0.1", 8))
    assert banned_message([bad, untried], "60 s") == (
        "no block arrived for 60 s: its only peer was banned: 127.0.0.1:7 sent a corrupt block 3"
    )
    alive = PeerState(("127.0.0.1", 9), connected_once=True)
    assert banned_message([bad, alive], "60 s") is None
    assert banned_message([untried], "60 s") is None
    many = [PeerState(("127.0.0.1", p), banned=True, ban_reason="sent garbage") for p in range(1, 6)]
    assert "all 5 peers it reached were banned" in (banned_message(many, "1 s") or "")


def test_hungry_relists_back_off_unless_they_bring_new_addresses() -> None:
    pol = FetchPolicy()
    assert next_hungry_gap(0.16, 50, True, pol) == pol.relist_hungry
    assert next_hungry_gap(0.01, 0, False, pol) == 0.02
    assert next_hungry_gap(0.2, 0, False, pol) == pol.relist_min / 2  # nothing downloads: keep looking
    assert next_hungry_gap(10.0, 0, True, pol) == pol.relist_max  # a peer works: spare the tracker
