"""The planner over a collection's members (one block space, :class:`peer.planner.Spans`): pure tables.

Member lacks come in as events (:meth:`Planner.lacks_member`, a status 1 for one
member); the choice comes back as block numbers of the whole space.
"""

from __future__ import annotations

import random

import pytest

from peer.planner import FetchPolicy, Planner, Spans
from tests.test_planner import BS, T0, deliver, session

pytestmark = pytest.mark.unit

# Five members: 3 blocks, none (an empty file), 1, 4 and 1 block: 9 blocks in all.
COUNTS = (3, 0, 1, 4, 1)


def members_planner(counts: tuple[int, ...] = COUNTS, **policy: float) -> Planner:
    spans = Spans(counts)
    p = Planner(
        bytearray(spans.block_count),
        BS,
        FetchPolicy(**policy),  # type: ignore[arg-type]  # test tables pass floats
        random.Random(7),
        max_sessions=8,
        max_depth=32,
        start=T0,
        spans=spans,
    )
    p.begin(T0)
    return p


@pytest.mark.parametrize(
    ("block", "where"),
    [(0, (0, 0)), (2, (0, 2)), (3, (2, 0)), (4, (3, 0)), (7, (3, 3)), (8, (4, 0))],
)
def test_a_block_of_the_space_is_a_member_and_its_own_block(block: int, where: tuple[int, int]) -> None:
    spans = Spans(COUNTS)
    assert spans.block_count == 9 and len(spans) == 5
    assert spans.locate(block) == where  # the empty member 1 holds no block: never located


@pytest.mark.parametrize("block", [-1, 9, 2**64])
def test_a_block_outside_the_space_is_refused(block: int) -> None:
    with pytest.raises(IndexError):
        Spans(COUNTS).member(block)


def test_each_member_covers_its_own_blocks() -> None:
    spans = Spans(COUNTS)
    assert [list(spans.blocks(m)) for m in range(5)] == [[0, 1, 2], [], [3], [4, 5, 6, 7], [8]]


def test_one_peer_is_asked_for_every_member_in_order_over_one_session() -> None:
    p = members_planner()
    s = session(p, 1)
    assert p.request(s, 32, T0) == list(range(9))


def test_a_peer_lacking_a_member_is_not_asked_for_its_blocks_until_the_ttl() -> None:
    p = members_planner(member_lack_ttl=10.0, lack_ttl=1.0)
    s = session(p, 1)
    assert p.request(s, 1, T0) == [0]
    deliver(p, s, T0)
    assert p.request(s, 1, T0) == [1]
    # Status 1 for block 1 (member 0): it delivered a block on this connection, so no backoff.
    assert p.lacks_member(s, 1, T0) is False
    p.session_ended(s)
    again = session(p, 1, now=T0)
    assert sorted(p.request(again, 32, T0)) == [3, 4, 5, 6, 7, 8]  # neither block 1 nor 2: member 0 is lacked
    # The block lacks are forgotten after lack_ttl, the member's only after member_lack_ttl.
    p.session_ended(again)
    later = session(p, 1, now=T0 + 2.0)
    assert sorted(p.request(later, 32, T0 + 2.0)) == [3, 4, 5, 6, 7, 8]  # released ones: at random
    p.session_ended(later)
    after = session(p, 1, now=T0 + 11.0)
    assert sorted(p.request(after, 32, T0 + 11.0)) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_another_peer_is_asked_for_the_member_one_peer_lacks() -> None:
    p = members_planner()
    a, b = session(p, 1), session(p, 2)
    assert p.request(a, 1, T0) == [0]
    deliver(p, a, T0)
    assert p.request(a, 1, T0) == [1]
    p.lacks_member(a, 1, T0)
    p.session_ended(a)
    assert sorted(p.request(b, 32, T0)) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_peer_that_serves_nothing_we_asked_backs_off() -> None:
    p = members_planner(backoff_min=0.5)
    s = session(p, 1)
    assert p.request(s, 1, T0) == [0]
    assert p.lacks_member(s, 0, T0) is True  # no block on this connection: it is not reconnected at once
    p.session_ended(s)
    assert p.next_connect(T0) is None
    assert p.next_connect(T0 + 1.0) == ("127.0.0.1", 1)


def test_a_member_lack_outside_a_collection_is_only_a_backoff() -> None:
    p = members_planner()
    s = session(p, 1)
    assert p.lacks_member(s, 99, T0) is True and not s.peer.lacks_members
