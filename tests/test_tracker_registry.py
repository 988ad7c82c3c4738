"""SwarmRegistry on its own: an injectable clock, no sockets, no sleeping."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cascade.errors import BadRequest
from cascade.wire import PeerRecord, TrackerStatus
from tracker.state import StateStore, load_state
from tracker.swarms import AnnounceRefused, SwarmLimits, SwarmRegistry, peer_key

pytestmark = pytest.mark.unit

H1 = bytes(range(32))
H2 = bytes(range(1, 33))


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock | None = None, **limits: float) -> tuple[SwarmRegistry, FakeClock]:
    clock = clock or FakeClock()
    return SwarmRegistry(SwarmLimits(**limits), clock=clock, seed=1), clock  # type: ignore[arg-type]


def addrs(records: list[PeerRecord]) -> list[tuple[str, int]]:
    return [(r.ip, r.port) for r in records]


def test_list_enrols_with_good_flag_zero_and_subscribe_sets_it() -> None:
    reg, clock = make()
    assert reg.announce(H1, "10.0.0.1", 1, subscribe=True) == []
    got = reg.announce(H1, "10.0.0.2", 2, subscribe=False)
    assert got == [PeerRecord("10.0.0.1", 1, int(clock.now), True)]
    clock.now += 5
    got = reg.announce(H1, "10.0.0.3", 3, subscribe=False)
    assert got == [
        PeerRecord("10.0.0.1", 1, int(clock.now) - 5, True),
        PeerRecord("10.0.0.2", 2, int(clock.now) - 5, False),
    ]


def test_subscribed_peer_stays_good_after_a_list_and_never_sees_itself() -> None:
    reg, _ = make()
    reg.announce(H1, "10.0.0.1", 1, subscribe=True)
    reg.announce(H1, "10.0.0.2", 2, subscribe=False)
    assert addrs(reg.announce(H1, "10.0.0.1", 1, subscribe=False)) == [("10.0.0.2", 2)]
    assert reg.announce(H1, "10.0.0.2", 2, subscribe=False)[0].good is True
    reg.announce(H1, "10.0.0.2", 2, subscribe=True)  # plain -> good
    summary = reg.swarm(H1)
    assert summary is not None and summary.seeders == 2 and summary.others == 0


def test_reply_is_capped_good_first_and_shuffled() -> None:
    reg, _ = make(max_peers=6)
    for i in range(5):
        reg.announce(H1, "10.0.1.1", 100 + i, subscribe=True)
    for i in range(20):
        reg.announce(H1, "10.0.2.1", 200 + i, subscribe=False)
    orders = set()
    for _ in range(30):
        got = reg.announce(H1, "10.0.3.1", 300, subscribe=False)
        assert len(got) == 6
        assert [r.good for r in got] == [True] * 5 + [False]
        assert ("10.0.3.1", 300) not in addrs(got)
        orders.add(tuple(addrs(got)[:5]))
    assert len(orders) > 1


def test_expiry_is_lazy_and_exact() -> None:
    reg, clock = make(peer_ttl=10)
    reg.announce(H1, "10.0.0.1", 1, subscribe=True)
    clock.now += 9
    assert addrs(reg.announce(H1, "10.0.0.2", 2, subscribe=False)) == [("10.0.0.1", 1)]
    clock.now += 2
    assert reg.announce(H1, "10.0.0.3", 3, subscribe=False) == [PeerRecord("10.0.0.2", 2, int(clock.now) - 2, False)]
    assert reg.peers(H1) is not None
    clock.now += 100
    assert reg.peers(H1) is None
    assert reg.swarms() == []


def test_expiry_counts_from_the_exact_time_not_the_whole_second() -> None:
    reg, clock = make(FakeClock(1_700_000_000.9), peer_ttl=2)
    reg.announce(H1, "10.0.0.1", 1, subscribe=True)
    clock.now += 1.9
    assert addrs(reg.announce(H1, "10.0.0.2", 2, subscribe=False)) == [("10.0.0.1", 1)]
    clock.now += 0.2
    assert addrs(reg.announce(H1, "10.0.0.2", 2, subscribe=False)) == []


def test_idle_swarms_are_swept_and_counts_stay_right() -> None:
    reg, clock = make(peer_ttl=10)
    for i in range(50):
        reg.announce(bytes([i]) * 32, "10.0.0.1", 1, subscribe=False)
    assert reg.counters().swarms == 50
    clock.now += 11
    reg.sweep(max_swarms=1000)
    c = reg.counters()
    assert (c.swarms, c.peers) == (0, 0)


def test_memory_is_bounded_by_the_limits() -> None:
    reg, _ = make(max_peers_per_swarm=10, max_swarms=3, max_total_peers=25)
    for port in range(100):
        reg.announce(H1, "10.0.0.1", port, subscribe=False)
    peers = reg.peers(H1)
    assert peers is not None and len(peers) == 10 and 99 in {p.port for p in peers}  # the newcomer got room
    reg.announce(H2, "10.0.0.1", 1, subscribe=False)
    reg.announce(bytes(32), "10.0.0.1", 1, subscribe=False)
    with pytest.raises(AnnounceRefused) as info:
        reg.announce(b"\x07" * 32, "10.0.0.1", 1, subscribe=False)
    assert info.value.status == TrackerStatus.FULL
    for port in range(2, 40):
        try:
            reg.announce(H2, "10.0.0.1", port, subscribe=False)
        except AnnounceRefused as exc:
            assert exc.status == TrackerStatus.FULL
    assert reg.counters().peers <= 25


def test_allow_list() -> None:
    reg = SwarmRegistry(allowed=frozenset({H1}))
    reg.announce(H1, "10.0.0.1", 1, subscribe=False)
    with pytest.raises(AnnounceRefused) as info:
        reg.announce(H2, "10.0.0.1", 1, subscribe=False)
    assert info.value.status == TrackerStatus.NOT_ALLOWED and H2.hex() in info.value.message
    assert reg.swarm(H2) is None


def test_any_address_takes_the_source_address() -> None:
    reg, _ = make()
    reg.announce(H1, "0.0.0.0", 1, subscribe=True, source_ip="10.0.0.9")
    assert addrs(reg.announce(H1, "10.0.0.2", 2, subscribe=False)) == [("10.0.0.9", 1)]
    assert reg.announce(H1, "0.0.0.0", 1, subscribe=False, source_ip="10.0.0.9")[0].ip == "10.0.0.2"


def test_bad_values_are_bad_requests() -> None:
    reg, _ = make()
    with pytest.raises(BadRequest):
        reg.announce(b"short", "10.0.0.1", 1, subscribe=False)
    with pytest.raises(BadRequest):
        reg.announce(H1, "not-an-ip", 1, subscribe=False)
    with pytest.raises(BadRequest):
        reg.announce(H1, "10.0.0.1", 70000, subscribe=False)


def test_changes_dump_and_restore_round_trip() -> None:
    clock = FakeClock()
    reg = SwarmRegistry(clock=clock, track_changes=True)
    reg.announce(H1, "10.0.0.1", 1, subscribe=True)
    reg.announce(H1, "10.0.0.2", 2, subscribe=False)
    changes = reg.take_changes()
    assert changes[(H1, peer_key("10.0.0.1", 1))] == (int(clock.now), True)
    assert reg.take_changes() == {}
    rows = reg.dump()
    clock.now += 3
    again = SwarmRegistry(clock=clock)
    assert again.restore(rows) == 2
    assert again.peers(H1) == reg.peers(H1)
    expired = SwarmRegistry(SwarmLimits(peer_ttl=1), clock=clock)
    assert expired.restore(rows) == 0


def test_counters() -> None:
    reg, _ = make()
    reg.announce(H1, "10.0.0.1", 1, subscribe=False, protocol="tcp")
    reg.announce(H1, "10.0.0.1", 1, subscribe=True, protocol="http")
    reg.count_error("read_timeout")
    c = reg.counters()
    assert c.requests == {("tcp", "list", 0): 1, ("http", "subscribe", 0): 1}
    assert c.errors == {"read_timeout": 1}


def test_state_store_writes_changes_and_deletions(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "state.sqlite"
    reg = SwarmRegistry(SwarmLimits(peer_ttl=10), clock=clock, track_changes=True)
    assert load_state(path, reg) == 0
    store = StateStore(path, reg, interval=60)
    store.start()
    try:
        reg.announce(H1, "10.0.0.1", 1, subscribe=True)
        reg.announce(H2, "10.0.0.2", 2, subscribe=False)
        assert store.flush()
        clock.now += 5
        reg.announce(H1, "10.0.0.3", 3, subscribe=False)
        clock.now += 6  # the first two expire; the next announce drops 10.0.0.1 and sweeps H2
        reg.announce(H1, "10.0.0.3", 3, subscribe=False)
    finally:
        assert store.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT cascade_hash, peer, good FROM peers").fetchall()
    assert rows == [(H1, peer_key("10.0.0.3", 3), 0)]
    again = SwarmRegistry(SwarmLimits(peer_ttl=10), clock=clock)
    assert load_state(path, again) == 1
    assert again.peers(H1) == reg.peers(H1)


def test_remove_drops_a_stopped_peer_at_once_and_from_the_state() -> None:
    clock = FakeClock()
    reg = SwarmRegistry(clock=clock, track_changes=True, seed=1)
    reg.announce(H1, "10.0.0.1", 1, subscribe=True)
    reg.announce(H1, "10.0.0.2", 2, subscribe=False)
    reg.take_changes()
    assert reg.remove(H1, "10.0.0.1", 1) is True
    assert addrs(reg.peers(H1) or []) == [("10.0.0.2", 2)]
    summary = reg.swarm(H1)
    assert summary is not None and summary.seeders == 0 and summary.others == 1
    assert reg.take_changes() == {(H1, peer_key("10.0.0.1", 1)): None}  # deleted from --state too
    assert reg.counters().peers == 1
    # Unknown peers and swarms: nothing to do, no error.
    assert reg.remove(H1, "10.0.0.1", 1) is False
    assert reg.remove(H2, "10.0.0.1", 1) is False
    assert reg.counters().requests[("api", "stopped", 0)] == 3
    # The peer may come back later like any new peer.
    assert addrs(reg.announce(H1, "10.0.0.1", 1, subscribe=True)) == [("10.0.0.2", 2)]


def test_default_ttl_forgets_a_silent_peer_within_three_minutes() -> None:
    reg, clock = make()
    reg.announce(H1, "10.0.0.1", 1, subscribe=True)
    clock.now += 179
    assert reg.peers(H1) in (None, [])
