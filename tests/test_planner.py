"""The fetch planner on its own: events in, actions out, on virtual time (no file, socket or thread)."""

from __future__ import annotations

import random

import pytest

from peer.planner import FetchPolicy, PeerAddr, Planner, Session

pytestmark = pytest.mark.unit

T0 = 100.0
BS = 4096


def planner(blocks: int = 64, *, have: bytes = b"", max_sessions: int = 8, **policy: float) -> Planner:
    have_map = bytearray(have.ljust(blocks, b"\0"))
    p = Planner(
        have_map,
        BS,
        FetchPolicy(**policy),  # type: ignore[arg-type]  # test tables pass floats and ints
        random.Random(7),
        max_sessions=max_sessions,
        max_depth=32,
        start=T0,
    )
    p.begin(T0)
    return p


def addr(port: int) -> PeerAddr:
    return ("127.0.0.1", port)


def session(p: Planner, port: int, now: float = T0, good: bool = False) -> Session:
    """A peer listed, named for a connect, connected and reached."""
    p.listed([("127.0.0.1", port, good)], now)
    assert p.next_connect(now) == addr(port)
    s = p.connected(addr(port), now)
    assert s is not None
    p.reached(s)
    return s


def deliver(p: Planner, s: Session, now: float, length: int = BS) -> int:
    """The oldest request of ``s`` comes back verified; returns its block."""
    i = s.outstanding[0]
    p.verified(s, i, length, now)
    return i


def test_the_head_of_file_is_raced_once_when_late() -> None:
    p = planner()
    a, b, c = session(p, 1), session(p, 2), session(p, 3)
    assert p.sequential
    assert p.request(a, 8, now=100.0) == list(range(8))
    # Block 0 (where the whole-file hash waits) is in flight at a: not late yet...
    assert p.request(b, 8, now=100.2) == list(range(8, 16))
    # ...then one other peer is asked too, and only one.
    assert p.request(c, 8, now=100.5) == [0, *range(16, 23)]
    assert p.blocks.inflight[0] == 2
    assert 0 not in p.request(b, 8, now=101.0)
    assert 0 not in p.request(a, 8, now=101.0)
    # Once block 0 is in, block 1 becomes the head: late only head_late (0.4 s) after that.
    assert deliver(p, a, 101.05) == 0
    assert 1 not in p.request(b, 4, now=101.1)
    assert p.request(b, 4, now=101.6)[0] == 1


def test_endgame_asks_a_second_peer_and_the_first_copy_wins() -> None:
    p = planner(4)
    a, b = session(p, 1), session(p, 2)
    assert p.request(a, 4, T0) == [0, 1, 2, 3]
    assert [p.blocks.endgame] == [False]  # (a list: mypy would take the flag for constant)
    dup = p.request(b, 4, T0 + 0.1)
    assert sorted(dup) == [0, 1, 2, 3] and p.blocks.endgame
    assert p.request(b, 4, T0 + 0.1) == []  # never the same block twice from one peer
    first = dup[0]
    assert deliver(p, b, T0 + 0.2) == first and p.have(first)
    # a's copy of it comes later: already have it, not counted; a delivers the others first.
    for i in list(a.outstanding):
        if i == first:
            p.duplicate(a, i, BS, T0 + 0.3)
        else:
            deliver(p, a, T0 + 0.3)
    assert a.blocks + b.blocks == 4 and p.complete
    assert not b.outstanding or all(p.have(i) for i in b.outstanding)


@pytest.mark.parametrize(
    ("ban_after", "offences", "banned"),
    [(2, 1, False), (2, 2, True), (1, 1, True), (3, 2, False)],
)
def test_a_peer_is_banned_after_ban_after_offences(ban_after: int, offences: int, banned: bool) -> None:
    p = planner(ban_after=ban_after, stall_timeout=60.0)
    s = session(p, 1)
    results = [p.offence(s, "sent a corrupt block 3", T0) for _ in range(offences)]
    assert results[-1] is banned and s.peer.banned is banned
    p.session_ended(s)
    later = T0 + 20.0  # past any backoff
    assert (p.next_connect(later) is None) is banned
    if banned:
        assert p.stall(T0 + 61.0) == (
            "no block arrived for 60 s: its only peer was banned: 127.0.0.1:1 sent a corrupt block 3"
        )


def test_an_offence_short_of_a_ban_backs_the_peer_off() -> None:
    p = planner()
    s = session(p, 1)
    assert p.offence(s, "garbage", T0) is False
    p.session_ended(s)
    assert p.next_connect(T0 + 0.1) is None  # backoff_min 0.2 s, +-20 %
    assert p.next_connect(T0 + 0.4) == addr(1)  # the ranking is redone after QUEUE_TTL


def test_not_present_steers_the_block_elsewhere_until_the_lack_expires() -> None:
    p = planner(8)
    a = session(p, 1)
    assert p.request(a, 2, T0) == [0, 1]
    p.not_present(a, 0, T0)
    assert a.peer.lacks == {0} and a.not_present == 1 and p.blocks.rare == [0]
    assert 0 not in p.request(a, 4, T0 + 0.5)
    # A declared seeder is asked for blocks others lacked first.
    seeder = session(p, 2, good=True)
    assert p.request(seeder, 1, T0 + 0.5) == [0]
    p.not_present(seeder, 0, T0 + 0.6)
    # After lack_ttl (1 s) the first peer may be asked again.
    assert 0 in p.request(a, 8, T0 + 1.6)


def test_dead_addresses_are_set_aside_and_come_back_after_their_backoff() -> None:
    p = planner(stall_timeout=60.0)
    listed = [("127.0.0.1", port, False) for port in (1, 2, 3)]
    assert p.listed(listed, T0) == 3
    for _ in range(3):
        named = p.next_connect(T0)
        assert named is not None
        p.connect_failed(named, T0)
    assert not p.peers and len(p.dead) == 3 and p.streak == 3
    table = [(T0 + 1.0, 0), (T0 + 4.9, 0), (T0 + 5.1, 3)]  # dead_retry 5 s
    for now, new in table:
        assert p.listed(listed, now) == new, now
    assert p.stall(T0 + 61.0) == "none of 3 peers could be reached within 60 s"


def test_relist_pacing_while_hungry_and_on_schedule() -> None:
    p = planner()
    # Nothing known: ask at once, then ever less often while lists bring nothing new.
    events: list[tuple[float, int | None, bool]] = [
        # (now, new addresses from a relist at that time or None for no relist, relist due?)
        (T0, 0, True),
        (T0 + 0.015, None, False),
        (T0 + 0.021, 0, True),  # gap doubled to 0.02
        (T0 + 0.05, None, False),
        (T0 + 0.062, 5, True),  # gap 0.04; this list brings 5 new addresses
    ]
    for now, new, due in events:
        assert p.relist_due(now) is due, now
        if new is not None:
            p.relisted(new, now)
    assert p.hungry_gap == p.policy.relist_hungry
    # With candidates left, only the doubling schedule: 0.5, 1, 2 ... s.
    p.listed([("127.0.0.1", 9, True)], T0 + 0.062)
    assert not p.relist_due(T0 + 0.1)
    assert not p.relist_due(T0 + 2.0)  # the third relist was 0.062 s in: the next is 2 s later
    assert p.relist_due(T0 + 2.1)


def test_a_far_too_slow_peer_gives_its_slot_to_an_untried_one() -> None:
    p = planner(1000, max_sessions=2)
    fast, slow = session(p, 1), session(p, 2)
    p.listed([("127.0.0.1", 3, False)], T0)  # untried, waiting for a slot
    p.request(fast, 30, T0)
    p.request(slow, 2, T0)
    for k in range(1, 21):  # 1 MiB/s for 2 s from fast, nothing from slow
        deliver(p, fast, T0 + k * 0.1, length=100_000)
    table = [(T0 + 1.5, None), (T0 + 2.0, slow), (T0 + 2.5, None)]  # judged after 2 s; one per evict_every
    for now, evicted in table:
        assert p.tick(now).evict is evicted, now
    assert slow.evicted and slow.peer.next_try == T0 + 2.0 + p.policy.evict_cooldown
    p.session_ended(slow)
    assert p.next_connect(T0 + 2.0) == addr(3)


def test_two_answering_peers_switch_to_random_order_and_back() -> None:
    p = planner()
    a, b = session(p, 1), session(p, 2)
    assert p.tick(T0).order is None
    p.answered(a)
    p.answered(b)
    assert p.tick(T0).order == ("random", 2) and not p.sequential
    p.session_ended(b)
    assert p.tick(T0).order == ("file", 1) and p.sequential


def test_a_resumed_download_asks_only_for_missing_blocks_and_stalls_on_virtual_time() -> None:
    p = planner(6, have=b"\1\1\0\1\0\0", stall_timeout=60.0)
    a = session(p, 1)
    assert p.request(a, 8, T0) == [2, 4, 5]
    assert p.stall(T0 + 60.0) is None
    deliver(p, a, T0 + 30.0)
    assert p.stall(T0 + 60.1) is None  # progress 30 s ago
    assert p.stall(T0 + 90.1) == "no block arrived for 60 s from 1 known peers"
    assert not p.complete
    deliver(p, a, T0 + 91)
    deliver(p, a, T0 + 91)
    assert p.complete


def test_nothing_listed_stalls_with_its_own_message() -> None:
    p = planner(stall_timeout=60.0)
    assert p.stall(T0 + 60.0) is None
    assert p.stall(T0 + 60.5) == "no peers for this file within 60 s"
    p.list_failed("tracker 127.0.0.1:1 unreachable")
    assert p.stall(T0 + 60.5) == "tracker 127.0.0.1:1 unreachable (for 60 s)"


def test_the_block_choice_is_one_replaceable_function() -> None:
    """The next issue's rarest-first choice replaces one function; the planner records what it returns."""
    asked: list[int] = []

    def last_first(blocks: object, peer: object, want: int, now: float, rng: random.Random) -> list[int]:
        got = [63 - len(asked)]
        asked.extend(got)
        return got

    p = Planner(bytearray(64), BS, FetchPolicy(), random.Random(1), max_sessions=2, max_depth=4, start=T0)
    p.choose = last_first
    s = session(p, 1)
    assert p.request(s, 4, T0) == [63] and list(s.outstanding) == [63] and s.peer.own == {63}


def test_peer_backoff_is_jittered_by_the_planners_seeded_random() -> None:
    backoff = FetchPolicy().peer_backoff
    delays = [backoff.delay(n, random.Random(3)) for n in (1, 2, 3, 12)]
    assert delays == [backoff.delay(n, random.Random(3)) for n in (1, 2, 3, 12)]  # seeded: reproducible
    for got, plain in zip(delays, (0.2, 0.4, 0.8, 10.0), strict=True):
        assert 0.8 * plain <= got <= 1.2 * plain
    assert backoff.delay(3) == pytest.approx(0.8)  # no random given: no jitter


@pytest.mark.parametrize(
    ("block_size", "max_depth", "depth"),
    [(256 << 10, 32, 4), (1 << 20, 32, 4), (64 << 10, 32, 16), (BS, 32, 32), (BS, 128, 128), (BS, 2, 2)],
)
def test_before_its_rate_is_known_a_connection_keeps_a_megabyte_of_requests_in_flight(
    block_size: int, max_depth: int, depth: int
) -> None:
    # Four requests of the default 256 KiB block; of 4 KiB files' blocks, as many as max_depth allows
    # (4 would leave a collection of small files waiting on round trips for its first RATE_WINDOW).
    p = Planner(
        bytearray(64), block_size, FetchPolicy(), random.Random(1), max_sessions=2, max_depth=max_depth, start=T0
    )
    p.begin(T0)
    s = session(p, 1)
    assert s.rate == 0 and p.depth(s) == depth
    s.rate = 1e6  # measured: target_latency of data at that rate, as before
    assert p.depth(s) == max(2, min(max_depth, int(1e6 * FetchPolicy().target_latency / block_size) + 1))


def test_a_slow_connection_keeps_one_request_in_flight_once_four_peers_serve_us() -> None:
    # A block of 256 KiB at 300 kB/s takes 0.9 s, far above target_latency: one request,
    # not two, once enough peers keep us busy; a super-seeder's connection keeps two, and so
    # does a seeder's with upload to spare, with spare_latency of data.
    block = 256 << 10
    p = Planner(bytearray(64), block, FetchPolicy(), random.Random(1), max_sessions=8, max_depth=32, start=T0)
    p.begin(T0)
    sessions = [session(p, port) for port in range(1, 4)]
    for s in sessions:
        s.rate = 300e3
    assert [p.depth(s) for s in sessions] == [2, 2, 2]  # three peers: a lone connection's gaps count
    fourth = session(p, 4)
    fourth.rate = 300e3
    assert [p.depth(s) for s in (*sessions, fourth)] == [1, 1, 1, 1]
    fourth.peer.offer = bytearray(64)  # a super-seeder: its upload must not idle between responses
    assert p.depth(fourth) == 2
    spare = sessions[1]
    spare.peer.spare = True  # a seeder with upload to spare (offer None): no share of anything
    assert p.depth(spare) == 2
    spare.rate = 1.25e6  # a tenth of its 100 Mbit/s: its requests cross our own full uplink
    assert p.depth(spare) == int(1.25e6 * FetchPolicy().spare_latency / block) + 1 == 3
    fast = sessions[0]
    fast.rate = 10e6  # a block in 26 ms: target_latency holds several
    assert p.depth(fast) == int(10e6 * 0.2 / block) + 1
    assert p.depth(session(p, 5)) == 4  # rate not known yet: a megabyte in flight, as before
