"""``--store redis://HOST:PORT/DB``: the swarms, allow list, counters and files in Redis.

Every tracker process on one Redis sees the same state, so a peer that
announced at tracker A is listed by tracker B at once. Keys (the ``{...}``
hash tag keeps a swarm's keys in one Redis Cluster slot)::

    cascade:{<hex>}:good      sorted set: 6-byte peer key -> last seen (UNIX s), subscribed peers
    cascade:{<hex>}:plain     sorted set: the same for peers only enrolled by a list request
    cascade:swarms            sorted set: 32-byte cascade hash -> last announce
    cascade:allow             set of allowed cascade hashes, in force while cascade:allow:on exists
                              (a tracker run with --allow writes both, and again if Redis lost them)
    cascade:requests          hash "protocol|command|status" -> count
    cascade:errors            hash kind -> count
    cascade:completions       integer: peers that turned from plain into good (a finished download)
    cascade:file:<hex>        string: an uploaded .cascade file's bytes
    cascade:files             hash hex -> JSON {size, data_length, block_size, block_count, stored_at}
    cascade:files:names       hash hex -> the data file's name (HSETNX: the first name given stays)
    cascade:files:bytes       integer: bytes of all stored files

An announce is ONE round trip: a Lua script that checks the allow list,
drops the swarm's expired members (``ZREMRANGEBYSCORE``), enrols the peer,
refreshes the keys' ``EXPIRE`` (an idle swarm vanishes by itself, so Python
never sweeps), samples the reply with ``ZRANDMEMBER`` (Redis >= 6.2) and counts the
request; it returns the sampled keys with their last-seen times, and the
12-byte records are packed here by the codec, the only place that knows them. The time comes from the
tracker's clock as an argument, not Redis ``TIME``, so a test clock works.

Redis going away: every call translates redis-py's ConnectionError and
TimeoutError into :class:`~tracker.store.StoreUnavailable` (socket timeouts
are short, and redis-py does not retry, so a request fails at once). One line
is logged when Redis goes away and one when it answers again; redis-py
reconnects by itself on the next call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cascade.errors import BadRequest, MetafileError, StartError, StoreUnavailable, UsageError
from cascade.wire import HASH_SIZE, PEER_RECORD_SIZE, PeerRecord, TrackerStatus, pack_peer_record_tail
from tracker.cascade_store import (
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_MAX_TOTAL_SIZE,
    StoredCascade,
    StoreFull,
    check_name,
    parse_upload,
)
from tracker.swarms import (
    AnnounceRefused,
    Counters,
    SwarmLimits,
    SwarmSummary,
    decode_record,
    peer_key,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Short on purpose: a request waits at most this long on a Redis that is gone
# or stuck, then gets an error status. Arbitrary, well above a loopback RTT.
SOCKET_TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.5
_PIPELINE_CHUNK = 512  # commands per pipeline when listing many swarms; arbitrary
# Every Redis error, not only a lost connection: an out-of-memory or read-only
# reply is an outage of the store too, and is logged once, not once per request.
_DOWN_ERRORS = (redis.exceptions.RedisError,)
# While Redis is down, one request per this many seconds tries it; the others
# fail at once instead of each waiting for a connect timeout. Arbitrary.
PROBE_INTERVAL = 0.25
_MIN_REDIS = (6, 2)  # ZRANDMEMBER
_ALLOW_LIST_LOST = 9  # a status of the announce script only, never sent to a client

_ANNOUNCE_LUA = """
-- KEYS: good, plain, swarms, allow, allow:on, requests, errors, completions
-- ARGV: hash, peer key, subscribe (1/0), now, cutoff, key ttl (s), max peers,
--       max swarms, max peers per swarm, counter field prefix, this tracker has an allow list (1/0)
local good, plain, swarms = KEYS[1], KEYS[2], KEYS[3]
local h, key, field = ARGV[1], ARGV[2], ARGV[10]
local cutoff = tonumber(ARGV[5])
local older = '(' .. ARGV[5]
local listed = redis.call('EXISTS', KEYS[5]) == 1
if ARGV[11] == '1' and not listed then
  return {9, 0}  -- the allow list vanished (Redis restarted empty): the caller writes it again
end
if listed and redis.call('SISMEMBER', KEYS[4], h) == 0 then
  redis.call('HINCRBY', KEYS[6], field .. '2', 1)
  return {2, 0}
end
local last = redis.call('ZSCORE', swarms, h)
if (not last) or tonumber(last) < cutoff then
  redis.call('ZREMRANGEBYSCORE', swarms, '-inf', older)
  local n = redis.call('ZCARD', swarms)
  if n >= tonumber(ARGV[8]) then
    redis.call('HINCRBY', KEYS[6], field .. '3', 1)
    redis.call('HINCRBY', KEYS[7], 'swarms_full', 1)
    return {3, n}
  end
end
redis.call('ZREMRANGEBYSCORE', good, '-inf', older)
redis.call('ZREMRANGEBYSCORE', plain, '-inf', older)
local is_good = redis.call('ZSCORE', good, key) ~= false
local known = is_good or redis.call('ZSCORE', plain, key) ~= false
if ARGV[3] == '1' and not is_good then
  if known then
    redis.call('ZREM', plain, key)
    redis.call('INCR', KEYS[8])
  end
  is_good = true
end
if not known and redis.call('ZCARD', good) + redis.call('ZCARD', plain) >= tonumber(ARGV[9]) then
  -- the swarm is full: the least recently seen peer makes room if it is stale (not seen for
  -- half the TTL), else a random listed-only peer, else a random seeder (as SwarmRegistry does:
  -- the oldest members are the honest seeders a flood of fake subscriptions would push out)
  local stale = (tonumber(ARGV[4]) + cutoff) / 2
  local g = redis.call('ZRANGE', good, 0, 0, 'WITHSCORES')
  local p = redis.call('ZRANGE', plain, 0, 0, 'WITHSCORES')
  local zkey, victim = good, nil
  if #p > 0 and (#g == 0 or tonumber(p[2]) < tonumber(g[2])) then zkey, victim = plain, p end
  if victim == nil then victim = g end
  if tonumber(victim[2]) >= stale then
    if #p > 0 then zkey = plain else zkey = good end
    victim = redis.call('ZRANDMEMBER', zkey, 1)
  end
  redis.call('ZREM', zkey, victim[1])
  redis.call('HINCRBY', KEYS[7], 'peers_evicted', 1)
end
local mine = plain
if is_good then mine = good end
redis.call('ZADD', mine, ARGV[4], key)
redis.call('EXPIRE', good, ARGV[6])
redis.call('EXPIRE', plain, ARGV[6])
redis.call('ZADD', swarms, ARGV[4], h)
local out = {}
local function take(zkey, want, mine_here)
  if want <= 0 then return end
  local ask = want
  if mine_here then ask = want + 1 end
  local res = redis.call('ZRANDMEMBER', zkey, ask, 'WITHSCORES')
  local got = 0
  for i = 1, #res, 2 do
    if got >= want then break end
    if res[i] ~= key then
      out[#out + 1] = res[i]
      out[#out + 1] = math.floor(tonumber(res[i + 1]))
      got = got + 1
    end
  end
end
local k = tonumber(ARGV[7])
take(good, k, is_good)
local goods = #out / 2
take(plain, k - goods, not is_good)
redis.call('HINCRBY', KEYS[6], field .. '0', 1)
-- keys and last-seen seconds; the caller packs the records with the codec (cascade/wire.py)
return {0, goods, out}
"""

_PUT_FILE_LUA = """
-- KEYS: file, files, names, bytes; ARGV: hex, data, meta JSON, name ('' for none), max total bytes
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[4]) end
  return {1, 0}
end
local size = string.len(ARGV[2])
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
if total + size > tonumber(ARGV[5]) then return {2, total} end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[4]) end
redis.call('INCRBY', KEYS[4], size)
return {0, total + size}
"""


def check_redis_url(url: str) -> str:
    """A ``redis://HOST:PORT/DB`` URL, checked; raises :class:`UsageError`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"bad Redis URL {url!r}: {exc}") from exc
    if parts.scheme != "redis" or not parts.hostname:
        raise UsageError(f"bad Redis URL {url!r}: expected redis://HOST:PORT/DB")
    del port
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise UsageError(f"bad Redis URL {url!r}: the database must be a number, not {db!r}")
    return url


class Health:
    """Whether Redis answered last time; logs one line per change, not one per request.

    While down, :meth:`check` lets one caller per :data:`PROBE_INTERVAL` try
    Redis and fails the others at once (a circuit breaker), so a Redis that
    drops packets does not make every request wait for a timeout.
    """

    def __init__(self, label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.down = False
        self._clock = clock
        self._next_probe = 0.0
        self._lock = threading.Lock()

    def _error(self) -> StoreUnavailable:
        return StoreUnavailable(f"tracker store unavailable (redis at {self.label}); try again later")

    def check(self) -> None:
        """Raise :class:`StoreUnavailable` at once while down, except for one probe per interval."""
        if not self.down:
            return
        now = self._clock()
        with self._lock:
            if now < self._next_probe:
                raise self._error()
            self._next_probe = now + PROBE_INTERVAL

    def failed(self, exc: Exception) -> StoreUnavailable:
        with self._lock:
            self._next_probe = self._clock() + PROBE_INTERVAL
            if not self.down:
                self.down = True
                log.warning("redis at %s unavailable (%s); answering errors until it is back", self.label, exc)
        return self._error()

    def ok(self) -> None:
        with self._lock:
            if self.down:
                self.down = False
                log.warning("redis at %s is back", self.label)


class _Keys:
    """Key names under one prefix (tests may use another)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.swarms = prefix + "swarms"
        self.allow = prefix + "allow"
        self.allow_on = prefix + "allow:on"
        self.requests = prefix + "requests"
        self.errors = prefix + "errors"
        self.completions = prefix + "completions"
        self.files = prefix + "files"
        self.names = prefix + "files:names"
        self.file_bytes = prefix + "files:bytes"

    def groups(self, cascade_hash: bytes) -> tuple[str, str]:
        tag = f"{self.prefix}{{{cascade_hash.hex()}}}:"
        return tag + "good", tag + "plain"

    def file(self, hx: str) -> str:
        return f"{self.prefix}file:{hx}"


def _as_bytes(value: object) -> bytes:
    """A Redis reply (bytes, since the client never decodes), typed as such."""
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes from redis, got {type(value).__name__}")
    return value


def _pack_records(goods: int, flat: list[Any]) -> bytes:
    """The reply body from the script's ``[key, last seen, key, last seen, ...]``, good peers first."""
    tail = pack_peer_record_tail
    return b"".join(flat[i] + tail(flat[i + 1], i < 2 * goods) for i in range(0, len(flat), 2))


def _record(key: bytes, score: float, good: bool) -> PeerRecord:
    return PeerRecord.decode(key + int(score).to_bytes(4, "big") + bytes((int(good), 0)))


class RedisSwarmStore:
    """A :class:`~tracker.store.SwarmStore` in Redis; every method may raise :class:`StoreUnavailable`."""

    def __init__(
        self,
        client: redis.Redis,
        limits: SwarmLimits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        prefix: str = "cascade:",
        label: str = "?",
    ) -> None:
        self._limits = limits or SwarmLimits()
        self._client = client
        self._clock = clock
        self._keys = _Keys(prefix)
        self._health = Health(label)
        self._announce = client.register_script(_ANNOUNCE_LUA)
        self._announce_sha = self._announce.sha.encode()
        self._key_ttl = str(math.ceil(self._limits.peer_ttl) + 1)  # whole seconds, past the last member's life
        self._allowed: frozenset[bytes] | None = None  # this tracker's --allow list, written again if Redis lost it

    @property
    def limits(self) -> SwarmLimits:
        return self._limits

    @property
    def health(self) -> Health:
        return self._health

    def _call(self, fn: Callable[[], _T]) -> _T:
        """``fn()``, with Redis being down translated to :class:`StoreUnavailable`."""
        self._health.check()
        try:
            out = fn()
        except _DOWN_ERRORS as exc:
            raise self._health.failed(exc) from exc
        if self._health.down:
            self._health.ok()
        return out

    # --- policy -------------------------------------------------------------

    def set_allowed(self, allowed: frozenset[bytes] | None) -> None:
        """Replace the shared allow list (``None``: every hash). Raises :class:`StoreUnavailable`.

        The list is remembered: should Redis restart empty, the next request
        writes it again (never "every hash allowed" by accident).
        """
        k = self._keys
        self._allowed = allowed

        def write() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(k.allow, k.allow_on)
            if allowed is not None:
                if allowed:
                    pipe.sadd(k.allow, *allowed)
                pipe.set(k.allow_on, b"1")
            return pipe.execute()

        self._call(write)

    def is_allowed(self, cascade_hash: bytes) -> bool:
        k = self._keys

        def check() -> Any:
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(k.allow_on)
            member: Any = cascade_hash  # redis-py's hints say str; bytes are sent as they are
            pipe.sismember(k.allow, member)
            return pipe.execute()

        on, member = self._call(check)
        if not on and self._allowed is not None:  # Redis lost the list: write it again
            self.set_allowed(self._allowed)
            return cascade_hash in self._allowed
        return not on or bool(member)

    # --- announces -----------------------------------------------------------

    def announce(
        self,
        cascade_hash: bytes,
        ip: str,
        port: int,
        subscribe: bool,
        protocol: str = "api",
        source_ip: str | None = None,
    ) -> list[PeerRecord]:
        """As :meth:`SwarmRegistry.announce`; also raises :class:`StoreUnavailable`."""
        if len(cascade_hash) != HASH_SIZE:
            raise BadRequest(f"cascade hash must be {HASH_SIZE} bytes, not {len(cascade_hash)}")
        if source_ip is not None and ip == "0.0.0.0":
            ip = source_ip
        body = self.announce_packed(cascade_hash, peer_key(ip, port), subscribe, protocol)
        return [decode_record(body[i : i + PEER_RECORD_SIZE]) for i in range(0, len(body), PEER_RECORD_SIZE)]

    def announce_packed(self, cascade_hash: bytes, key: bytes, subscribe: bool, protocol: str = "tcp") -> bytes:
        """One round trip: the Lua script enrols, expires, samples and counts. Raises AnnounceRefused."""
        command = "subscribe" if subscribe else "list"
        now = self._clock()
        limits = self._limits
        k = self._keys
        keys = [*k.groups(cascade_hash), k.swarms, k.allow, k.allow_on, k.requests, k.errors, k.completions]
        args = [
            cascade_hash,
            key,
            b"1" if subscribe else b"0",
            repr(now),
            repr(now - limits.peer_ttl),
            self._key_ttl,
            limits.max_peers,
            limits.max_swarms,
            limits.max_peers_per_swarm,
            f"{protocol}|{command}|",
            b"0" if self._allowed is None else b"1",
        ]
        self._health.check()
        try:
            reply = self._evalsha(keys, args)
        except _DOWN_ERRORS as exc:
            raise self._health.failed(exc) from exc
        if self._health.down:
            self._health.ok()
        if reply[0] == _ALLOW_LIST_LOST and self._allowed is not None:
            self.set_allowed(self._allowed)
            reply = self._call(lambda: self._evalsha(keys, args))
        status, value = reply[0], reply[1]
        if status == 0:
            return _pack_records(value, reply[2])
        if status == TrackerStatus.NOT_ALLOWED:
            raise AnnounceRefused(TrackerStatus.NOT_ALLOWED, f"cascade hash {cascade_hash.hex()} is not tracked here")
        if status == TrackerStatus.FULL:
            raise AnnounceRefused(TrackerStatus.FULL, f"tracker full: {value} swarms")
        raise StoreUnavailable("the allow list could not be written to redis; try again later")

    def _evalsha(self, keys: list[str], args: list[Any]) -> Any:
        """The announce script: EVALSHA packed here and sent on a pooled connection.

        The hot path skips redis-py's command packing and Script wrapper
        (measured: about a third of the tracker's CPU per Redis announce went
        into them); the connection, its timeouts and its reply parser are
        still redis-py's. A Redis that lost its scripts (NOSCRIPT) gets the
        script loaded again. Raises redis-py's errors.
        """
        parts = [b"EVALSHA", self._announce_sha, b"%d" % len(keys)]
        parts += [k.encode() for k in keys]
        parts += [a if isinstance(a, bytes) else str(a).encode() for a in args]
        packed = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        pool = self._client.connection_pool
        conn: Any = pool.get_connection()  # redis-py leaves send_packed_command untyped
        try:
            try:
                conn.send_packed_command([packed])
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                self._client.script_load(_ANNOUNCE_LUA)
                conn.send_packed_command([packed])
                return conn.read_response()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            conn.disconnect()  # as redis-py does: a broken connection never goes back to the pool
            raise
        finally:
            pool.release(conn)

    def remove(self, cascade_hash: bytes, ip: str, port: int, protocol: str = "api") -> bool:
        """As :meth:`SwarmRegistry.remove`: one pipeline drops the peer from both groups and counts it."""
        if len(cascade_hash) != HASH_SIZE:
            raise BadRequest(f"cascade hash must be {HASH_SIZE} bytes, not {len(cascade_hash)}")
        key: Any = peer_key(ip, port)  # redis-py's hints say str; bytes are sent as they are
        good, plain = self._keys.groups(cascade_hash)

        def drop() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.zrem(good, key)
            pipe.zrem(plain, key)
            pipe.hincrby(self._keys.requests, f"{protocol}|stopped|0", 1)
            return pipe.execute()

        in_good, in_plain, _count = self._call(drop)
        return bool(in_good or in_plain)

    def now(self) -> float:
        return self._clock()

    def sweep(self, max_swarms: int = 64) -> None:
        """Nothing to do: Redis expires idle swarms' keys, and announces trim the rest."""

    # --- reading ---------------------------------------------------------------

    def _live_hashes(self, cutoff: float) -> list[bytes]:
        raw = self._call(lambda: self._client.zrevrangebyscore(self._keys.swarms, "+inf", repr(cutoff)))
        return [_as_bytes(h) for h in raw]

    def _summaries(self, hashes: list[bytes], cutoff: float) -> list[SwarmSummary]:
        out: list[SwarmSummary] = []
        low = repr(cutoff)
        for start in range(0, len(hashes), _PIPELINE_CHUNK):
            chunk = hashes[start : start + _PIPELINE_CHUNK]

            def fetch(chunk: list[bytes] = chunk) -> Any:
                pipe = self._client.pipeline(transaction=False)
                for h in chunk:
                    good, plain = self._keys.groups(h)
                    pipe.zrevrangebyscore(good, "+inf", low, withscores=True)
                    pipe.zrevrangebyscore(plain, "+inf", low, withscores=True)
                    pipe.zscore(self._keys.swarms, h)
                return pipe.execute()

            replies: list[Any] = self._call(fetch)
            for i, h in enumerate(chunk):
                good_rows, plain_rows, last = replies[3 * i : 3 * i + 3]
                good_peers = [_record(m, s, True) for m, s in good_rows]
                plain_peers = [_record(m, s, False) for m, s in plain_rows]
                if good_peers or plain_peers:
                    last_activity = float(last) if last is not None else cutoff
                    out.append(
                        SwarmSummary(h, len(good_peers), len(plain_peers), last_activity, (*good_peers, *plain_peers))
                    )
        return out

    def swarms(self) -> list[SwarmSummary]:
        cutoff = self._clock() - self._limits.peer_ttl
        return self._summaries(self._live_hashes(cutoff), cutoff)

    def swarm(self, cascade_hash: bytes) -> SwarmSummary | None:
        cutoff = self._clock() - self._limits.peer_ttl
        found = self._summaries([cascade_hash], cutoff)
        return found[0] if found else None

    def peers(self, cascade_hash: bytes) -> list[PeerRecord] | None:
        summary = self.swarm(cascade_hash)
        return None if summary is None else list(summary.peers)

    # --- counters ---------------------------------------------------------------

    def count_request(self, protocol: str, command: str, status: int) -> None:
        field = f"{protocol}|{command}|{status}"
        # A count lost while Redis is down is acceptable; Health already logged that it is down.
        with contextlib.suppress(StoreUnavailable):
            self._call(lambda: self._client.hincrby(self._keys.requests, field, 1))

    def count_error(self, kind: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # as in count_request
            self._call(lambda: self._client.hincrby(self._keys.errors, kind, 1))

    def counters(self) -> Counters:
        """Counters of every tracker on this Redis; the peer gauge costs two commands per live swarm."""
        k = self._keys
        cutoff = self._clock() - self._limits.peer_ttl
        low = repr(cutoff)

        def fetch() -> Any:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(k.requests)
            pipe.hgetall(k.errors)
            pipe.get(k.completions)
            return pipe.execute()

        raw_requests, raw_errors, completions = self._call(fetch)
        requests: dict[tuple[str, str, int], int] = {}
        for field, n in raw_requests.items():
            protocol, command, status = bytes(field).decode("utf-8", "replace").split("|")
            requests[(protocol, command, int(status))] = int(n)
        errors = {bytes(kind).decode("utf-8", "replace"): int(n) for kind, n in raw_errors.items()}
        hashes = self._live_hashes(cutoff)
        peers = 0
        for start in range(0, len(hashes), _PIPELINE_CHUNK):
            chunk = hashes[start : start + _PIPELINE_CHUNK]

            def count(chunk: list[bytes] = chunk) -> Any:
                pipe = self._client.pipeline(transaction=False)
                for h in chunk:
                    for group in k.groups(h):
                        pipe.zcount(group, low, "+inf")
                return pipe.execute()

            peers += sum(self._call(count))
        return Counters(requests, errors, len(hashes), peers, int(completions or 0))

    def close(self) -> bool:
        """Close the connections (the state stays in Redis)."""
        self._client.close()
        return True


class RedisCascadeFiles:
    """A :class:`~tracker.store.CascadeFiles` in Redis, shared by every tracker on it."""

    def __init__(
        self,
        store: RedisSwarmStore,
        *,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        max_total_size: int = DEFAULT_MAX_TOTAL_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_file_size = max_file_size
        self.max_total_size = max_total_size
        self._store = store
        self._client = store._client
        self._keys = store._keys
        self._clock = clock
        self._put = self._client.register_script(_PUT_FILE_LUA)

    def put(self, data: bytes, name: str | None = None) -> tuple[StoredCascade, bool]:
        """As :meth:`CascadeStore.put`; also raises :class:`StoreUnavailable`."""
        if len(data) > self.max_file_size:
            raise BadRequest(f".cascade file is {len(data)} bytes, the limit is {self.max_file_size}")
        if name is not None:
            check_name(name)
        cf = parse_upload(data, "upload")
        hx = cf.cascade_hash.hex()
        meta = json.dumps(
            {
                "size": len(data),
                "data_length": cf.data_length,
                "block_size": cf.block_size,
                "block_count": cf.block_count,
                "stored_at": self._clock(),
                "members": len(cf.member_hashes),
            }
        )
        k = self._keys
        status, total = self._store._call(
            lambda: self._put(
                keys=[k.file(hx), k.files, k.names, k.file_bytes],
                args=[hx, data, meta, (name or "").encode("utf-8"), self.max_total_size],
            )
        )
        if status == 2:
            raise StoreFull(f"storage full ({total} of {self.max_total_size} bytes used)")
        entry = self.get(cf.cascade_hash)
        if entry is None:  # removed between the two calls (by hand); report what we stored
            raise StoreUnavailable(f"{hx}.cascade vanished from redis right after it was stored")
        return entry, status == 0

    @staticmethod
    def _entry(cascade_hash: bytes, meta: bytes, name: bytes | None) -> StoredCascade:
        try:
            doc = json.loads(meta)
            return StoredCascade(
                cascade_hash,
                None if name is None else bytes(name).decode("utf-8", "replace"),
                int(doc["size"]),
                int(doc["data_length"]),
                int(doc["block_size"]),
                int(doc["block_count"]),
                float(doc["stored_at"]),
                int(doc.get("members", 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MetafileError(f"redis holds malformed metadata for {cascade_hash.hex()}: {exc}") from exc

    def get(self, cascade_hash: bytes) -> StoredCascade | None:
        hx = cascade_hash.hex()

        def fetch() -> Any:
            pipe = self._client.pipeline(transaction=False)
            pipe.hget(self._keys.files, hx)
            pipe.hget(self._keys.names, hx)
            return pipe.execute()

        meta, name = self._store._call(fetch)
        return None if meta is None else self._entry(cascade_hash, meta, name)

    def read(self, cascade_hash: bytes) -> bytes | None:
        data = self._store._call(lambda: self._client.get(self._keys.file(cascade_hash.hex())))
        return None if data is None else _as_bytes(data)

    def name_of(self, cascade_hash: bytes) -> str | None:
        name = self._store._call(lambda: self._client.hget(self._keys.names, cascade_hash.hex()))
        return None if name is None else _as_bytes(name).decode("utf-8", "replace")

    def entries(self) -> list[StoredCascade]:
        def fetch() -> Any:
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(self._keys.files)
            pipe.hgetall(self._keys.names)
            return pipe.execute()

        metas, names = self._store._call(fetch)
        out = [self._entry(bytes.fromhex(bytes(hx).decode()), m, names.get(hx)) for hx, m in metas.items()]
        return sorted(out, key=lambda e: e.stored_at, reverse=True)

    def __len__(self) -> int:
        return int(self._store._call(lambda: self._client.hlen(self._keys.files)))

    def close(self) -> None:
        """Nothing to release: the files stay in Redis, the connections belong to the swarm store."""


def connect(url: str) -> redis.Redis:
    """A client with short timeouts and no retries (a request must fail at once, not after backoffs)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


def open_redis(
    url: str,
    limits: SwarmLimits,
    allowed: frozenset[bytes] | None,
    *,
    clock: Callable[[], float] = time.time,
    prefix: str = "cascade:",
) -> tuple[RedisSwarmStore, RedisCascadeFiles]:
    """Connect, check the server, and write ``allowed`` (the ``--allow`` list) when given.

    Without ``allowed`` the list already in Redis (set by another tracker's
    ``--allow``) stays in force. Raises :class:`StartError` when Redis cannot
    be reached or is older than 6.2.
    """
    client = connect(url)
    try:
        info = client.info("server")
        version = tuple(int(x) for x in str(info["redis_version"]).split(".")[:2])
    except _DOWN_ERRORS as exc:
        client.close()
        raise StartError(f"cannot reach redis at {url}: {exc}") from exc
    except redis.exceptions.RedisError as exc:
        client.close()
        raise StartError(f"redis at {url} refused to answer: {exc}") from exc
    if version < _MIN_REDIS:
        client.close()
        raise StartError(f"redis at {url} is version {info['redis_version']}; the tracker needs 6.2 or later")
    store = RedisSwarmStore(client, limits, clock=clock, prefix=prefix, label=url)
    if allowed is not None:
        try:
            store.set_allowed(allowed)
        except StoreUnavailable as exc:
            client.close()
            raise StartError(f"cannot write the allow list to redis at {url}: {exc}") from exc
    return store, RedisCascadeFiles(store, clock=clock)
