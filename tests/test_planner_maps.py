"""The planner with have maps (docs/protocol-extensions.md): rarest first, the seeder for what nobody else holds.

Pure: maps arrive as events (:meth:`Planner.have_map`), the choice comes back as block numbers.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.planner import EMPTY_OFFER_PATIENCE, FULL_SCAN, SCAN_LIMIT, FetchPolicy, Planner, Session, choose_rarest
from tests.test_planner import BS, T0, planner, session

pytestmark = pytest.mark.unit

N = 16


def flags(blocks: set[int] | range, n: int = N) -> bytes:
    return bytes(1 if i in blocks else 0 for i in range(n))


def with_map(p: Planner, port: int, held: set[int] | range, offer: set[int] | None = None) -> Session:
    s = session(p, port)
    p.answered(s)
    p.have_map(s, flags(held), None if offer is None else flags(offer), T0)
    return s


def test_a_peer_is_asked_only_for_blocks_its_map_holds() -> None:
    p = planner(N)
    a = with_map(p, 1, {3, 5, 7})
    with_map(p, 2, {1})  # two peers answer: random order
    p.tick(T0)
    assert sorted(p.request(a, 8, T0)) == [3, 5, 7]
    assert p.request(a, 8, T0) == []  # nothing else it holds: it is left alone, not asked blind


def test_rarest_first_among_what_a_peer_holds() -> None:
    p = planner(N)
    a = with_map(p, 1, range(8))
    with_map(p, 2, range(6))
    with_map(p, 3, range(4))
    p.tick(T0)
    # Blocks 6 and 7: one holder; 4 and 5: two; 0-3: three.
    assert sorted(p.request(a, 2, T0)) == [6, 7]
    assert sorted(p.request(a, 2, T0)) == [4, 5]


def test_the_seeder_is_asked_first_for_what_no_partial_peer_holds() -> None:
    p = planner(N)
    seeder = with_map(p, 1, range(N), offer=set(range(N)))
    with_map(p, 2, range(10))
    p.tick(T0)
    assert sorted(p.request(seeder, 6, T0)) == list(range(10, N))


def test_a_fetcher_that_finished_is_asked_like_any_peer() -> None:
    p = planner(N)
    done = with_map(p, 1, range(N))  # complete, no offer: a finished fetcher
    with_map(p, 2, range(10))
    p.tick(T0)
    assert len(p.request(done, N, T0)) == N


def test_the_seeder_is_asked_only_for_its_offer_while_it_names_a_block_we_need() -> None:
    p = planner(N)
    seeder = with_map(p, 1, range(N), offer={2, 9})
    with_map(p, 2, {0})
    p.tick(T0)
    assert sorted(p.request(seeder, N, T0)) == [2, 9]
    assert p.request(seeder, N, T0) == []  # the rest is offered to other downloaders


def test_an_offer_of_nothing_we_need_is_waited_out_then_ignored() -> None:
    p = planner(N, have=b"\1\1")  # we hold blocks 0 and 1 already (from another seeder, say)
    seeder = with_map(p, 1, range(N), offer={0, 1})
    with_map(p, 2, set())
    p.tick(T0)
    busy = with_map(p, 3, {2})
    p.tick(T0)
    assert p.request(busy, 1, T0) == [2]  # something in flight: the full OFFER_PATIENCE
    assert p.request(seeder, 4, T0) == []
    assert p.request(seeder, 4, T0 + 1.0) == []  # still waiting for a fresh map
    assert p.request(seeder, 4, T0 + 2.0) == []
    assert len(p.request(seeder, 4, T0 + 6.0)) == 4  # no guide after OFFER_PATIENCE: ask anyway


def test_an_offer_of_nothing_we_need_is_waited_out_briefly_when_nothing_is_in_flight() -> None:
    """No other peer has a block we lack: the seeder alone does, and its stale offer only delays it."""
    p = planner(N, have=b"\1\1")
    seeder = with_map(p, 1, range(N), offer={0, 1})
    with_map(p, 2, set())
    p.tick(T0)
    assert p.request(seeder, 4, T0) == []
    assert p.request(seeder, 4, T0 + 1.0) == []  # the next map may bring a usable offer
    assert len(p.request(seeder, 4, T0 + 2.0)) == 4


def test_an_empty_offer_is_waited_out_while_anything_is_in_flight() -> None:
    """The seeder has nothing for us now (others take their turns): asking around it would duplicate."""
    p = planner(N)
    seeder = with_map(p, 1, range(N), offer=set())
    busy = with_map(p, 2, {3})
    p.tick(T0)
    assert p.request(busy, 1, T0) == [3]  # in flight for the whole minute below
    for t in (0.0, 6.0, 60.0):
        assert p.request(seeder, 4, T0 + t) == []
    p.have_map(seeder, flags(range(N)), flags({7}), T0 + 61.0)  # its turn comes
    assert p.request(seeder, 4, T0 + 61.0) == [7]


def test_an_empty_offer_is_ignored_after_a_long_wait_with_nothing_in_flight() -> None:
    """A server whose offers stay empty (another implementation's "no preference") cannot stall us."""
    p = planner(N)
    seeder = with_map(p, 1, range(N), offer=set())
    with_map(p, 2, {3})  # a partial peer holds block 3: the seeder is asked for the others only
    p.tick(T0)
    assert p.request(seeder, 4, T0) == []
    assert p.request(seeder, 4, T0 + EMPTY_OFFER_PATIENCE - 0.1) == []  # our own seeder's turn comes sooner
    got = p.request(seeder, 4, T0 + EMPTY_OFFER_PATIENCE + 0.1)
    assert len(got) == 4 and 3 not in got
    # From then on its empty offers are no guide: blocks in flight do not start the wait again.
    p.have_map(seeder, flags(range(N)), flags(set()), T0 + 11.0)
    more = p.request(seeder, 4, T0 + 11.0)
    assert len(more) == 4 and not set(more) & set(got) and 3 not in more
    for i in list(seeder.outstanding):
        p.verified(seeder, i, BS, T0 + 12.0)
    # An offer that names something starts the wait again, from its next empty offer on.
    p.have_map(seeder, flags(range(N)), flags({3}), T0 + 20.0)
    p.have_map(seeder, flags(range(N)), flags(set()), T0 + 21.0)
    assert p.request(seeder, 4, T0 + 21.0) == []
    assert p.request(seeder, 4, T0 + 21.0 + EMPTY_OFFER_PATIENCE - 0.1) == []
    assert len(p.request(seeder, 4, T0 + 21.0 + EMPTY_OFFER_PATIENCE + 0.1)) == 4


def test_a_not_present_reply_corrects_the_map() -> None:
    p = planner(N)
    a = with_map(p, 1, {4, 5})
    with_map(p, 2, set())
    p.tick(T0)
    assert sorted(p.request(a, 2, T0)) == [4, 5]
    i = a.outstanding[0]
    p.not_present(a, i, T0)
    assert p.blocks.avail[i] == 0 and a.peer.holds is not None and a.peer.holds[i] == 0


def test_a_peer_whose_map_is_awaited_is_not_asked_blind() -> None:
    p = planner(N)
    a = session(p, 1)
    a.peer.maps = True  # it answered maps on an earlier connection; this one's is on its way
    assert p.request(a, 4, T0) == []


def test_a_peer_without_maps_gets_the_version_1_choice() -> None:
    p = planner(N)
    a = session(p, 1)
    a.peer.maps = False
    assert p.request(a, 4, T0) == [0, 1, 2, 3]  # file order: the only peer


def test_a_closed_peer_leaves_the_block_counts() -> None:
    p = planner(N)
    a = with_map(p, 1, {1, 2})
    assert p.blocks.avail[1] == 1
    p.session_ended(a)
    assert p.blocks.avail[1] == 0 and a.peer.holds is None


def test_endgame_never_asks_the_seeder_for_a_block_a_partial_peer_holds() -> None:
    p = planner(N, have=b"\1" * (N - 1))  # only the last block is missing
    seeder = with_map(p, 1, range(N), offer={0, N - 1})
    b = with_map(p, 2, range(N - 1, N))
    p.tick(T0)
    assert p.request(b, 2, T0) == [N - 1]
    assert p.request(seeder, 2, T0) == []  # in flight at b, which holds it: no second copy from the seeder


def test_an_offer_of_every_block_is_no_offer_the_seeder_has_upload_to_spare() -> None:
    """peer.superseed offers everything while its upload has room: it is asked like any complete peer."""
    p = planner(N)
    seeder = with_map(p, 1, range(N), offer=set(range(N)))
    with_map(p, 2, range(0, N, 2))  # a partial peer holding the even blocks
    assert seeder.peer.offer is None and seeder.peer.spare
    p.tick(T0)
    got = p.request(seeder, 4, T0)
    assert len(got) == 4 and all(i % 2 for i in got)  # the rarest first: the blocks b lacks
    # Its next map, a usual offer, steers again.
    p.have_map(seeder, b"\1" * N, bytes(1 if i == 3 else 0 for i in range(N)), T0)
    again = seeder.peer  # (a new name: mypy keeps the narrowing of the asserts above)
    assert not again.spare and again.offer is not None


def test_the_endgame_asks_a_seeder_with_upload_to_spare_for_no_second_copy() -> None:
    """Its spare upload would go on copies of blocks the partial peers are sending already."""
    p = planner(N, have=b"\1" * (N - 1))
    seeder = with_map(p, 1, range(N), offer=set(range(N)))
    b = with_map(p, 2, range(N - 1, N))
    p.tick(T0)
    assert p.request(b, 2, T0) == [N - 1]
    assert p.request(seeder, 2, T0) == []


def test_choose_rarest_is_the_default_choice() -> None:
    assert planner(N).choose is choose_rarest


def test_a_lone_fetcher_takes_a_super_seeders_offer_in_file_order() -> None:
    """The whole-file hash follows the verified prefix: in random order it was all left for the end."""
    p = planner(N)
    seeder = with_map(p, 1, range(N), offer={1, 2, 3, 5, 8, 13})
    p.tick(T0)
    assert p.request(seeder, 4, T0) == [1, 2, 3, 5]


# --- the choice and the block counts against a block-by-block reading ---------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_the_choice_is_what_a_block_by_block_reading_allows(data: st.DataObject) -> None:
    """Whatever the maps, the blocks chosen are ones the peer may be asked for, the rarest, as many as asked.

    The choice reads the maps a machine word at a time; this reads them one block at a time.
    """
    n = data.draw(st.integers(1, 300), label="blocks")
    bits = st.lists(st.booleans(), min_size=n, max_size=n).map(lambda b: bytes(map(int, b)))
    have, holds = data.draw(bits, label="have"), data.draw(bits, label="holds")
    p = planner(n, have=have)
    seeder = data.draw(st.booleans(), label="seeder")
    offer = data.draw(st.one_of(st.none(), bits), label="offer") if seeder else None
    if seeder:
        holds = b"\1" * n
    a = session(p, 1)
    p.answered(a)
    p.have_map(a, holds, offer, T0)
    for port in (2, 3):  # partial peers: the rarity
        p.have_map(session(p, port), data.draw(bits, label=f"peer {port}"), None, T0)
    blocks = p.blocks
    blocks.sequential = data.draw(st.booleans(), label="sequential")
    missing = [i for i in range(n) if not have[i]]
    for i in data.draw(st.lists(st.sampled_from(missing), unique=True), label="in flight") if missing else []:
        blocks.inflight[i] = 1
    a.peer.lacks.update(data.draw(st.sets(st.integers(0, n - 1)), label="lacks"))
    offer_now = a.peer.offer
    if offer_now is not None and not any(offer_now):
        return  # an empty offer: wait for a turn, never around it (tested above)
    starved = False  # a complete peer without an offer is a finished fetcher, asked for anything
    if offer_now is not None and not any(offer_now[i] and not have[i] for i in range(n)):
        # An offer naming nothing we need, waited out long enough: no guide any more, and the
        # seeder is asked only for what no partial peer holds.
        a.peer.offer_stale = T0 - 60
        offer_now, starved = None, True
    before = dict(blocks.inflight)
    allowed = [
        i
        for i in range(n)
        if not have[i]
        and a.peer.holds is not None
        and a.peer.holds[i]
        and i not in before
        and i not in a.peer.lacks
        and (offer_now is None or offer_now[i])
        and not (starved and blocks.avail[i])
    ]
    if not allowed:
        return  # nothing to choose: the endgame's rules apply (tested above)
    want = data.draw(st.integers(1, n), label="want")
    got = choose_rarest(blocks, a.peer, want, T0, random.Random(data.draw(st.integers(0, 9), label="seed")))
    assert len(got) == len(set(got)) == min(want, len(allowed))
    assert set(got) <= set(allowed)
    assert all(blocks.inflight[i] == 1 for i in got)
    if blocks.sequential:
        assert got == allowed[:want]  # file order
    else:
        rest = set(allowed) - set(got)
        assert not rest or max(blocks.avail[i] for i in got) <= min(blocks.avail[i] for i in rest)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_the_block_counts_are_the_partial_peers_maps_added_up(data: st.DataObject) -> None:
    """However the maps of several peers change (gains, losses, completion, leaving), each count is exact."""
    n = data.draw(st.integers(1, 70), label="blocks")
    p = planner(n)
    sessions = {port: session(p, port) for port in (1, 2, 3)}
    maps: dict[int, bytes | None] = dict.fromkeys(sessions)
    flags_of = st.lists(st.booleans(), min_size=n, max_size=n).map(lambda b: bytes(map(int, b)))
    events = st.tuples(st.sampled_from(sorted(sessions)), st.one_of(flags_of, st.just(b"\1" * n), st.none()))
    for port, held in data.draw(st.lists(events, max_size=12), label="events"):
        s = sessions[port]
        if held is None:
            p.session_ended(s)
            sessions[port] = s = session(p, port)
        else:
            p.have_map(s, held, None, T0)
        maps[port] = held
        partial = [m for m in maps.values() if m is not None and 0 in m]
        assert list(p.blocks.avail) == [sum(m[i] for m in partial) for i in range(n)]


def test_a_scan_from_a_random_start_wraps_around_to_the_first_blocks() -> None:
    """Past FULL_SCAN blocks the scan starts anywhere: what lies before its start is found too."""
    n = FULL_SCAN + 1000
    for seed in range(8):
        p = planner(n, have=b"\1" * n)
        p.blocks.have[10] = p.blocks.have[n - 10] = 0
        p.blocks.verified -= 2
        p.blocks.sequential = False
        a = session(p, 1)
        p.answered(a)
        p.have_map(a, b"\1" * (n - 1) + b"\0", None, T0)  # a partial peer holding both
        assert sorted(choose_rarest(p.blocks, a.peer, 4, T0, random.Random(seed))) == [10, n - 10]


class CountingRandom(random.Random):
    """Counts the ``random()`` draws: one per candidate block a choice looks at."""

    draws = 0

    def random(self) -> float:
        self.draws += 1
        return super().random()


def test_a_file_of_up_to_full_scan_blocks_gets_its_rarest_block_wherever_it_lies() -> None:
    """Every candidate is looked at: the one block a single peer holds is found among thousands."""
    n, rare = FULL_SCAN, FULL_SCAN - 7
    p = planner(n)
    p.blocks.sequential = False
    a = session(p, 1)
    p.answered(a)
    p.have_map(a, b"\1" * n, None, T0)
    others = b"\1" * rare + b"\0" + b"\1" * (n - rare - 1)
    for port in (2, 3):
        s = session(p, port)
        p.answered(s)
        p.have_map(s, others, None, T0)
    assert choose_rarest(p.blocks, a.peer, 1, T0, random.Random(1)) == [rare]


def test_a_larger_file_looks_at_no_more_than_scan_limit_candidates_per_choice() -> None:
    """The cost of a choice is bounded, however many blocks the file has and the peer holds."""
    n = 4 * FULL_SCAN
    p = planner(n)
    p.blocks.sequential = False
    a = session(p, 1)
    p.answered(a)
    p.have_map(a, b"\1" * (n - 1) + b"\0", None, T0)
    for seed in range(4):
        rng = CountingRandom(seed)
        got = choose_rarest(p.blocks, a.peer, 8, T0, rng)
        # One draw per candidate, and one for the random start (a Random that overrides
        # random() draws its randrange from it).
        assert len(got) == 8 and rng.draws == SCAN_LIMIT + 1
    # The window holds a whole pipeline: one choice can fill a connection's requests.
    assert FetchPolicy().max_depth <= SCAN_LIMIT
