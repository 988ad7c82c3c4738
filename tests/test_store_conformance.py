"""One suite, every swarm store backend: memory, SQLite and Redis answer the same.

As chihaya runs one storage suite against each driver: the same assertions,
an injectable clock (Redis gets the time as a script argument, so the test
clock works there too), no sleeping. The Redis backend talks to a real
``redis-server`` (tests/redisfix.py), flushed before each test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cascade.errors import BadRequest, MetafileError
from cascade.metafile import encode_cascade
from cascade.wire import PeerRecord, TrackerStatus
from tracker.cascade_store import StoreFull
from tracker.store import Backend, CascadeFiles, StoreSpec, SwarmStore, open_backend
from tracker.swarms import AnnounceRefused, SwarmLimits

pytestmark = pytest.mark.loopback

H1 = bytes(range(32))
H2 = bytes(range(1, 33))
H3 = bytes(range(2, 34))


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """Opens stores of one backend kind on a shared clock, and closes them all at the end."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.clock = FakeClock()
        if kind == "memory":
            self.spec = StoreSpec("memory")
        elif kind == "sqlite":
            self.spec = StoreSpec("sqlite", str(tmp_path / "state.db"))
        else:
            self.spec = StoreSpec("redis", request.getfixturevalue("redis_url"))
        self._open: list[tuple[Backend, CascadeFiles | None]] = []

    def open(self, allowed: frozenset[bytes] | None = None, **limits: Any) -> SwarmStore:
        backend = open_backend(self.spec, SwarmLimits(**limits), allowed, clock=self.clock)
        backend.start()
        self._open.append((backend, None))
        return backend.swarms

    def files(self) -> CascadeFiles:
        backend = open_backend(self.spec, SwarmLimits(), None, clock=self.clock)
        files = backend.open_files()
        self._open.append((backend, files))
        return files

    def close_all(self) -> None:
        while self._open:
            backend, files = self._open.pop()
            if files is not None:
                files.close()
            backend.close()

    @property
    def persistent(self) -> bool:
        return self.kind != "memory"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(request.param, tmp_path, request)
    try:
        yield h
    finally:
        h.close_all()


def addrs(records: list[PeerRecord] | tuple[PeerRecord, ...]) -> set[tuple[str, int]]:
    return {(r.ip, r.port) for r in records}


def cascade_bytes(seed: int, length: int = 1000, block: int = 256) -> bytes:
    data = (hashlib.sha256(str(seed).encode()).digest() * (length // 32 + 1))[:length]
    hashes = b"".join(hashlib.sha256(data[i : i + block]).digest() for i in range(0, length, block))
    return encode_cascade(length, block, hashlib.sha256(data).digest(), hashes)


# --- announces ---------------------------------------------------------------


def test_list_enrols_plain_and_subscribe_is_good(store: Harness) -> None:
    s = store.open()
    now = int(store.clock.now)
    assert s.announce(H1, "10.0.0.1", 1, subscribe=True) == []
    assert s.announce(H1, "10.0.0.2", 2, subscribe=False) == [PeerRecord("10.0.0.1", 1, now, True)]
    store.clock.now += 5
    got = s.announce(H1, "10.0.0.3", 3, subscribe=False)
    assert sorted(got, key=lambda r: r.port) == [
        PeerRecord("10.0.0.1", 1, now, True),
        PeerRecord("10.0.0.2", 2, now, False),
    ]
    assert got[0].good  # good peers come first


def test_good_stays_good_plain_is_upgraded_and_nobody_sees_themselves(store: Harness) -> None:
    s = store.open()
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    s.announce(H1, "10.0.0.2", 2, subscribe=False)
    s.announce(H1, "10.0.0.1", 1, subscribe=False)  # a list keeps a subscribed peer good
    s.announce(H1, "10.0.0.2", 2, subscribe=True)  # a subscribe upgrades a plain peer
    got = s.announce(H1, "10.0.0.3", 3, subscribe=False)
    assert {(r.port, r.good) for r in got} == {(1, True), (2, True)}
    for port in (1, 2, 3):
        assert (f"10.0.0.{port}", port) not in addrs(s.announce(H1, f"10.0.0.{port}", port, subscribe=False))
    summary = s.swarm(H1)
    assert summary is not None
    assert (summary.seeders, summary.others) == (2, 1)


def test_a_stopped_peer_is_removed_at_once(store: Harness) -> None:
    s = store.open()
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    s.announce(H1, "10.0.0.2", 2, subscribe=False)
    assert s.remove(H1, "10.0.0.1", 1) is True
    assert s.remove(H1, "10.0.0.1", 1) is False  # already gone
    assert s.remove(H2, "10.0.0.2", 2) is False  # not in that swarm
    assert addrs(s.announce(H1, "10.0.0.3", 3, subscribe=False)) == {("10.0.0.2", 2)}
    assert s.now() == store.clock.now
    with pytest.raises(BadRequest):
        s.remove(b"short", "10.0.0.1", 1)


def test_reply_is_a_bounded_sample_good_first(store: Harness) -> None:
    s = store.open(max_peers=5)
    for i in range(3):
        s.announce(H1, "10.0.1.1", 100 + i, subscribe=True)
    for i in range(20):
        s.announce(H1, "10.0.2.1", 200 + i, subscribe=False)
    everyone = {("10.0.1.1", 100 + i) for i in range(3)} | {("10.0.2.1", 200 + i) for i in range(20)}
    seen: set[tuple[str, int]] = set()
    for _ in range(30):
        got = s.announce(H1, "10.0.3.1", 300, subscribe=False)
        assert len(got) == 5 == len(addrs(got))
        assert [r.good for r in got] == [True] * 3 + [False] * 2
        assert addrs(got) <= everyone
        seen |= addrs(got)
    assert len(seen) > 5  # a sample, not always the same five


def test_zero_peers_asked_gives_an_empty_reply(store: Harness) -> None:
    s = store.open(max_peers=0)
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    assert s.announce(H1, "10.0.0.2", 2, subscribe=True) == []


def test_source_address_replaces_zero_and_bad_values_are_bad_requests(store: Harness) -> None:
    s = store.open()
    s.announce(H1, "0.0.0.0", 7, subscribe=True, source_ip="127.0.0.9")
    assert addrs(s.announce(H1, "10.0.0.2", 2, subscribe=False)) == {("127.0.0.9", 7)}
    for args in [(H1[:31], "10.0.0.1", 1), (H1, "not an ip", 1), (H1, "10.0.0.1", 70000)]:
        with pytest.raises(BadRequest):
            s.announce(*args, subscribe=False)


def test_packed_announce_is_the_same_records(store: Harness) -> None:
    s = store.open()
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    body = s.announce_packed(H1, bytes([10, 0, 0, 2, 0, 2]), True)
    assert len(body) == 12
    assert PeerRecord.decode(body) == PeerRecord("10.0.0.1", 1, int(store.clock.now), True)


# --- expiry -------------------------------------------------------------------


def test_peers_expire_after_the_ttl_and_swarms_with_them(store: Harness) -> None:
    s = store.open(peer_ttl=100.0)
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    s.announce(H2, "10.0.0.1", 1, subscribe=True)
    store.clock.now += 60
    s.announce(H1, "10.0.0.2", 2, subscribe=True)
    store.clock.now += 40  # peer 1 is exactly at the TTL: still there
    assert addrs(s.announce(H1, "10.0.0.3", 3, subscribe=False)) == {("10.0.0.1", 1), ("10.0.0.2", 2)}
    store.clock.now += 0.5  # now past it
    assert addrs(s.announce(H1, "10.0.0.3", 3, subscribe=False)) == {("10.0.0.2", 2)}
    assert s.swarm(H2) is None
    assert [sw.cascade_hash for sw in s.swarms()] == [H1]
    summary = s.swarm(H1)
    assert summary is not None and addrs(summary.peers) == {("10.0.0.2", 2), ("10.0.0.3", 3)}
    c = s.counters()
    assert (c.swarms, c.peers) == (1, 2)


# --- listings -----------------------------------------------------------------


def test_swarm_listing_most_recent_first(store: Harness) -> None:
    s = store.open()
    start = store.clock.now
    s.announce(H1, "10.0.0.1", 1, subscribe=False)
    store.clock.now += 1
    s.announce(H1, "10.0.0.2", 2, subscribe=True)
    store.clock.now += 1
    s.announce(H1, "10.0.0.3", 3, subscribe=True)
    store.clock.now += 1
    s.announce(H2, "10.0.0.4", 4, subscribe=False)
    summaries = s.swarms()
    assert [sw.cascade_hash for sw in summaries] == [H2, H1]
    one = s.swarm(H1)
    assert one == summaries[1]
    assert (one.seeders, one.others) == (2, 1)
    assert one.last_activity == pytest.approx(start + 2)
    assert [(p.port, p.good, p.last_seen) for p in one.peers] == [
        (3, True, int(start) + 2),
        (2, True, int(start) + 1),
        (1, False, int(start)),
    ]
    assert s.swarm(H3) is None


# --- limits, allow list, counters -----------------------------------------------


def test_swarm_cap_refuses_new_swarms_until_one_expires(store: Harness) -> None:
    s = store.open(max_swarms=2, peer_ttl=100.0)
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    s.announce(H2, "10.0.0.1", 1, subscribe=True)
    with pytest.raises(AnnounceRefused) as refused:
        s.announce(H3, "10.0.0.1", 1, subscribe=True)
    assert refused.value.status == TrackerStatus.FULL
    s.announce(H1, "10.0.0.2", 2, subscribe=True)  # a known swarm is still served
    store.clock.now += 101
    s.announce(H3, "10.0.0.1", 1, subscribe=True)
    assert s.counters().errors.get("swarms_full") == 1


def test_a_full_swarm_drops_a_stale_peer_first(store: Harness) -> None:
    s = store.open(max_peers_per_swarm=3)
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    store.clock.now += 100  # more than half the default TTL (150 s): peer 1 has most likely left
    s.announce(H1, "10.0.0.1", 2, subscribe=True)
    s.announce(H1, "10.0.0.1", 3, subscribe=False)
    s.announce(H1, "10.0.0.1", 4, subscribe=False)
    summary = s.swarm(H1)
    assert summary is not None and {p.port for p in summary.peers} == {2, 3, 4}
    assert s.counters().errors.get("peers_evicted") == 1


def test_a_full_swarm_of_fresh_peers_drops_a_listed_only_peer_then_a_random_one(store: Harness) -> None:
    s = store.open(max_peers_per_swarm=4)
    s.announce(H1, "10.0.0.1", 1, subscribe=True)  # the honest seeder, there first
    s.announce(H1, "10.0.0.9", 2, subscribe=False)  # a fetcher that only listed
    store.clock.now += 1
    for port in range(10, 14):  # fresh fake subscriptions fill the swarm and overflow it
        s.announce(H1, "10.0.0.66", port, subscribe=True)
    summary = s.swarm(H1)
    assert summary is not None and len(summary.peers) == 4
    # Room was made from the listed-only peer, then at random among the fresh ones: never
    # by dropping the oldest (the seeder) as the whole of the rule.
    assert 2 not in {p.port for p in summary.peers}
    assert s.counters().errors.get("peers_evicted") == 2


def test_allow_list(store: Harness) -> None:
    s = store.open(allowed=frozenset({H1}))
    assert s.is_allowed(H1) and not s.is_allowed(H2)
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    with pytest.raises(AnnounceRefused) as refused:
        s.announce(H2, "10.0.0.1", 1, subscribe=True)
    assert refused.value.status == TrackerStatus.NOT_ALLOWED
    assert s.swarm(H2) is None
    assert s.counters().requests.get(("api", "subscribe", TrackerStatus.NOT_ALLOWED)) == 1
    everyone = store.open() if store.kind != "redis" else None
    if everyone is not None:  # memory and SQLite: each tracker has its own list
        assert everyone.is_allowed(H2)


def test_counters(store: Harness) -> None:
    s = store.open()
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    s.announce(H1, "10.0.0.2", 2, subscribe=False, protocol="http")
    s.announce_packed(H2, bytes([10, 0, 0, 3, 0, 3]), False)
    s.count_request("tcp", "invalid", 1)
    s.count_error("read_timeout")
    s.count_error("read_timeout")
    c = s.counters()
    assert c.requests == {
        ("api", "subscribe", 0): 1,
        ("http", "list", 0): 1,
        ("tcp", "list", 0): 1,
        ("tcp", "invalid", 1): 1,
    }
    assert c.errors == {"read_timeout": 2}
    assert (c.swarms, c.peers) == (2, 3)
    assert c.completions == 0  # a peer that subscribes first was a seeder from the start
    s.announce(H1, "10.0.0.2", 2, subscribe=True)  # the lister turns good: a finished download
    s.announce(H1, "10.0.0.2", 2, subscribe=True)  # already good: not counted again
    assert s.counters().completions == 1
    s.sweep()  # housekeeping is always allowed, and changes nothing live
    assert (s.counters().swarms, s.counters().peers) == (2, 3)


def test_peers_survive_a_reopen_where_the_store_persists(store: Harness) -> None:
    if not store.persistent:
        pytest.skip("the memory store forgets everything on purpose")
    s = store.open()
    s.announce(H1, "10.0.0.1", 1, subscribe=True)
    s.announce(H1, "10.0.0.2", 2, subscribe=False)
    store.close_all()
    store.clock.now += 10
    again = store.open()
    summary = again.swarm(H1)
    assert summary is not None
    assert {(p.port, p.good) for p in summary.peers} == {(1, True), (2, False)}


# --- .cascade files --------------------------------------------------------------


def test_files_put_get_read_list(store: Harness) -> None:
    files = store.files()
    a, b = cascade_bytes(1), cascade_bytes(2, length=3000)
    entry, new = files.put(a)
    assert new and entry.name is None and entry.size == len(a) and entry.data_length == 1000
    again, new = files.put(a, "later-name.bin")  # a name is recorded when the file had none
    assert not new and again.name == "later-name.bin" and again.cascade_hash == entry.cascade_hash
    third, _ = files.put(a, "other.bin")  # the first name given stays
    assert third.name == "later-name.bin"
    store.clock.now += 1
    entry_b, new = files.put(b, "b.bin")
    assert new and entry_b.block_count == 12
    assert files.read(entry.cascade_hash) == a
    assert files.get(entry_b.cascade_hash) == entry_b
    assert files.name_of(entry_b.cascade_hash) == "b.bin"
    assert [e.cascade_hash for e in files.entries()] == [entry_b.cascade_hash, entry.cascade_hash]
    assert len(files) == 2
    assert files.read(H3) is None and files.get(H3) is None and files.name_of(H3) is None


def test_files_refuse_bad_input_and_respect_the_caps(store: Harness) -> None:
    files = store.files()
    with pytest.raises(MetafileError):
        files.put(b"not a cascade file")
    with pytest.raises(BadRequest):
        files.put(cascade_bytes(1), "a/b")
    small: Any = files
    small.max_file_size = 100
    with pytest.raises(BadRequest):
        files.put(cascade_bytes(1))
    small.max_file_size = 1 << 20
    small.max_total_size = len(cascade_bytes(1)) + 10
    files.put(cascade_bytes(1))
    with pytest.raises(StoreFull):
        files.put(cascade_bytes(2))
    assert len(files) == 1


def test_files_take_a_collection_under_its_collection_hash(store: Harness) -> None:
    from cascade.collection import Member, parse_collection, serialize_collection
    from cascade.errors import CollectionError

    files = store.files()
    raw = serialize_collection([Member("a/x.bin", cascade_bytes(1)), Member("b", cascade_bytes(2, length=3000))])
    coll = parse_collection(raw)
    entry, new = files.put(raw, "my-dataset")
    assert new and entry.cascade_hash == coll.collection_hash and entry.members == 2
    blocks = sum(m.cascade_file().block_count for m in coll.members)
    assert entry.data_length == 4000 and entry.block_size == 0 and entry.block_count == blocks
    assert files.read(coll.collection_hash) == raw
    assert files.get(coll.collection_hash) == entry
    with pytest.raises(CollectionError):  # the same bytes with a path that climbs out
        files.put(raw.replace(b"a/x.bin", b"../xbin"))
    assert len(files) == 1
