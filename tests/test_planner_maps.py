"""The planner with have maps (docs/protocol-extensions.md): rarest first, the seeder for what nobody else holds.

Pure: maps arrive as events (:meth:`Planner.have_map`), the choice comes back as block numbers.
"""

from __future__ import annotations

import pytest

from peer.planner import Planner, Session, choose_rarest
from tests.test_planner import T0, planner, session

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


def test_an_empty_offer_is_waited_out_however_long_it_lasts() -> None:
    """The seeder has nothing for us now (others take their turns): asking around it would duplicate."""
    p = planner(N)
    seeder = with_map(p, 1, range(N), offer=set())
    with_map(p, 2, set())
    p.tick(T0)
    for t in (0.0, 6.0, 60.0):
        assert p.request(seeder, 4, T0 + t) == []
    p.have_map(seeder, flags(range(N)), flags({7}), T0 + 61.0)  # its turn comes
    assert p.request(seeder, 4, T0 + 61.0) == [7]


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
