"""The tracker's swarm state: one lock-protected object, no sockets, no disk.

:class:`SwarmRegistry` holds every swarm (the peers of one cascade hash), the
allow list and the request counters. Front ends (the binary TCP server, an
HTTP API) call :meth:`SwarmRegistry.announce`; the state store reads
:meth:`SwarmRegistry.take_changes`. Every public method takes the one lock,
does a bounded amount of work and returns plain values.

How a swarm is kept, and why:

* Each swarm splits its peers into two *groups*: good (subscribed) and plain
  (only listed). A group is a Python list of packed 12-byte records kept in a
  uniformly random order (each new peer is swapped with a random slot, removal
  moves the last slot into the hole), plus a dict from peer key to slot. A
  reply is then a random window of that list: two slices and a join, O(max
  peers) whatever the swarm's size, and already in random order.
* A per-swarm ``OrderedDict`` orders peers by last-seen, so expiry pops from
  its front: lazily on each announce of that swarm, and a few whole idle
  swarms per request (swarms are ordered by last activity too). Expiry is
  O(1) amortized and never scans.
* Memory is bounded by :class:`SwarmLimits`: swarms, peers per swarm (the
  stale or else a random peer makes room) and peers in total.

A peer is keyed by its 6 bytes "IPv4 + port", exactly the start of its wire
record, so the hot path never converts addresses to text.
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cascade.errors import AnnounceRefused as AnnounceRefused  # its old home; the class lives in the tree
from cascade.errors import BadRequest
from cascade.wire import (
    HASH_SIZE,
    PEER_KEY_SIZE,
    PEER_RECORD_SIZE,
    PeerRecord,
    TrackerStatus,
    pack_peer_key,
    pack_peer_record_tail,
    peer_record_recency,
)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class SwarmLimits:
    """The policy of a registry; the defaults live here and only here.

    The caps are arbitrary but generous. Measured with tracemalloc: about
    1.4 KB per swarm and 320 bytes per peer, so the defaults bound the
    registry to about 70 MB + 160 MB, however much garbage arrives.
    """

    # A peer that vanished without a word is gone from the lists within 150 s
    # (under 3 minutes): 2.5 peer announce intervals (60 s, peer/common.py),
    # so one lost announce does not drop a live seeder. README "Tracker".
    peer_ttl: float = 150.0
    max_peers: int = 50  # records per reply
    max_swarms: int = 50_000
    max_peers_per_swarm: int = 10_000  # beyond it a stale, else a random peer makes room
    max_total_peers: int = 500_000  # beyond it new peers are refused until some expire


@dataclass(frozen=True, slots=True)
class SwarmSummary:
    """One swarm as the outside world sees it."""

    cascade_hash: bytes
    seeders: int  # good peers (subscribed)
    others: int  # peers only enrolled by a list request
    last_activity: float  # UNIX seconds of the last announce
    peers: tuple[PeerRecord, ...]  # good first, then others, most recently seen first


@dataclass(frozen=True, slots=True)
class Counters:
    """A snapshot of the request counters."""

    requests: dict[tuple[str, str, int], int]  # (protocol, command, status) -> count
    errors: dict[str, int]  # kind -> count
    swarms: int
    peers: int
    # Peers that turned from plain (enrolled by a list request) into good (a
    # subscribe) while the tracker knew them: a download finished. A peer that
    # subscribes on its first announce was a seeder from the start and is not counted.
    completions: int = 0


def peer_key(ip: str, port: int) -> bytes:
    """The 6-byte key of a peer; raises :class:`BadRequest` for a bad address or port."""
    if not 0 <= port <= 0xFFFF:
        raise BadRequest(f"port {port} is outside 0..65535")
    try:
        packed = ipaddress.IPv4Address(ip).packed
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    return pack_peer_key(packed, port)


def decode_record(record: bytes) -> PeerRecord:
    return PeerRecord.decode(record)


# One swarm copied under the lock: hash, good records, other records, last activity.
_Raw = tuple[bytes, list[bytes], list[bytes], float]


class _Group:
    """Peers of one kind, in a random order that a reply can slice in O(k)."""

    __slots__ = ("index", "keys", "recs")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.recs: list[bytes] = []
        self.index: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def _swap(self, i: int, j: int) -> None:
        keys, recs = self.keys, self.recs
        keys[i], keys[j] = keys[j], keys[i]
        recs[i], recs[j] = recs[j], recs[i]
        self.index[keys[i]] = i
        self.index[keys[j]] = j

    def add(self, key: bytes, rec: bytes, rnd: Callable[[], float]) -> None:
        n = len(self.keys)
        self.keys.append(key)
        self.recs.append(rec)
        self.index[key] = n
        j = int(rnd() * (n + 1))  # inside-out Fisher-Yates keeps the order uniform
        if j < n:
            self._swap(j, n)

    def remove(self, key: bytes) -> None:
        i = self.index.pop(key)
        last = len(self.keys) - 1
        if i != last:
            self.keys[i] = self.keys[last]
            self.recs[i] = self.recs[last]
            self.index[self.keys[i]] = i
        self.keys.pop()
        self.recs.pop()

    def to_end(self, key: bytes) -> None:
        """Move ``key`` to the last slot, so a reply can leave it out by slicing."""
        i = self.index[key]
        last = len(self.keys) - 1
        if i != last:
            self._swap(i, last)

    def pick(self, k: int, exclude_last: bool, rnd: Callable[[], float]) -> list[bytes]:
        """Up to ``k`` records: a window at a random start, wrapping around."""
        m = len(self.recs) - exclude_last
        if k <= 0 or m <= 0:
            return []
        if k > m:
            k = m
        start = int(rnd() * m)
        end = start + k
        recs = self.recs
        if end <= m:
            return recs[start:end]
        return recs[start:m] + recs[: end - m]


class _Swarm:
    __slots__ = ("good", "last_activity", "plain", "seen")

    def __init__(self, now: float) -> None:
        self.good = _Group()
        self.plain = _Group()
        self.seen: OrderedDict[bytes, float] = OrderedDict()  # key -> last seen (clock time, not floored), oldest first
        self.last_activity = now


class SwarmRegistry:
    """Every swarm of the tracker, behind one lock.

    ``clock`` gives UNIX seconds (injectable for tests); ``allowed`` is the set
    of cascade hashes accepted, or ``None`` for all; ``track_changes`` makes
    the registry remember what changed for :meth:`take_changes` (the state store).
    """

    def __init__(
        self,
        limits: SwarmLimits | None = None,
        *,
        clock: Clock = time.time,
        allowed: frozenset[bytes] | None = None,
        track_changes: bool = False,
        seed: int | None = None,
    ) -> None:
        self.limits = limits or SwarmLimits()
        self._clock = clock
        self._allowed = allowed
        self._lock = threading.Lock()
        self._swarms: OrderedDict[bytes, _Swarm] = OrderedDict()  # least recently active first
        self._peer_count = 0
        self._rnd = random.Random(seed).random
        self._requests: Counter[tuple[str, str, int]] = Counter()
        self._errors: Counter[str] = Counter()
        self._completions = 0
        self._track = track_changes
        self._changes: dict[tuple[bytes, bytes], tuple[float, bool] | None] = {}
        self._tail_second = -1
        self._tails = (b"", b"")

    # --- policy ---------------------------------------------------------

    def is_allowed(self, cascade_hash: bytes) -> bool:
        return self._allowed is None or cascade_hash in self._allowed

    # --- announces --------------------------------------------------------

    def announce(
        self,
        cascade_hash: bytes,
        ip: str,
        port: int,
        subscribe: bool,
        protocol: str = "api",
        source_ip: str | None = None,
    ) -> list[PeerRecord]:
        """Enrol (or, with ``subscribe``, mark as good) ``ip:port`` and return the reply subset.

        The reply holds at most ``limits.max_peers`` records, good peers first,
        each group in random order, never the requester. An ``ip`` of 0.0.0.0
        is replaced by ``source_ip`` (the address the request came from) when
        given. ``protocol`` only labels the request counters.

        Raises :class:`BadRequest` for a malformed hash, address or port, and
        :class:`AnnounceRefused` when the hash is not allowed or the registry
        is full.
        """
        if len(cascade_hash) != HASH_SIZE:
            raise BadRequest(f"cascade hash must be {HASH_SIZE} bytes, not {len(cascade_hash)}")
        if source_ip is not None and ip == "0.0.0.0":
            ip = source_ip
        body = self.announce_packed(cascade_hash, peer_key(ip, port), subscribe, protocol)
        return [decode_record(body[i : i + PEER_RECORD_SIZE]) for i in range(0, len(body), PEER_RECORD_SIZE)]

    def announce_packed(self, cascade_hash: bytes, key: bytes, subscribe: bool, protocol: str = "tcp") -> bytes:
        """The hot path of :meth:`announce`: a 6-byte key in, the packed reply body out.

        Raises :class:`AnnounceRefused`.
        """
        command = "subscribe" if subscribe else "list"
        now = self._clock()
        limits = self.limits
        with self._lock:
            swarms = self._swarms
            sw = swarms.get(cascade_hash)
            if sw is None:
                if self._allowed is not None and cascade_hash not in self._allowed:
                    self._requests[(protocol, command, TrackerStatus.NOT_ALLOWED)] += 1
                    raise AnnounceRefused(
                        TrackerStatus.NOT_ALLOWED, f"cascade hash {cascade_hash.hex()} is not tracked here"
                    )
                self._sweep(now, 4)
                if len(swarms) >= limits.max_swarms:
                    self._requests[(protocol, command, TrackerStatus.FULL)] += 1
                    self._errors["swarms_full"] += 1
                    raise AnnounceRefused(TrackerStatus.FULL, f"tracker full: {len(swarms)} swarms")
                sw = swarms[cascade_hash] = _Swarm(now)
            else:
                swarms.move_to_end(cascade_hash)
            sw.last_activity = now
            cutoff = now - limits.peer_ttl
            seen = sw.seen
            if seen and next(iter(seen.values())) < cutoff:
                self._prune(cascade_hash, sw, cutoff)

            second = int(now)
            if second != self._tail_second:
                self._tails = (pack_peer_record_tail(second, False), pack_peer_record_tail(second, True))
                self._tail_second = second
            good_tail = self._tails[1]

            good, plain = sw.good, sw.plain
            if key in seen:
                seen[key] = now
                seen.move_to_end(key)
                if key in good.index:
                    good.recs[good.index[key]] = key + good_tail
                    is_good = True
                elif subscribe:
                    plain.remove(key)
                    good.add(key, key + good_tail, self._rnd)
                    is_good = True
                    self._completions += 1
                else:
                    plain.recs[plain.index[key]] = key + self._tails[0]
                    is_good = False
            else:
                if len(seen) >= limits.max_peers_per_swarm:
                    self._make_room(cascade_hash, sw, now)
                elif self._peer_count >= limits.max_total_peers:
                    self._sweep(now, 16)
                    if self._peer_count >= limits.max_total_peers:
                        if not seen:
                            del swarms[cascade_hash]
                        self._requests[(protocol, command, TrackerStatus.FULL)] += 1
                        self._errors["peers_full"] += 1
                        raise AnnounceRefused(TrackerStatus.FULL, f"tracker full: {self._peer_count} peers")
                seen[key] = now
                self._peer_count += 1
                if subscribe:
                    good.add(key, key + good_tail, self._rnd)
                else:
                    plain.add(key, key + self._tails[0], self._rnd)
                is_good = subscribe
            if self._track:
                self._changes[(cascade_hash, key)] = (now, is_good)

            mine = good if is_good else plain
            mine.to_end(key)
            k = limits.max_peers
            out = good.pick(k, is_good, self._rnd)
            if len(out) < k:
                out += plain.pick(k - len(out), not is_good, self._rnd)
            self._requests[(protocol, command, 0)] += 1
            if swarms and next(iter(swarms.values())).last_activity < cutoff:
                self._sweep(now, 2)
        return b"".join(out)

    def remove(self, cascade_hash: bytes, ip: str, port: int, protocol: str = "api") -> bool:
        """Drop ``ip:port`` from the swarm at once (the peer said it stopped); True if it was there.

        Raises :class:`BadRequest` for a malformed hash, address or port.
        """
        if len(cascade_hash) != HASH_SIZE:
            raise BadRequest(f"cascade hash must be {HASH_SIZE} bytes, not {len(cascade_hash)}")
        key = peer_key(ip, port)
        with self._lock:
            self._requests[(protocol, "stopped", 0)] += 1
            sw = self._swarms.get(cascade_hash)
            if sw is None or key not in sw.seen:
                return False
            del sw.seen[key]
            self._drop(cascade_hash, sw, key)
            return True

    def now(self) -> float:
        """The registry's clock (UNIX seconds), for ages of last-seen times."""
        return self._clock()

    # --- expiry (call with the lock held) ---------------------------------

    def _drop(self, cascade_hash: bytes, sw: _Swarm, key: bytes) -> None:
        if key in sw.good.index:
            sw.good.remove(key)
        else:
            sw.plain.remove(key)
        self._peer_count -= 1
        if self._track:
            self._changes[(cascade_hash, key)] = None

    def _make_room(self, cascade_hash: bytes, sw: _Swarm, now: float) -> None:
        """A full swarm drops one peer for a newcomer: the least recently seen one if it is stale
        (not seen for half the TTL, so it has most likely left), else a random listed-only peer,
        else a random seeder. Never simply the oldest: the oldest members are the honest seeders
        that were there first, and a flood of fake subscriptions would push exactly them out.
        """
        key, last = next(iter(sw.seen.items()))
        if last >= now - self.limits.peer_ttl / 2:
            group = sw.plain if sw.plain.keys else sw.good
            key = group.keys[int(self._rnd() * len(group.keys))]
        del sw.seen[key]
        self._drop(cascade_hash, sw, key)
        self._errors["peers_evicted"] += 1

    def _prune(self, cascade_hash: bytes, sw: _Swarm, cutoff: float) -> None:
        seen = sw.seen
        while seen:
            key, last = next(iter(seen.items()))
            if last >= cutoff:
                break
            del seen[key]
            self._drop(cascade_hash, sw, key)

    def _sweep(self, now: float, max_swarms: int) -> None:
        """Drop up to ``max_swarms`` whole swarms idle for longer than the TTL."""
        cutoff = now - self.limits.peer_ttl
        swarms = self._swarms
        for _ in range(max_swarms):
            if not swarms:
                return
            cascade_hash, sw = next(iter(swarms.items()))
            if sw.last_activity >= cutoff:
                return
            del swarms[cascade_hash]
            self._prune(cascade_hash, sw, float("inf"))

    def sweep(self, max_swarms: int = 64) -> None:
        """Occasional housekeeping: drop idle swarms (bounded work per call)."""
        with self._lock:
            self._sweep(self._clock(), max_swarms)

    # --- reading ----------------------------------------------------------

    # Reads copy the raw records under the lock (list copies, C speed) and
    # decode them after releasing it, so a big listing never stalls announces.
    def _raw(self, cascade_hash: bytes, sw: _Swarm, cutoff: float) -> _Raw:
        self._prune(cascade_hash, sw, cutoff)
        return (cascade_hash, sw.good.recs.copy(), sw.plain.recs.copy(), sw.last_activity)

    @staticmethod
    def _cook(raw: _Raw) -> SwarmSummary:
        cascade_hash, good, plain, last_activity = raw
        # most recently seen first: a record holds last-seen at bytes 6..10, big-endian
        good.sort(key=peer_record_recency, reverse=True)
        plain.sort(key=peer_record_recency, reverse=True)
        peers = tuple(decode_record(r) for r in good + plain)
        return SwarmSummary(cascade_hash, len(good), len(plain), last_activity, peers)

    def swarms(self) -> list[SwarmSummary]:
        """Every swarm with at least one live peer, most recently active first."""
        cutoff = self._clock() - self.limits.peer_ttl
        with self._lock:
            raws = [self._raw(h, sw, cutoff) for h, sw in reversed(self._swarms.items())]
        return [self._cook(raw) for raw in raws if raw[1] or raw[2]]

    def swarm(self, cascade_hash: bytes) -> SwarmSummary | None:
        """One swarm, or ``None`` if it has no live peer."""
        cutoff = self._clock() - self.limits.peer_ttl
        with self._lock:
            sw = self._swarms.get(cascade_hash)
            if sw is None:
                return None
            raw = self._raw(cascade_hash, sw, cutoff)
        return self._cook(raw) if raw[1] or raw[2] else None

    def peers(self, cascade_hash: bytes) -> list[PeerRecord] | None:
        """All live peers of one swarm (good first), or ``None`` for an unknown swarm."""
        summary = self.swarm(cascade_hash)
        return None if summary is None else list(summary.peers)

    # --- counters -----------------------------------------------------------

    def count_request(self, protocol: str, command: str, status: int) -> None:
        with self._lock:
            self._requests[(protocol, command, status)] += 1

    def count_error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1

    def counters(self) -> Counters:
        with self._lock:
            return Counters(
                dict(self._requests), dict(self._errors), len(self._swarms), self._peer_count, self._completions
            )

    # --- persistence --------------------------------------------------------

    def take_changes(self) -> dict[tuple[bytes, bytes], tuple[float, bool] | None]:
        """What changed since the last call: (hash, key) -> (last seen, good), or None if gone."""
        with self._lock:
            changes, self._changes = self._changes, {}
            return changes

    def restore(self, rows: Iterable[tuple[bytes, bytes, float, bool]]) -> int:
        """Load saved peers (hash, key, last seen, good); skips expired or malformed rows.

        Returns how many peers were loaded. Meant for start-up, before serving.
        """
        now = self._clock()
        cutoff = now - self.limits.peer_ttl
        valid = [
            (float(last), bytes(h), bytes(k), bool(g))
            for h, k, last, g in rows
            if len(h) == HASH_SIZE and len(k) == PEER_KEY_SIZE and last >= cutoff and self.is_allowed(bytes(h))
        ]
        valid.sort()
        loaded = 0
        with self._lock:
            for last, h, k, g in valid:
                sw = self._swarms.get(h)
                if sw is None:
                    if len(self._swarms) >= self.limits.max_swarms:
                        continue
                    sw = self._swarms[h] = _Swarm(last)
                if k in sw.seen or len(sw.seen) >= self.limits.max_peers_per_swarm:
                    continue
                if self._peer_count >= self.limits.max_total_peers:
                    break
                self._swarms.move_to_end(h)
                sw.last_activity = max(sw.last_activity, last)
                sw.seen[k] = last
                (sw.good if g else sw.plain).add(k, k + pack_peer_record_tail(int(last), g), self._rnd)
                self._peer_count += 1
                loaded += 1
        return loaded

    def dump(self) -> list[tuple[bytes, bytes, float, bool]]:
        """Every peer as (hash, key, last seen, good), for a full save."""
        with self._lock:
            return [(h, k, last, k in sw.good.index) for h, sw in self._swarms.items() for k, last in sw.seen.items()]
