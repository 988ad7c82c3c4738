"""The super-seeding offer policy (peer/superseed.py): pure functions, tables of plain data."""

from __future__ import annotations

from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.server import SPARE_HOLD, SPARE_HOLD_MAX, spare_hold
from peer.superseed import SuperSeeder, SuperSeedPolicy, choose_offer, equal_part, may_stream, offer_share

pytestmark = pytest.mark.unit

NOW = 100.0
A, B, C = 1, 2, 3

# (name, sends per block, claims (block -> connection), live connections, recently sent, asker, share, offered)
CASES: list[tuple[str, list[int], dict[int, int], set[int], set[int], int, int, list[int]]] = [
    ("nothing sent, nothing claimed: the lowest blocks", [0] * 6, {}, {A}, set(), A, 3, [0, 1, 2]),
    ("least sent first", [2, 0, 1, 0, 0, 3], {}, {A}, set(), A, 3, [1, 3, 4]),
    ("blocks others claim are left out", [0] * 6, {0: B, 1: C}, {A, B, C}, set(), A, 2, [2, 3]),
    ("a claim of a connection no longer live counts for nothing", [0] * 4, {0: B}, {A}, set(), A, 1, [0]),
    ("the asker's own claims come first (a stable offer)", [0] * 6, {4: A, 5: A}, {A}, set(), A, 2, [4, 5]),
    ("a block sent less beats one the asker claims", [1, 1, 0, 1], {0: A}, {A}, set(), A, 1, [2]),
    ("unclaimed blocks sent more beat blocks others claim", [0, 0, 5], {0: B, 1: B}, {A, B}, set(), A, 2, [2]),
    ("blocks sent recently are still spreading: left out", [1, 1, 1, 1], {}, {A}, {0, 1}, A, 2, [2, 3]),
    ("all claimed by others: an empty offer", [0, 0, 1], {0: B, 1: B, 2: B}, {A, B}, set(), A, 2, []),
    ("share larger than the file", [0, 0], {}, {A}, set(), A, 5, [0, 1]),
    ("share zero", [0, 0], {}, {A}, set(), A, 0, []),
    ("empty file", [], {}, {A}, set(), A, 2, []),
]


@pytest.mark.parametrize(
    ("name", "sent", "claims", "live", "recent", "who", "share", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_choose_offer(
    name: str,
    sent: list[int],
    claims: dict[int, int],
    live: set[int],
    recent: set[int],
    who: int,
    share: int,
    expected: list[int],
) -> None:
    assert choose_offer(sent, claims, who, live, share, recent) == expected


def ranked_offer(
    sent: list[int], claims: dict[int, int], who: int, live: set[int], share: int, recent: set[int], held: set[int]
) -> list[int]:
    """The policy as a sort over every block: what choose_offer must return, however it finds it."""
    ranks = []
    for i in range(len(sent)):
        owner = claims.get(i)
        if (owner is not None and owner != who and owner in live) or i in recent or i in held:
            continue
        ranks.append((sent[i], owner != who, i))
    ranks.sort()
    return sorted(r[-1] for r in ranks[: max(share, 0)])


@settings(max_examples=300, deadline=None)
@given(
    sent=st.lists(st.integers(0, 3), max_size=40),
    claims=st.dictionaries(st.integers(0, 45), st.sampled_from([A, B, C]), max_size=20),
    live=st.sets(st.sampled_from([A, B, C])),
    recent=st.sets(st.integers(0, 45), max_size=10),
    held=st.sets(st.integers(0, 45), max_size=10),
    who=st.sampled_from([A, B, C]),
    share=st.integers(-1, 45),
)
def test_choose_offer_is_the_ranking_of_every_block(
    sent: list[int], claims: dict[int, int], live: set[int], recent: set[int], held: set[int], who: int, share: int
) -> None:
    """Level by level, it offers what ranking every block by (sends, not its own claim, number) would."""
    expected = ranked_offer(sent, claims, who, live, share, recent, held)
    assert choose_offer(sent, claims, who, live, share, recent, held) == expected
    assert choose_offer(array("I", sent), claims, who, live, share, recent, held) == expected


POLICY = SuperSeedPolicy(min_offer=2, offer_seconds=4.0)


@pytest.mark.parametrize(
    ("sent", "askers", "part"),
    [
        ([0] * 64, 8, 8),
        ([0] * 64, 3, 22),
        ([1] * 60 + [0] * 4, 8, 2),  # min_offer
        ([1] * 50 + [0] * 14, 2, 7),
        ([3] * 10, 1, 10),
        ([], 4, 0),
    ],
)
def test_equal_part_of_the_least_sent(sent: list[int], askers: int, part: int) -> None:
    assert equal_part(sent, askers, POLICY) == part
    assert equal_part(array("I", sent), askers, POLICY) == part


@pytest.mark.parametrize(
    ("rate", "share"),
    [
        (None, 2),  # rate not known yet: min_offer
        (0.1, 2),  # slow: at least min_offer
        (1.0, 4),  # 1 block/s for offer_seconds
        (1.1, 5),
        (100.0, 8),  # fast: the equal part at most
    ],
)
def test_offer_share_follows_the_rate_within_the_equal_part(rate: float | None, share: int) -> None:
    assert offer_share([0] * 64, 8, POLICY, rate) == share


def offered(flags: bytes | None) -> set[int]:
    assert flags is not None
    return {i for i, f in enumerate(flags) if f}


def test_a_partial_file_gets_no_offer() -> None:
    seeder = SuperSeeder(8)
    assert seeder.offer(A, NOW, complete=False) is None  # a plain map
    assert offered(seeder.offer(A, NOW, complete=True)) == {0, 1}  # rate not known yet: min_offer
    seeder.sent_block(1, A, NOW + 0.2)
    # Still alone: everything, but block 1 (sent just now, still spreading).
    assert offered(seeder.offer(A, NOW + 0.5, complete=True)) == {0} | set(range(2, 8))
    assert seeder.offer(B, NOW, complete=False) is None


def test_fewer_askers_than_min_askers_get_no_offer() -> None:
    seeder = SuperSeeder(8, SuperSeedPolicy(min_askers=2))
    assert seeder.offer(A, NOW, complete=True) is None
    assert seeder.offer(B, NOW, complete=True) is not None


def test_eight_askers_are_offered_disjoint_blocks_that_follow_the_sends() -> None:
    seeder = SuperSeeder(
        64, SuperSeedPolicy(claim_seconds=10.0, min_offer=2, offer_seconds=4.0, resend_after=5.0, max_streams=8)
    )
    askers = list(range(1, 9))
    assert len(offered(seeder.offer(1, NOW, complete=True))) == 2  # alone so far, rate not known: min_offer
    for who in askers[1:]:
        seeder.offer(who, NOW, complete=True)
    # One refresh later every offer is small (no rate known: min_offer) and none overlaps another.
    sets = [offered(seeder.offer(who, NOW + 0.1, complete=True)) for who in askers]
    assert all(len(s) == 2 for s in sets)
    assert len(set().union(*sets)) == 16
    # Asker 1 is sent its two blocks in half a second: 4 blocks/s, so its equal part (8) next.
    for i in sets[0]:
        seeder.sent_block(i, 1, NOW + 0.3)
    again = offered(seeder.offer(1, NOW + 0.6, complete=True))
    assert len(again) == 8
    assert not again & set().union(*sets), "neither its own blocks just sent nor the others' claims"


def test_an_asker_being_sent_blocks_stays_live_without_asking_for_maps() -> None:
    """Its next map request may wait seconds behind the blocks it asked for: its claims must hold meanwhile."""
    seeder = SuperSeeder(8, SuperSeedPolicy(claim_seconds=1.0, min_offer=2))
    seeder.offer(A, NOW, complete=True)
    seeder.offer(B, NOW, complete=True)
    mine = offered(seeder.offer(A, NOW, complete=True))
    assert mine
    for t in (0.8, 1.6, 2.4):
        seeder.sent_block(7, A, NOW + t)  # A is being served (block 7, say), not asking
        assert not offered(seeder.offer(B, NOW + t, complete=True)) & mine


def test_an_asker_that_goes_quiet_or_closes_no_longer_counts() -> None:
    seeder = SuperSeeder(4, SuperSeedPolicy(claim_seconds=1.0, min_askers=2, min_offer=2))
    assert seeder.offer(A, NOW, complete=True) is None  # alone, below min_askers
    assert offered(seeder.offer(B, NOW, complete=True))
    # A stops asking: after claim_seconds B is alone again.
    assert seeder.offer(B, NOW + 2.0, complete=True) is None
    assert seeder.offer(C, NOW + 2.0, complete=True) is not None
    seeder.forget(C)  # C's connection closed: it leaves at once
    assert seeder.offer(B, NOW + 2.0, complete=True) is None


def test_send_counts_saturate_instead_of_overflowing() -> None:
    seeder = SuperSeeder(1)
    seeder.offer(A, NOW, complete=True)
    seeder.sent[0] = 0xFFFFFFFF
    seeder.sent_block(0, A, NOW)
    assert seeder.sent[0] == 0xFFFFFFFF


def test_a_block_under_way_is_offered_to_nobody_else_and_counts_once_it_is_sent() -> None:
    """The re-offer window starts when a send completes: a block on a slow link is seconds under way."""
    seeder = SuperSeeder(4, SuperSeedPolicy(min_offer=1, offer_seconds=4.0, resend_after=3.0))
    seeder.offer(A, NOW, complete=True)
    seeder.offer(B, NOW, complete=True)
    seeder.sending(0, A, NOW)
    # Ten seconds under way (a claim long lapsed, far past resend_after): still A's.
    for t in (1.0, 10.0):
        assert 0 not in offered(seeder.offer(B, NOW + t, complete=True))
    assert seeder.sent[0] == 0
    seeder.sent_block(0, A, NOW + 10.0)
    assert seeder.sent[0] == 1
    assert 0 not in offered(seeder.offer(B, NOW + 12.9, complete=True))  # resend_after from the completion
    seeder.forget(B)
    seeder.sending(1, A, NOW + 13.0)
    assert offered(seeder.offer(C, NOW + 13.0, complete=True)) == {2}


def test_blocks_sent_to_a_downloader_that_left_are_offered_again_at_once() -> None:
    """A fetch that starts just after another ended must not wait resend_after for every block."""
    seeder = SuperSeeder(4, SuperSeedPolicy(min_offer=1, resend_after=3.0))
    seeder.offer(A, NOW, complete=True)
    for i in range(4):
        seeder.sent_block(i, A, NOW + 0.1 * i)
    seeder.offer(B, NOW + 0.5, complete=True)  # A still here: every block is still spreading
    assert offered(seeder.offer(B, NOW + 0.6, complete=True)) == set()
    seeder.forget(A)  # A finished and closed: nobody will pass its blocks on
    assert offered(seeder.offer(B, NOW + 0.7, complete=True))
    seeder.forget(B)
    assert offered(seeder.offer(C, NOW + 0.8, complete=True))


def test_a_send_cut_short_by_a_closed_connection_is_not_counted() -> None:
    seeder = SuperSeeder(2, SuperSeedPolicy(min_offer=1))
    seeder.offer(B, NOW, complete=True)
    seeder.sending(0, A, NOW)  # A: an old client, no maps
    assert offered(seeder.offer(B, NOW + 0.1, complete=True)) == {1}
    seeder.abandoned(A)  # A closed mid-block: nobody holds block 0
    assert list(seeder.sent) == [0, 0]
    assert 0 in offered(seeder.offer(B, NOW + 0.2, complete=True))


@pytest.mark.parametrize(
    ("who", "streaming", "waiting", "allowed"),
    [
        (A, set(), set(), True),
        (A, {B, C}, set(), False),  # max_streams 2, both taken
        (A, {B}, set(), True),
        (A, {B}, {C}, False),  # the free stream is owed to C, which waited
        (C, {B}, {C}, True),
        (C, {B}, {A, C}, True),  # any waiting connection takes a free stream
        (A, set(), {A, B}, True),
    ],
)
def test_may_stream(who: int, streaming: set[int], waiting: set[int], allowed: bool) -> None:
    assert may_stream(who, streaming, waiting, 2) is allowed


def test_only_max_streams_downloaders_are_sent_new_blocks_at_once_and_turns_pass_on() -> None:
    seeder = SuperSeeder(16, SuperSeedPolicy(min_offer=2, max_streams=2))
    a, b = offered(seeder.offer(A, NOW, complete=True)), offered(seeder.offer(B, NOW, complete=True))
    assert a and b and not a & b
    assert offered(seeder.offer(C, NOW, complete=True)) == set()  # two streams taken: C waits
    for i in a:
        seeder.sending(i, A, NOW + 0.2)
        seeder.sent_block(i, A, NOW + 0.3)
    # A's turn ends with its next map; the stream it frees is owed to C, not taken back by A.
    assert offered(seeder.offer(A, NOW + 0.4, complete=True)) == set()
    c = offered(seeder.offer(C, NOW + 0.5, complete=True))
    assert c and not c & (a | b)
    assert offered(seeder.offer(B, NOW + 0.6, complete=True)) == set()  # B's turn passes on to A, waiting
    assert offered(seeder.offer(A, NOW + 0.7, complete=True))


def test_an_offer_asked_for_none_of_is_thought_held_and_not_offered_again() -> None:
    """The 1+8 loopback stall: a downloader that got its offered blocks from the others waited 5 s.

    The seeder sees only its own sends. A downloader that asks for a map again without
    having asked for any offered block (its requests come before its map request on the
    one connection), with nothing under way to it, holds them: it is offered others.
    """
    seeder = SuperSeeder(8, SuperSeedPolicy(min_offer=2, resend_after=3.0))
    first = offered(seeder.offer(A, NOW, complete=True))
    assert first == {0, 1}
    # It asked for nothing in between: 0 and 1 came from elsewhere.
    # Alone, and its rate known: its whole share, but 0 and 1.
    assert offered(seeder.offer(A, NOW + 0.2, complete=True)) == {2, 3, 4, 5, 6, 7}
    # It asks for block 2: the rest of that offer is not taken for held, and 2 is still spreading.
    seeder.sending(2, A, NOW + 0.3)
    seeder.sent_block(2, A, NOW + 0.4)
    assert offered(seeder.offer(A, NOW + 0.5, complete=True)) == {3, 4, 5, 6, 7}
    # Another downloader is offered blocks by what was sent, whatever A is thought to hold.
    assert offered(seeder.offer(B, NOW + 0.5, complete=True))


def test_a_downloader_thought_to_hold_everything_left_still_gets_an_offer() -> None:
    """The guess must never leave it an empty offer: it waits out an empty one for ever."""
    seeder = SuperSeeder(4, SuperSeedPolicy(min_offer=2, resend_after=3.0))
    seen: set[int] = set()
    for k in range(4):  # never asks for anything: every offer is "held" in turn
        got = offered(seeder.offer(A, NOW + 0.2 * k, complete=True))
        assert got, f"map {k}: an empty offer"
        seen |= got
    assert seen == {0, 1, 2, 3}
    seeder.forget(A)  # what was thought goes with the connection
    assert offered(seeder.offer(A, NOW + 1.0, complete=True)) == {0, 1}


def test_blocks_sent_to_a_connection_that_asks_for_no_maps_do_not_count() -> None:
    """The bench's readiness probe fetched the last block; counted, no offer named it until 4.5 s later."""
    seeder = SuperSeeder(4, SuperSeedPolicy(min_offer=1))
    seeder.sending(3, C, NOW)  # C: a probe, or a version-1 client: it passes nothing on that we know of
    seeder.sent_block(3, C, NOW + 0.1)
    assert list(seeder.sent) == [0, 0, 0, 0]
    for i in range(3):  # the askers are sent every other block
        seeder.offer(A, NOW + 0.2, complete=True)
        seeder.sending(i, A, NOW + 0.2)
        seeder.sent_block(i, A, NOW + 0.3)
    assert list(seeder.sent) == [1, 1, 1, 0]
    assert offered(seeder.offer(B, NOW + 5.0, complete=True)) == {3}


def test_with_upload_to_spare_a_downloader_taking_its_offers_may_ask_for_any_block() -> None:
    """A fast seeder with slow downloaders: their uploads cannot spread one copy in time, it must send more."""
    seeder = SuperSeeder(8, SuperSeedPolicy(min_offer=2, max_streams=1))
    a = offered(seeder.offer(A, NOW, complete=True))
    assert a == {0, 1}
    assert offered(seeder.offer(B, NOW, complete=True)) == set()  # one stream, taken by A
    # B was offered nothing (waiting for a turn): with upload to spare, everything.
    assert offered(seeder.offer(B, NOW + 0.1, complete=True, spare=True)) == set(range(8))
    # A takes its offer: everything too; its claims on 0 and 1 lapse and its turn ends.
    for i in a:
        seeder.sending(i, A, NOW + 0.2)
        seeder.sent_block(i, A, NOW + 0.3)
    assert offered(seeder.offer(A, NOW + 0.4, complete=True, spare=True)) == set(range(8))
    # B asked for nothing from everything: it holds what it needs from us; small offers again.
    # Taking the stream A freed, it may be offered 0 and 1 (sent lately, but to A, which is here:
    # they are still spreading, so not those).
    b = offered(seeder.offer(B, NOW + 0.5, complete=True, spare=True))
    assert b and len(b) < 8 and not b & a
    # C, new, gets the usual first offer whatever the upload does.
    assert len(offered(seeder.offer(C, NOW + 0.6, complete=True, spare=True))) < 8
    # A partial file still offers nothing.
    assert SuperSeeder(8).offer(A, NOW, complete=False, spare=True) is None


def test_a_spell_of_spare_upload_doubles_only_when_it_follows_the_last_one_soon() -> None:
    """The server's hold of spare upload (peer/server.py): doubled when the last ended under SPARE_HOLD ago."""
    assert spare_hold(100.0, float("-inf"), SPARE_HOLD) == SPARE_HOLD
    assert spare_hold(100.0, 95.0, SPARE_HOLD) == 2 * SPARE_HOLD
    assert spare_hold(100.0, 95.0, 2 * SPARE_HOLD) == min(4 * SPARE_HOLD, SPARE_HOLD_MAX)
    assert spare_hold(100.0, 95.0, SPARE_HOLD_MAX) == SPARE_HOLD_MAX
    assert spare_hold(100.0, 100.0 - SPARE_HOLD, 4 * SPARE_HOLD) == SPARE_HOLD  # a quiet while: back to the first
