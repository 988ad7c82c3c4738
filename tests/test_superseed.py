"""The super-seeding offer policy (peer/superseed.py): pure functions, tables of plain data."""

from __future__ import annotations

from array import array

import pytest

from peer.superseed import SuperSeeder, SuperSeedPolicy, choose_offer, offer_share

pytestmark = pytest.mark.unit

NOW = 100.0
A, B, C = 1, 2, 3

# (name, sends per block, claims (block -> connection), live connections, asker, share, offered)
CASES: list[tuple[str, list[int], dict[int, int], set[int], int, int, list[int]]] = [
    ("nothing sent, nothing claimed: the lowest blocks", [0] * 6, {}, {A}, A, 3, [0, 1, 2]),
    ("least sent first", [2, 0, 1, 0, 0, 3], {}, {A}, A, 3, [1, 3, 4]),
    ("blocks others claim are left out", [0] * 6, {0: B, 1: C}, {A, B, C}, A, 2, [2, 3]),
    ("a claim of a connection no longer live counts for nothing", [0] * 4, {0: B}, {A}, A, 1, [0]),
    ("the asker's own claims come first (a stable offer)", [0] * 6, {4: A, 5: A}, {A}, A, 2, [4, 5]),
    ("a block sent less beats one the asker claims", [1, 1, 0, 1], {0: A}, {A}, A, 1, [2]),
    ("unclaimed blocks sent more beat blocks others claim", [0, 0, 5], {0: B, 1: B}, {A, B}, A, 2, [2]),
    ("all claimed by others: still never empty", [0, 0, 1], {0: B, 1: B, 2: B}, {A, B}, A, 2, [0, 1]),
    ("share larger than the file", [0, 0], {}, {A}, A, 5, [0, 1]),
    ("share zero", [0, 0], {}, {A}, A, 0, []),
    ("empty file", [], {}, {A}, A, 2, []),
]


@pytest.mark.parametrize(
    ("name", "sent", "claims", "live", "who", "share", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_choose_offer(
    name: str, sent: list[int], claims: dict[int, int], live: set[int], who: int, share: int, expected: list[int]
) -> None:
    assert choose_offer(sent, claims, who, live, share) == expected


@pytest.mark.parametrize(
    ("sent", "askers", "share"),
    [
        ([0] * 64, 8, 8),
        ([0] * 64, 3, 22),
        ([1] * 60 + [0] * 4, 8, 2),  # min_offer
        ([1] * 50 + [0] * 14, 2, 7),
        ([3] * 10, 1, 10),
        ([], 4, 0),
    ],
)
def test_offer_share_is_an_equal_part_of_the_least_sent(sent: list[int], askers: int, share: int) -> None:
    assert offer_share(sent, askers, SuperSeedPolicy(min_offer=2)) == share
    assert offer_share(array("I", sent), askers, SuperSeedPolicy(min_offer=2)) == share


def offered(flags: bytes | None) -> set[int]:
    assert flags is not None
    return {i for i, f in enumerate(flags) if f}


def test_a_partial_file_or_a_single_asker_gets_no_offer() -> None:
    seeder = SuperSeeder(8)
    assert seeder.offer(A, NOW, complete=True) is None  # alone
    assert seeder.offer(B, NOW, complete=False) is None  # not complete: a plain map
    assert seeder.offer(B, NOW, complete=True) is not None


def test_eight_askers_split_the_file_then_follow_the_sends() -> None:
    seeder = SuperSeeder(64, SuperSeedPolicy(claim_seconds=10.0, min_askers=2, min_offer=2))
    askers = list(range(1, 9))
    for _ in range(2):  # the second round sees every asker: equal shares
        offers = {who: seeder.offer(who, NOW, complete=True) for who in askers}
    sets = [offered(f) for f in offers.values()]
    assert all(len(s) == 8 for s in sets)
    assert set().union(*sets) == set(range(64))
    # Asker 1 receives its blocks; its next offer holds none of them while unsent blocks remain.
    for i in sets[0]:
        seeder.sent_block(i, 1, NOW + 0.1)
    again = offered(seeder.offer(1, NOW + 0.5, complete=True))
    assert again and not again & sets[0]


def test_an_asker_being_sent_blocks_stays_live_without_asking_for_maps() -> None:
    """Its next map request may wait seconds behind the blocks it asked for: its claims must hold meanwhile."""
    seeder = SuperSeeder(8, SuperSeedPolicy(claim_seconds=1.0, min_askers=2, min_offer=1))
    seeder.offer(A, NOW, complete=True)
    first_b = offered(seeder.offer(B, NOW, complete=True))
    mine = offered(seeder.offer(A, NOW, complete=True))
    for t in (0.8, 1.6, 2.4):
        seeder.sent_block(min(mine), A, NOW + t)  # A is being served, not asking
        seeder.offer(B, NOW + t, complete=True)
    later_b = offered(seeder.offer(B, NOW + 2.5, complete=True))
    assert first_b and not later_b & (mine - {min(mine)})


def test_an_asker_that_goes_quiet_or_closes_leaves_and_its_claims_lapse() -> None:
    seeder = SuperSeeder(4, SuperSeedPolicy(claim_seconds=1.0, min_askers=2, min_offer=1))
    seeder.offer(A, NOW, complete=True)
    assert offered(seeder.offer(B, NOW, complete=True))
    # B stops asking; after claim_seconds A is alone again and gets the plain map.
    assert seeder.offer(A, NOW + 2.0, complete=True) is None
    seeder.offer(C, NOW + 2.0, complete=True)
    assert seeder.offer(A, NOW + 2.0, complete=True) is not None
    seeder.forget(C)  # C's connection closed
    assert seeder.offer(A, NOW + 2.0, complete=True) is None


def test_send_counts_saturate_instead_of_overflowing() -> None:
    seeder = SuperSeeder(1)
    seeder.sent[0] = 0xFFFFFFFF
    seeder.sent_block(0, A, NOW)
    assert seeder.sent[0] == 0xFFFFFFFF
