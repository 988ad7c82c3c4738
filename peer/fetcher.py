"""The downloader: fetch the missing blocks of one ``.cascade`` from many peers at once.

Shape:

- Connects are non-blocking and many at once (:class:`_Connector`, polled by
  the coordinator), good and recently seen peers first: thousands of dead
  addresses from a tracker cost seconds, not session slots. An unreachable
  address leaves the candidates for a small "retry later" record; both are
  capped, and a huge tracker reply is sampled. With a slot free and no
  candidate left, the tracker is asked again at once.
- One thread per peer connection (up to ``max_peers``). It does blocking
  ``recv_into`` with the GIL released, so connections overlap on every core.
  A connection keeps several requests in flight (PROTOCOL.md section 5,
  ``KEEPOPEN``); the depth follows the peer's measured throughput. A server
  that closes after each response is detected on the first connection and is
  then asked one block per connection.
- A shared :class:`_Scheduler` hands out blocks that are neither verified
  nor requested, at random among the next quarter of the missing ones (so
  peers downloading the same file hold different blocks and can trade them),
  in O(1) per block however large the file; in file order while only one
  peer answers us (peers the tracker lists but that are gone do not count).
  When none is left the endgame begins: a peer may ask for blocks other
  peers are still sending, and the first verified copy wins. No peer holds
  a block hostage.
- A :class:`_PrefixHasher` thread computes the whole-file SHA-256 over the
  verified prefix as it grows, so little is left to hash at the end. It is
  woken once per few MiB of verified blocks, not once per block.
- Responses are read through a small buffer, so many small blocks come in
  with one ``recv``; a large body is read straight into a per-connection
  block buffer. Either way the bytes are hashed and written from a
  ``memoryview``: :meth:`BlockStore.write_block` verifies the SHA-256 before
  ``os.pwrite``, so unverified bytes never touch the data file.
- A peer that sends a wrong length, a corrupt block or garbage is dropped;
  after ``ban_after`` offences it is banned for the rest of the run.
- A response has a deadline as a whole (from the peer's measured rate), not
  per ``recv``: a byte a second cannot hold a slot. A peer far slower than the
  median gives its slot to an untried candidate (:func:`pick_evictee`).

Memory is bounded by connections, not by the file: one read buffer and one
block buffer per connection, a 4 MiB hashing buffer, plus 4 bytes per
missing block.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import selectors
import socket
import struct
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cascade.errors import BlockHashMismatch, CascadeError, CascadeTimeout, DataError, from_os_error
from cascade.wire import BLOCK_MAGIC, BLOCK_RESPONSE_HEADER_SIZE, KEEPOPEN, BlockStatus
from peer.ratelimit import TokenBucket
from peer.storage import BlockStore

log = logging.getLogger("peer.fetch")

PeerAddr = tuple[str, int]
# What the tracker tells about a peer: (ip, port, good) or (ip, port, good, last_seen).
PeerInfo = tuple[str, int, bool] | tuple[str, int, bool, int]

_HEADER = struct.Struct(">BQ")
_REQUEST_PREFIX = BLOCK_MAGIC + KEEPOPEN + bytes(8)
# For a server that rejects the KEEPOPEN marker (it should ignore reserved bytes, but may not).
_PLAIN_PREFIX = BLOCK_MAGIC + bytes(16)
# An error message longer than this is not a message: the peer is sending garbage.
MAX_MESSAGE = 64 << 10
# Responses are read through a buffer of this size: a recv brings in many
# small blocks at once, while a large body goes straight to the block buffer.
READ_BUFFER = 128 << 10
# With blocks of up to half that size the buffer holds 16 blocks, up to this:
# fewer recv calls (and buffer compactions) per block.
READ_BUFFER_MAX = 1 << 20
# All connections' block buffers together stay under this (it matters only for huge blocks).
BLOCK_BUFFERS_LIMIT = 512 << 20
# With several peers, blocks are picked at random among the next quarter of
# the missing blocks (see _Scheduler): a trade-off between variety in the
# swarm and how much whole-file hashing is left for the end.
SWARM_WINDOW = 0.25
# Peers whose last_seen falls in the same bucket of this many seconds count as
# equally recent (arbitrary: finer ordering would only defeat the random spread).
RECENT_BUCKET = 60
# While connects are pending, the coordinator polls them this often (arbitrary:
# short enough that a refused address costs no waiting, long enough to stay idle).
CONNECT_POLL = 0.02
# The ranking of candidates is rebuilt at least this often (arbitrary: backoffs of 0.2 s
# and more expire about on time, while a ranking of thousands is not redone per connect).
QUEUE_TTL = 0.25
# Connect attempts per coordinator pass at most (arbitrary: bounds one pass to a few ms).
LAUNCH_BATCH = 512


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Limits and timeouts of one download; the defaults live here and nowhere else."""

    max_peers: int = 8
    # Give up when no block was verified for this long.
    stall_timeout: float = 60.0
    # Connects are non-blocking and run side by side (up to max_connecting), each
    # with this deadline: a peer that does not answer a SYN in 1.5 s is not worth a slot.
    connect_timeout: float = 1.5
    max_connecting: int = 128
    # Before a peer's throughput is known, its first whole response may take this long.
    first_response_timeout: float = 4.0
    # Once it is known, a whole response may take timeout_factor x its expected time, at least this.
    min_response_timeout: float = 2.0
    timeout_factor: float = 6.0
    ban_after: int = 2
    backoff_min: float = 0.2
    backoff_max: float = 10.0
    # An address never reached (refused or ignored our connect) is left alone this long,
    # doubling up to dead_retry_max: with thousands listed, retrying them soon crowds out
    # the addresses not tried yet.
    dead_retry: float = 5.0
    dead_retry_max: float = 30.0
    # Candidates kept at once (a huge tracker reply is sampled, best first), and
    # addresses remembered as unreachable: memory stays bounded whatever the tracker sends.
    max_candidates: int = 8192
    max_dead: int = 65536
    # Ask the tracker again after relist_min, doubling up to relist_max.
    relist_min: float = 0.5
    relist_max: float = 15.0
    # With a free slot and no candidate left, ask again after relist_hungry; doubled
    # while the lists bring no new address (see next_hungry_gap).
    relist_hungry: float = 0.01
    # A peer whose rate is below evict_ratio x the median of the others loses its
    # slot to an untried candidate (judged after evict_after s, one per evict_every s).
    evict_ratio: float = 0.125
    evict_after: float = 2.0
    evict_every: float = 1.0
    evict_cooldown: float = 5.0
    # Bytes per second over all connections; None for no limit.
    max_download_rate: int | None = None
    # A peer that answered "not present" is not asked for that block again for this long.
    lack_ttl: float = 1.0
    # The lowest missing block holds up the whole-file hash: when it has been in
    # flight this long, a second peer is asked for it too (see _Scheduler._race_head).
    # Twice target_latency: a healthy pipeline delivers it sooner.
    head_late: float = 0.4
    # Requests in flight per connection: enough for target_latency of data at the
    # measured rate, within [2, max_depth] and at most inflight_bytes.
    target_latency: float = 0.2
    inflight_bytes: int = 8 << 20
    max_depth: int = 128


@dataclass(slots=True)
class FetchResult:
    """What a download did; ``complete`` is True only when the whole-file hash matched."""

    complete: bool
    bytes_downloaded: int
    blocks_downloaded: int
    blocks_total: int
    blocks_resumed: int
    seconds: float
    sources: dict[str, int]
    banned: list[str]

    def as_json(self) -> dict[str, object]:
        return {
            "complete": self.complete,
            "bytes_downloaded": self.bytes_downloaded,
            "seconds": round(self.seconds, 4),
            "blocks_downloaded": self.blocks_downloaded,
            "blocks_total": self.blocks_total,
            "blocks_resumed": self.blocks_resumed,
            "sources": self.sources,
            "banned": self.banned,
        }


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for progress bars, taken a few times per second."""

    verified_bytes: int
    total_bytes: int
    peers: int


# --- per-peer state -----------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Peer:
    """What we know about one peer across its connections."""

    addr: PeerAddr
    good: bool = False
    # UNIX seconds the tracker last heard of it (0: unknown).
    last_seen: int = 0
    # A connect attempt is pending (see _Connector).
    connecting: bool = False
    # Why it was banned, for the final error line.
    ban_reason: str = ""
    # It answered a request (a block or "not present"): a live member of the swarm.
    answered: bool = False
    order: float = field(default_factory=random.random)
    sessions: int = 0
    banned: bool = False
    is_self: bool = False
    offences: int = 0
    failures: int = 0
    next_try: float = 0.0
    # None until known: True once a connection answered twice, False for close-after-response servers.
    keepopen: bool | None = None
    connected_once: bool = False
    # Send requests without the KEEPOPEN marker (the server rejected it).
    plain: bool = False
    # Blocks and bytes delivered, folded in from its sessions (under Fetcher._lock).
    blocks: int = 0
    bytes: int = 0
    not_present: int = 0
    # Blocks in flight on any of its sessions (endgame never asks one peer twice).
    own: set[int] = field(default_factory=set)
    lacks: set[int] = field(default_factory=set)
    lacks_since: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"


@dataclass(eq=False, slots=True)
class _Session:
    """One worker thread talking to one peer, over one connection at a time."""

    peer: _Peer
    outstanding: deque[int] = field(default_factory=deque)
    sock: socket.socket | None = None
    started: float = 0.0
    # Its slot was given to an untried peer (see _pick_evictee): not a failure of the peer.
    evicted: bool = False
    # Throughput in bytes/s, 0 until measured over a window of at least 0.1 s.
    rate: float = 0.0
    win_start: float = 0.0
    win_bytes: int = 0
    blocks: int = 0
    bytes: int = 0
    not_present: int = 0


class _Offence(Exception):
    """The peer broke the protocol or sent bad data: drop it and count an offence."""


class _Drop(Exception):
    """The peer cannot help right now (refused, timed out, closed): drop it with backoff."""


class _Downgrade(Exception):
    """The peer needs a simpler way of asking: reconnect at once in that mode."""


class _Closed(Exception):
    """The peer closed the connection; ``partial`` bytes of a frame had arrived."""

    def __init__(self, partial: int) -> None:
        super().__init__("closed the connection")
        self.partial = partial


# --- block scheduling ---------------------------------------------------------


class _Scheduler:
    """Which block to ask whom for. Every method is O(1) per block, except the endgame scan.

    Blocks are handed out at random from a *window*: the next ``window_size``
    missing blocks in file order, a quarter of the file (``SWARM_WINDOW``):
    wide enough that fetchers hold different blocks and trade them, narrow
    enough that the whole-file hash follows behind the download instead of
    re-reading the whole file at the end. While a single peer answers us
    nobody needs variety: blocks then go out strictly in file order
    (``sequential``), and the hash keeps right up with the download. The
    fetcher decides the mode from the peers that answer, not from the peers
    listed: the tracker keeps listing fetchers that are long gone.
    ``inflight`` counts the outstanding requests per block.
    """

    def __init__(self, store: BlockStore, lack_ttl: float, head_late: float = 0.4) -> None:
        self.store = store
        self.valid = store.valid
        count = self.block_count = store.cf.block_count
        self.rest = array("I" if count < 1 << 32 else "Q", store.missing())
        self.cursor = 0
        self.window: list[int] = []
        # Blocks that came back "not present": probably rare in the swarm.
        self.rare: list[int] = []
        self.window_size = len(self.rest)
        # In file order while a single peer serves us (see the class docstring).
        self.sequential = False
        self.inflight: dict[int, int] = {}
        # Blocks this run delivered; two endgame copies may both be written, only one counts.
        self.delivered = bytearray(count)
        self.lock = threading.Lock()
        self.lack_ttl = lack_ttl
        # The lowest block not verified yet, where the whole-file hash waits; since when, and
        # whether a second copy was asked for.
        self.head = -1  # set by the first pick
        self.head_since = 0.0
        self.head_raced = -1
        self.head_late = head_late
        self.complete = threading.Event()
        # Wakes the prefix hasher once verified_count reaches hash_wake_at (see _PrefixHasher).
        self.progress = threading.Event()
        self.hash_wake_at = 0
        # Wakes the coordinator early: completion, or a session ended.
        self.wake = threading.Event()
        if store.complete:
            self.complete.set()

    def pick(self, peer: _Peer, want: int, now: float) -> list[int]:
        """Up to ``want`` blocks to request from ``peer`` (recorded as in flight)."""
        got: list[int] = []
        with self.lock:
            window, inflight, lacks, valid = self.window, self.inflight, peer.lacks, self.valid
            if lacks and now - peer.lacks_since > self.lack_ttl:
                lacks.clear()
            if not self.sequential and len(window) < self.window_size and self.cursor < len(self.rest):
                take = min(self.window_size - len(window), len(self.rest) - self.cursor)
                window.extend(self.rest[self.cursor : self.cursor + take])
                self.cursor += take
            self._race_head(peer, got, now)
            # Blocks some peer lacked go preferably to declared seeders, which have
            # them all; other peers first try the blocks nobody has refused yet.
            # (In sequential mode the window holds only blocks to retry.)
            first, second = (self.rare, window) if peer.good else (window, self.rare)
            _draw(first, want, got, lacks, valid, inflight)
            _draw(second, want, got, lacks, valid, inflight)
            if self.sequential:
                rest, cursor, skipped = self.rest, self.cursor, 0
                while len(got) < want and cursor < len(rest) and skipped < 64:
                    i = rest[cursor]
                    cursor += 1
                    if valid[i]:
                        continue
                    if i in lacks:
                        # This peer lacks it: keep it for a retry and look further on.
                        window.append(i)
                        skipped += 1
                        continue
                    inflight[i] = inflight.get(i, 0) + 1
                    got.append(i)
                self.cursor = cursor
            if not window and not self.rare and self.cursor >= len(self.rest) and len(got) < want and inflight:
                # Endgame: duplicate requests other peers have in flight, least-asked first.
                own = peer.own
                candidates = [(c, random.random(), i) for i, c in inflight.items() if i not in own and i not in lacks]
                candidates.sort()
                for _c, _r, i in candidates[: want - len(got)]:
                    inflight[i] += 1
                    got.append(i)
        peer.own.update(got)
        return got

    def _race_head(self, peer: _Peer, got: list[int], now: float) -> None:
        """Ask ``peer`` too for the lowest missing block when it is late (lock held).

        The whole-file hash cannot pass this block: a peer that sits on it
        (until its response timeout, seconds) would leave the rest of the file
        to hash after the download. One extra copy at most; amortised O(1).
        """
        valid, count, head = self.valid, self.block_count, max(self.head, 0)
        while head < count and valid[head]:
            head += 1
        if head != self.head:
            self.head, self.head_since = head, now
        if head >= count or head in peer.lacks or head in peer.own:
            return
        if self.inflight.get(head) == 1 and self.head_raced != head and now - self.head_since > self.head_late:
            self.head_raced = head
            self.inflight[head] = 2
            got.append(head)

    def release(self, i: int, lacked: bool = False) -> None:
        """A request for block ``i`` ended without this peer delivering it (``lacked``: status 2)."""
        with self.lock:
            c = self.inflight.get(i)
            if c is None:
                return
            if c > 1:
                self.inflight[i] = c - 1
                return
            del self.inflight[i]
            if not self.valid[i]:
                (self.rare if lacked else self.window).append(i)

    def done(self, i: int) -> bool:
        """Block ``i`` is verified and written; True for the first copy delivered."""
        with self.lock:
            self.inflight.pop(i, None)
            first = not self.delivered[i]
            self.delivered[i] = 1
        count = self.store.verified_count
        if count >= self.hash_wake_at:
            self.progress.set()
        if count == self.block_count:
            self.complete.set()
            self.wake.set()
        return first


def _draw(
    pool: list[int], want: int, got: list[int], lacks: set[int], valid: bytearray, inflight: dict[int, int]
) -> None:
    """Move random blocks from ``pool`` to ``got`` (and in flight) until ``want``, skipping ``lacks``."""
    misses = 0
    while len(got) < want and pool and misses < 16:
        j = random.randrange(len(pool))
        i = pool[j]
        if i in lacks:
            misses += 1
            continue
        last = pool.pop()
        if j < len(pool):
            pool[j] = last
        if valid[i]:
            continue
        inflight[i] = inflight.get(i, 0) + 1
        got.append(i)


class _PrefixHasher:
    """Computes the whole-file SHA-256 in the background, over the verified prefix as it grows.

    SHA-256 is sequential, so it can only advance while block ``next`` is
    verified; it re-reads those blocks from the page cache in chunks. At the
    end only the part behind the last gap is left to hash.

    When it has caught up it sleeps until ``batch`` more blocks are verified
    (about one chunk; the scheduler checks ``hash_wake_at``, one comparison
    per block) rather than being woken for every block: with small blocks,
    per-block thread hand-offs cost more than the hashing.
    """

    CHUNK = 4 << 20

    def __init__(self, store: BlockStore, sched: _Scheduler, stop: threading.Event) -> None:
        self.store = store
        self.sched = sched
        self.progress = sched.progress
        self.batch = max(1, min(self.CHUNK // max(store.cf.block_size, 1), 64))
        self.stop = stop
        self.sha = hashlib.sha256()
        self.next = 0
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name="prefix-hash", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _advance(self, buf: bytearray) -> bool:
        """Hash the verified blocks from ``next`` on; False when none was ready."""
        store, cf = self.store, self.store.cf
        valid, count, bs = store.valid, cf.block_count, cf.block_size
        per_chunk = max(1, len(buf) // bs)
        moved = False
        while self.next < count and valid[self.next]:
            end = self.next + 1
            while end < count and end - self.next < per_chunk and valid[end]:
                end += 1
            offset = self.next * bs
            stop = min(end * bs, cf.data_length)
            mv = memoryview(buf)
            while offset < stop:  # blocks larger than the buffer are read in pieces
                view = mv[: min(len(buf), stop - offset)]
                got = 0
                while got < len(view):
                    n = os.preadv(store.fd, [view[got:]], offset + got)
                    if n <= 0:
                        raise OSError(errno.EIO, "the data file is shorter than expected")
                    got += n
                self.sha.update(view)
                offset += len(view)
            self.next = end
            moved = True
        return moved

    def _run(self) -> None:
        buf = bytearray(self.CHUNK)
        try:
            store, sched, progress = self.store, self.sched, self.progress
            while not self.stop.is_set() and self.next < store.cf.block_count:
                if not self._advance(buf):
                    # Clear first: a block verified from here on sets the event again.
                    progress.clear()
                    sched.hash_wake_at = min(store.verified_count + self.batch, store.cf.block_count)
                    if not self._advance(buf):
                        progress.wait(0.05)
        except OSError as exc:
            self.error = exc

    def finish(self) -> bytes:
        """Join the thread, hash what is left and return the digest; raises ``OSError``."""
        behind = self.store.cf.block_count - self.next
        self.stop.set()
        self.progress.set()
        if self.thread.is_alive():
            self.thread.join()
        log.debug("whole-file hash: %d blocks behind when the last block arrived", behind)
        if self.error is not None:
            raise self.error
        self._advance(bytearray(self.CHUNK))
        if self.next < self.store.cf.block_count:
            raise OSError(errno.EIO, "finish() called before every block was verified")
        return self.sha.digest()


# --- reading responses ------------------------------------------------------


class _Reader:
    """Buffered reads of block responses from one socket, without trusting one ``recv``."""

    __slots__ = ("buf", "deadline", "hi", "lo", "mv", "scratch", "sock")

    def __init__(self, sock: socket.socket | None, block_size: int) -> None:
        self.sock: socket.socket = sock  # type: ignore[assignment]  # set by reset() before use
        small = block_size <= READ_BUFFER // 2
        self.buf = bytearray(max(READ_BUFFER, min(READ_BUFFER_MAX, 16 * block_size)) if small else READ_BUFFER)
        self.mv = memoryview(self.buf)
        self.lo = 0
        self.hi = 0
        # Bodies larger than half the read buffer are read straight into this.
        self.scratch = None if small else memoryview(bytearray(block_size))
        # time.monotonic() by which the current response must be complete: a
        # socket timeout alone bounds one recv, and a byte a second never trips it.
        self.deadline = float("inf")

    def _left(self) -> None:
        """Give the next recv what is left of the response's deadline; raises TimeoutError when none is."""
        if self.deadline != float("inf"):
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("response deadline passed")
            self.sock.settimeout(left)

    def reset(self, sock: socket.socket) -> None:
        """Read from a new connection, keeping the buffers."""
        self.sock = sock
        self.lo = self.hi = 0

    def _fill(self, n: int, exact: bool = False) -> None:
        """Make at least ``n`` (<= the buffer's size) bytes available from ``lo``; ``exact`` reads no more."""
        if self.hi - self.lo >= n:
            return
        if len(self.buf) - self.lo < n:
            size = self.hi - self.lo
            self.mv[:size] = self.mv[self.lo : self.hi]
            self.lo, self.hi = 0, size
        recv_into, mv = self.sock.recv_into, self.mv
        while self.hi - self.lo < n:
            self._left()
            got = recv_into(mv[self.hi : self.lo + n] if exact else mv[self.hi :])
            if not got:
                raise _Closed(self.hi - self.lo)
            self.hi += got

    def header(self) -> tuple[int, int]:
        # With large blocks, read just the header: the body then goes straight
        # into the block buffer instead of through this one (one copy less).
        self._fill(BLOCK_RESPONSE_HEADER_SIZE, exact=self.scratch is not None)
        status, length = _HEADER.unpack_from(self.buf, self.lo)
        self.lo += BLOCK_RESPONSE_HEADER_SIZE
        return status, length

    def body(self, n: int) -> memoryview:
        """The next ``n`` bytes; the view is valid until the next read."""
        if n <= len(self.buf) // 2 or self.scratch is None:
            if n > len(self.buf):
                raise _Offence(f"sent a {n}-byte message")
            self._fill(n)
            view = self.mv[self.lo : self.lo + n]
            self.lo += n
            return view
        scratch = self.scratch
        have = min(self.hi - self.lo, n)
        scratch[:have] = self.mv[self.lo : self.lo + have]
        self.lo += have
        if self.lo == self.hi:
            self.lo = self.hi = 0
        recv_into = self.sock.recv_into
        while have < n:
            self._left()
            got = recv_into(scratch[have:n])
            if not got:
                raise _Closed(have + 1)
            have += got
        return scratch[:n]


# --- choosing peers: small pure decisions, no I/O ---------------------------


def candidate_rank(p: _Peer) -> tuple[int, bool, bool, int, float]:
    """Sort key for connecting: least failures, peers that answered before, good, recently seen, random."""
    return (p.failures + p.offences, not p.answered, not p.good, -(p.last_seen // RECENT_BUCKET), p.order)


# A candidate from a tracker reply: address, good flag, last_seen, connects failed so far.
Candidate = tuple[PeerAddr, bool, int, int]


def sample_best(infos: list[Candidate], k: int) -> list[Candidate]:
    """The ``k`` best new addresses of a tracker reply, at random among equals.

    Never-failed first, then good, then recently seen. At random, so that a
    tracker reply larger than ``k`` yields a different sample each time it is
    asked for again, and the addresses not tried yet come before those that
    failed before.
    """
    if len(infos) <= k:
        return infos
    # Grouped by rank rather than sorted: O(n) for the 65,536 records a reply may hold.
    groups: dict[tuple[int, bool, int], list[Candidate]] = {}
    for info in infos:
        _addr, good, seen, failures = info
        groups.setdefault((-failures, good, seen // RECENT_BUCKET), []).append(info)
    out: list[Candidate] = []
    for rank in sorted(groups, reverse=True):
        group = groups[rank]
        left = k - len(out)
        if len(group) > left:
            out += random.sample(group, left)
            break
        random.shuffle(group)
        out += group
    return out


def next_hungry_gap(gap: float, new: int, downloading: bool, policy: FetchPolicy) -> float:
    """How soon to ask the tracker again while a slot is free and no candidate is left.

    Lists that brought ``new`` addresses are worth asking again at once;
    others less and less: up to ``relist_min / 2`` while nothing downloads
    (as before any peer is found), up to ``relist_max`` while a peer does.
    """
    if new:
        return policy.relist_hungry
    return min(policy.relist_max if downloading else policy.relist_min / 2, 2 * gap)


def connect_budget(free_slots: int, pending: int, failure_streak: int, limit: int) -> int:
    """How many more connects to start: one per free slot, plus one per recent failure.

    A swarm full of dead addresses widens the fan-out (up to ``limit``
    pending); a healthy one opens about as many connections as it can use.
    """
    if free_slots <= 0:
        return 0
    return max(0, min(limit, free_slots + failure_streak) - pending)


def pick_evictee(sessions: Iterable[_Session], now: float, policy: FetchPolicy) -> _Session | None:
    """The session to give up for an untried peer: far slower than the median of the others, or None.

    Only sessions older than ``evict_after`` are judged; the median is over
    those with a measured rate, and one that has not delivered a block yet
    counts as rate 0.
    """
    judged = [s for s in sessions if not s.evicted and now - s.started >= policy.evict_after]
    measured = sorted(s.rate for s in judged if s.rate > 0)
    if len(judged) < 2 or not measured:
        return None
    median = measured[len(measured) // 2]
    slowest = min(judged, key=lambda s: s.rate)
    if slowest.rate < policy.evict_ratio * median:
        return slowest
    return None


class _Connector:
    """Non-blocking connects to many addresses at once, each with its own deadline.

    A dead address costs a socket and a selector slot until it is refused
    or its deadline passes, never a thread or a session slot.
    """

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._pending: dict[socket.socket, tuple[PeerAddr, float]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, addr: PeerAddr, timeout: float) -> str | None:
        """Begin connecting to ``addr``; an error text when it failed at once, else None."""
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            return _describe(exc)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(addr)
        except OSError as exc:  # a name that does not resolve, an address of the wrong family
            sock.close()
            return _describe(exc)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            return os.strerror(err)
        self._pending[sock] = (addr, time.monotonic() + timeout)
        self._sel.register(sock, selectors.EVENT_WRITE)
        return None

    def poll(self, timeout: float) -> list[tuple[PeerAddr, socket.socket | None, str]]:
        """Wait up to ``timeout`` s; returns (addr, connected blocking socket or None, error) per finished connect."""
        done: list[tuple[PeerAddr, socket.socket | None, str]] = []
        if not self._pending:
            return done
        for key, _events in self._sel.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            addr, _deadline = self._pending.pop(sock)
            self._sel.unregister(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sock.close()
                done.append((addr, None, os.strerror(err)))
            else:
                sock.setblocking(True)
                done.append((addr, sock, ""))
        now = time.monotonic()
        for sock, (addr, deadline) in list(self._pending.items()):
            if deadline <= now:
                del self._pending[sock]
                self._sel.unregister(sock)
                sock.close()
                done.append((addr, None, "connect timed out"))
        return done

    def close(self) -> None:
        """Abandon every pending connect."""
        for sock in self._pending:
            self._sel.unregister(sock)
            sock.close()
        self._pending.clear()
        self._sel.close()


# --- the fetcher ------------------------------------------------------------


class Fetcher:
    """Download every missing block of ``store`` from the peers ``list_peers`` returns.

    ``list_peers`` is called from the fetcher's own thread, now and then; it
    returns ``(ip, port, good)`` or ``(ip, port, good, last_seen)`` tuples and
    may raise :class:`CascadeError` (logged, the download goes on with the
    peers already known).
    ``my_port`` is this process's serving port: a peer at a local address
    with that port is ourselves and never used.
    """

    def __init__(
        self,
        store: BlockStore,
        list_peers: Callable[[], Iterable[PeerInfo]],
        *,
        policy: FetchPolicy | None = None,
        my_port: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.cf = store.cf
        self.policy = policy or FetchPolicy()
        self._list_peers = list_peers
        self._my_port = my_port
        self._clock = clock
        self._sched = _Scheduler(store, self.policy.lack_ttl, self.policy.head_late)
        self._peers: dict[PeerAddr, _Peer] = {}
        self._stop = threading.Event()
        self._hash_stop = threading.Event()
        self._fatal: CascadeError | None = None
        self._threads: list[threading.Thread] = []
        self._sessions: set[_Session] = set()
        self._lock = threading.Lock()
        self._request_tail = self.cf.cascade_hash
        bs = self.cf.block_size
        self._max_depth = max(2, min(self.policy.max_depth, self.policy.inflight_bytes // max(bs, 1)))
        # Each connection holds one block buffer: huge blocks mean fewer connections.
        self._max_sessions = max(1, min(self.policy.max_peers, BLOCK_BUFFERS_LIMIT // max(bs, 1)))
        self._ever_connected = False
        self._last_peers = 0
        self._list_error: str | None = None
        # Addresses that refused or ignored a connect: address -> (retry at, failures), oldest first.
        self._dead: OrderedDict[PeerAddr, tuple[float, int]] = OrderedDict()
        self._connector = _Connector()
        # Connects failed in a row: widens the fan-out (see connect_budget).
        self._streak = 0
        self._hungry_gap = self.policy.relist_hungry
        self._last_evict = float("-inf")
        # Candidates ranked best last (see _next_candidates); rebuilt when stale or marked dirty.
        self._queue: list[_Peer] = []
        self._queue_until = float("-inf")
        self._queue_dirty = True
        rate = self.policy.max_download_rate
        self._bucket = TokenBucket(rate) if rate else None
        # Until a second peer answers, blocks go out in file order (see _update_mode).
        self._sched.sequential = True

    # --- public -------------------------------------------------------------

    def stop(self) -> None:
        """Ask a running :meth:`run` to return soon (thread-safe)."""
        self._stop.set()
        self._sched.complete.set()
        self._sched.wake.set()

    def add_peers(self, peers: Iterable[PeerInfo]) -> int:
        """Take candidates from a tracker reply; returns how many addresses were new.

        At most ``max_candidates`` are kept (the best, see :func:`sample_best`);
        an address that failed recently is skipped until its retry time.
        """
        now = self._clock()
        known, dead = self._peers, self._dead
        fresh: list[Candidate] = []
        seen: set[PeerAddr] = set()
        for info in peers:
            ip, port, good = info[0], info[1], info[2]
            last_seen = info[3] if len(info) == 4 else 0
            addr = (ip, port)
            if port == 0:
                continue
            p = known.get(addr)
            if p is not None:
                p.good = p.good or good
                p.last_seen = max(p.last_seen, last_seen)
                continue
            gone = dead.get(addr)
            if (gone is not None and gone[0] > now) or addr in seen:
                continue
            seen.add(addr)
            fresh.append((addr, good, last_seen, 0 if gone is None else gone[1]))
        room = max(0, self.policy.max_candidates - len(known))
        self._queue_dirty = True
        for addr, good, last_seen, failures in sample_best(fresh, room):
            p = known[addr] = _Peer(addr, good, last_seen, failures=failures)
            dead.pop(addr, None)
            if self._my_port is not None and addr[1] == self._my_port and _is_local(addr[0]):
                p.is_self = True
        return len(fresh)

    def _update_mode(self) -> None:
        """Random order over a window while two or more peers answer us, else file order.

        Counted are peers with a connection open that answered a request (a
        block or "not present"), not peers the tracker lists: finished
        fetchers stay listed long after they exit, and a fetch from one live
        seeder must not scatter its blocks (and leave the whole-file hash
        behind) because of them.
        """
        live = sum(1 for p in self._peers.values() if p.answered and p.sessions and not p.banned)
        sched = self._sched
        sequential = live < 2
        if sched.sequential == sequential:
            return
        with sched.lock:
            if not sequential:
                sched.window_size = max(4 * self._max_depth, int(len(sched.rest) * SWARM_WINDOW))
            sched.sequential = sequential
        log.debug("%d peers answer: blocks in %s order", live, "file" if sequential else "random")

    def run(self, on_tick: Callable[[Progress], None] | None = None, tick: float = 0.1) -> FetchResult:
        """Fetch until the file is complete and verified, or fail.

        Raises :class:`CascadeTimeout` when no block arrives within ``stall_timeout``,
        :class:`DataError` (e.g. disk full) and :class:`CascadeError` for a
        whole-file hash mismatch.
        """
        store, policy, clock = self.store, self.policy, self._clock
        start = clock()
        resumed = store.verified_count
        last_count, last_progress = resumed, start
        hasher = _PrefixHasher(store, self._sched, self._hash_stop)
        hasher.start()
        relist_every = policy.relist_min
        next_list = start + relist_every if self._peers else start
        last_list = start if self._peers else start - policy.relist_min
        try:
            while not self._sched.complete.is_set() and self._fatal is None:
                now = clock()
                if now >= next_list or (self._hungry(now) and now - last_list >= self._hungry_gap):
                    new = self._relist()
                    last_list = now
                    next_list = now + relist_every
                    relist_every = min(policy.relist_max, relist_every * 2)
                    self._hungry_gap = next_hungry_gap(self._hungry_gap, new, bool(self._sessions), policy)
                self._launch(now)
                self._update_mode()
                self._maybe_evict(now)
                count = store.verified_count
                if count != last_count:
                    last_count, last_progress = count, now
                elif now - last_progress > policy.stall_timeout:
                    raise CascadeTimeout(self._stall_message())
                if on_tick is not None:
                    on_tick(self._progress())
                wait = tick
                if self._hungry(now):  # wait only until the tracker may be asked again
                    wait = max(0.0, min(wait, last_list + self._hungry_gap - clock()))
                budget = connect_budget(self._free_slots(), len(self._connector), self._streak, policy.max_connecting)
                if self._queue and budget > 0:
                    wait = 0.0  # _launch stopped at LAUNCH_BATCH: go on at once
                if len(self._connector):
                    self._on_connects(self._connector.poll(min(wait, CONNECT_POLL)))
                else:
                    self._sched.wake.wait(wait)
                self._sched.wake.clear()
        finally:
            self._stop.set()
            self._sched.complete.set()
            self._shutdown()
            if not store.complete or self._fatal is not None:
                self._hash_stop.set()
        if self._fatal is not None:
            raise self._fatal
        if not store.complete:
            raise CascadeError("interrupted before the download completed")
        if on_tick is not None:
            on_tick(self._progress())
        finishing = clock()
        log.debug("all blocks verified in %.3f s", finishing - start)
        try:
            if os.fstat(store.fd).st_size != self.cf.data_length:
                os.ftruncate(store.fd, self.cf.data_length)
            digest = hasher.finish()
        except OSError as exc:
            raise from_os_error(exc, store.path, "finish the output file") from exc
        if digest != self.cf.file_hash:
            raise DataError(
                f"{store.path}: every block verified but the whole-file SHA-256 does not match the .cascade file"
            )
        log.debug("whole-file hash checked in %.3f s", clock() - finishing)
        for p in self._peers.values():
            if p.blocks or p.not_present:
                log.debug("  %s: %d blocks, %d not present", p.name, p.blocks, p.not_present)
        peers = self._peers.values()
        return FetchResult(
            complete=True,
            bytes_downloaded=sum(p.bytes for p in peers),
            blocks_downloaded=sum(p.blocks for p in peers),
            blocks_total=self.cf.block_count,
            blocks_resumed=resumed,
            seconds=clock() - start,
            sources={p.name: p.blocks for p in peers if p.blocks},
            banned=sorted(p.name for p in peers if p.banned),
        )

    def partial_result(self, seconds: float) -> FetchResult:
        """The figures so far, for a download that failed."""
        peers = self._peers.values()
        blocks = sum(p.blocks for p in peers)
        return FetchResult(
            complete=False,
            bytes_downloaded=sum(p.bytes for p in peers),
            blocks_downloaded=blocks,
            blocks_total=self.cf.block_count,
            blocks_resumed=self.store.verified_count - blocks,
            seconds=seconds,
            sources={p.name: p.blocks for p in peers if p.blocks},
            banned=sorted(p.name for p in peers if p.banned),
        )

    # --- coordination ---------------------------------------------------------

    def _progress(self) -> Progress:
        cf = self.cf
        n = self.store.verified_count
        verified = min(cf.data_length, n * cf.block_size)
        if n and self.store.has(cf.block_count - 1):
            verified = min(cf.data_length, verified - cf.block_size + cf.last_block_length)
        peers = sum(1 for p in self._peers.values() if p.sessions)
        if peers or not self._stop.is_set():
            self._last_peers = peers
        return Progress(verified, cf.data_length, self._last_peers)

    def _stall_message(self) -> str:
        t = f"{self.policy.stall_timeout:g} s"
        if self._list_error and not self._peers:
            return f"{self._list_error} (for {t})"
        usable = [p for p in self._peers.values() if not p.is_self]
        if not usable and not self._dead:
            return f"no peers for this file within {t}"
        if not self._ever_connected:
            return f"none of {len(usable) + len(self._dead)} peers could be reached within {t}"
        return banned_message(usable, t) or f"no block arrived for {t} from {len(usable)} known peers"

    def _relist(self) -> int:
        """Ask the tracker for peers; returns how many addresses were new (0 on an error)."""
        try:
            peers = self._list_peers()
            new = self.add_peers(peers)
        except CascadeError as exc:
            if self._list_error is None:
                log.warning("%s", exc)
            self._list_error = str(exc)
            return 0
        if self._list_error is not None:
            log.info("tracker answered again")
            self._list_error = None
        return new

    def _eligible(self, now: float) -> list[_Peer]:
        return [
            p
            for p in self._peers.values()
            if not p.sessions and not p.connecting and not p.banned and not p.is_self and p.next_try <= now
        ]

    def _hungry(self, now: float) -> bool:
        """A slot is free, no candidate is left to try and more connects could start."""
        return (
            self._free_slots() > 0 and len(self._connector) < self.policy.max_connecting and not self._candidates(now)
        )

    def _is_eligible(self, p: _Peer, now: float) -> bool:
        return not p.sessions and not p.connecting and not p.banned and not p.is_self and p.next_try <= now

    def _candidates(self, now: float) -> list[_Peer]:
        """The eligible candidates, best last; ranked once, then consumed by _launch.

        Re-ranking thousands of candidates for each handful of connects costs
        more than the connects: the ranking is rebuilt only when peers were
        added or a session ended, or after QUEUE_TTL (backoffs expire).
        """
        if self._queue_dirty or now >= self._queue_until:
            self._queue_dirty = False
            self._queue_until = now + QUEUE_TTL
            self._queue = sorted(self._eligible(now), key=candidate_rank, reverse=True)
        queue = self._queue
        while queue and (self._peers.get(queue[-1].addr) is not queue[-1] or not self._is_eligible(queue[-1], now)):
            queue.pop()
        return queue

    def _free_slots(self) -> int:
        return self._max_sessions - len(self._sessions)

    def _launch(self, now: float) -> None:
        """Start connects for free slots, best candidates first (see connect_budget)."""
        pol, connector = self.policy, self._connector
        if connect_budget(self._free_slots(), len(connector), self._streak, pol.max_connecting) <= 0:
            return
        queue = self._candidates(now)
        # A refused connect often fails at once (on loopback always): it frees its place in the
        # budget within this call, up to LAUNCH_BATCH attempts per call.
        for _ in range(LAUNCH_BATCH):
            if not queue or connect_budget(self._free_slots(), len(connector), self._streak, pol.max_connecting) <= 0:
                return
            p = queue.pop()
            if self._peers.get(p.addr) is not p or not self._is_eligible(p, now):  # gone, or re-added anew
                continue
            error = connector.start(p.addr, pol.connect_timeout)
            if error is None:
                p.connecting = True
            else:
                self._connect_failed(p, error, now)

    def _on_connects(self, done: list[tuple[PeerAddr, socket.socket | None, str]]) -> None:
        now = self._clock()
        for addr, sock, error in done:
            p = self._peers.get(addr)
            if p is None:  # cannot happen: a connecting peer stays known
                if sock is not None:
                    sock.close()
                continue
            p.connecting = False
            if sock is None:
                self._connect_failed(p, error, now)
            elif self._free_slots() <= 0 or self._stop.is_set():
                # Another connect filled the slot first: it stays a candidate, untouched.
                sock.close()
                self._streak = 0
                self._queue_dirty = True
            else:
                self._streak = 0
                self._start_session(p, sock, now)

    def _connect_failed(self, p: _Peer, error: str, now: float) -> None:
        """Back off a peer that refused or ignored a connect; forget one that never answered."""
        log.debug("peer %s: cannot connect: %s", p.name, error)
        p.connecting = False
        self._streak = min(self._streak + 1, self.policy.max_connecting)
        if p.connected_once or p.blocks:
            self._backoff(p)
            return
        # Never reached: it leaves the candidates (a tracker may list thousands like it) for a
        # small record that keeps it from being tried again before its retry time.
        failures = p.failures + 1
        del self._peers[p.addr]
        delay = min(self.policy.dead_retry_max, self.policy.dead_retry * 2 ** min(failures - 1, 10))
        self._dead[p.addr] = (now + delay, failures)
        self._dead.move_to_end(p.addr)
        if len(self._dead) > self.policy.max_dead:
            self._dead.popitem(last=False)

    def _start_session(self, p: _Peer, sock: socket.socket, now: float) -> None:
        session = _Session(p, started=now)
        with self._lock:
            p.sessions += 1
            self._sessions.add(session)
        self._threads = [x for x in self._threads if x.is_alive()]
        t = threading.Thread(target=self._worker, args=(session, sock), name=f"fetch {p.name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _maybe_evict(self, now: float) -> None:
        """Give the slot of a far-too-slow peer to an untried candidate (see pick_evictee)."""
        pol = self.policy
        if now - self._last_evict < pol.evict_every or self._free_slots() > 0:
            return
        if not any(not p.connected_once and not p.failures for p in self._candidates(now)):
            return
        with self._lock:
            victim = pick_evictee(list(self._sessions), now, pol)
        if victim is None:
            return
        self._last_evict = now
        victim.evicted = True
        victim.peer.next_try = now + pol.evict_cooldown
        log.debug("peer %s: %.0f B/s, far below the others: slot to an untried peer", victim.peer.name, victim.rate)
        sock = victim.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _shutdown(self) -> None:
        self._connector.close()
        if self._bucket is not None:
            self._bucket.close()
        for session in list(self._sessions):
            sock = session.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 2.0
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- one peer ---------------------------------------------------------------

    def _worker(self, session: _Session, sock: socket.socket) -> None:
        peer = session.peer
        try:
            self._adopt(session, sock)
            if peer.keepopen is False:
                self._session_single(session, sock)
            else:
                self._session_pipelined(session, sock)
        except _Offence as exc:
            peer.offences += 1
            if peer.offences >= self.policy.ban_after:
                peer.ban_reason = str(exc)
                peer.banned = True
                log.warning("banned peer %s: %s", peer.name, exc)
            else:
                log.info("dropped peer %s: %s", peer.name, exc)
                self._backoff(peer)
        except _Downgrade as exc:
            log.debug("peer %s: %s", peer.name, exc)
        except (_Drop, _Closed, OSError) as exc:
            if session.evicted:
                log.debug("peer %s: evicted", peer.name)
            elif not self._stop.is_set():
                log.debug("peer %s: %s", peer.name, _describe(exc))
                self._backoff(peer)
        except DataError as exc:
            self._fatal = exc
            self._sched.complete.set()
        except BaseException as exc:  # a bug must not hang the download: report it as fatal
            self._fatal = CascadeError(f"internal error while fetching from {peer.name}: {exc!r}")
            self._sched.complete.set()
            raise
        finally:
            sched = self._sched
            while session.outstanding:
                i = session.outstanding.popleft()
                peer.own.discard(i)
                sched.release(i)
            last, session.sock = session.sock, None
            if last is not None:
                last.close()
            with self._lock:
                peer.blocks += session.blocks
                peer.bytes += session.bytes
                peer.not_present += session.not_present
                peer.sessions -= 1
                self._sessions.discard(session)
            self._queue_dirty = True  # this peer may be a candidate again
            self._sched.wake.set()

    def _backoff(self, peer: _Peer) -> None:
        peer.failures += 1
        pol = self.policy
        delay = min(pol.backoff_max, pol.backoff_min * 2 ** min(peer.failures - 1, 10))
        peer.next_try = self._clock() + delay * random.uniform(0.8, 1.2)

    def _connect(self, session: _Session) -> socket.socket:
        """A blocking connect, for a peer known to be alive (one connection per request)."""
        try:
            sock = socket.create_connection(session.peer.addr, timeout=self.policy.connect_timeout)
        except OSError as exc:
            raise _Drop(f"cannot connect: {_describe(exc)}") from exc
        return self._adopt(session, sock)

    def _adopt(self, session: _Session, sock: socket.socket) -> socket.socket:
        """Make a fresh connection the session's; raises _Drop when it is ourselves or we stop."""
        peer = session.peer
        session.sock = sock
        if self._stop.is_set() or peer.banned:
            raise _Drop("stopping")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._my_port is not None and peer.addr[1] == self._my_port:
            local_ip = sock.getsockname()[0]
            if local_ip == peer.addr[0]:
                peer.is_self = True
                raise _Drop("this is our own address")
        if not peer.connected_once:
            peer.connected_once = True
            self._ever_connected = True
        return sock

    def _request(self, i: int, plain: bool = False) -> bytes:
        return (_PLAIN_PREFIX if plain else _REQUEST_PREFIX) + i.to_bytes(8, "big") + self._request_tail

    def _depth(self, session: _Session) -> int:
        if session.rate <= 0:
            return min(4, self._max_depth)
        d = int(session.rate * self.policy.target_latency / self.cf.block_size) + 1
        return max(2, min(self._max_depth, d))

    def _deadline(self, session: _Session, reader: _Reader) -> float:
        """Set the whole-response deadline of the next response; returns its length in seconds."""
        timeout = self._timeout(session)
        reader.deadline = time.monotonic() + timeout
        return timeout

    def _timeout(self, session: _Session) -> float:
        pol = self.policy
        if session.rate <= 0:
            return pol.first_response_timeout
        expected = len(session.outstanding) * self.cf.block_size / session.rate
        return max(pol.min_response_timeout, pol.timeout_factor * expected)

    def _session_pipelined(self, session: _Session, sock: socket.socket) -> None:
        """Kept-open connection with requests in flight; switches peer to single mode if it closes."""
        peer = session.peer
        reader = _Reader(sock, self.cf.block_size)
        sched, out, stop = self._sched, session.outstanding, self._stop
        session.win_start = self._clock()
        responses = 0
        while not stop.is_set() and not peer.banned and not session.evicted:
            # The first request goes alone: a server that closes after each
            # response then never has unread requests (which would make it reset).
            depth = self._depth(session) if responses else 1
            if len(out) <= depth // 2:
                batch = sched.pick(peer, depth - len(out), self._clock())
                if batch:
                    out.extend(batch)
                    try:
                        sock.sendall(b"".join([self._request(i) for i in batch]))
                    except OSError as exc:
                        if responses == 1 and peer.keepopen is None:
                            peer.keepopen = False
                            return
                        raise _Drop(f"send failed: {_describe(exc)}") from exc
            if not out:
                if sched.complete.is_set():
                    return
                # Nothing this peer can give us right now.
                stop.wait(0.05)
                session.win_start = self._clock()
                session.win_bytes = 0
                continue
            timeout = self._deadline(session, reader)
            try:
                self._read_response(session, reader)
            except _Closed as exc:
                if responses == 1 and exc.partial == 0 and peer.keepopen is None:
                    peer.keepopen = False  # closes after each response
                    return
                if responses >= 2 and exc.partial == 0:
                    return  # closed between responses (an idle or per-connection limit): reconnect at once
                raise
            except ConnectionResetError:
                if responses == 1 and peer.keepopen is None:
                    peer.keepopen = False
                    return
                raise
            except TimeoutError as exc:
                if responses == 1 and peer.keepopen is None:
                    # Answered one request, then ignored the rest: serves one request per connection.
                    peer.keepopen = False
                    return
                raise _Drop(f"no whole response within {timeout:.1f} s") from exc
            responses += 1
            if responses == 2:
                peer.keepopen = True

    def _session_single(self, session: _Session, first: socket.socket | None) -> None:
        """One connection per request, for servers that close after each response (``first``: already open)."""
        peer = session.peer
        sched, out, stop = self._sched, session.outstanding, self._stop
        reader = _Reader(None, self.cf.block_size)
        session.win_start = self._clock()
        while not stop.is_set() and not peer.banned and not session.evicted:
            batch = sched.pick(peer, 1, self._clock())
            if not batch:
                if sched.complete.is_set():
                    return
                stop.wait(0.05)
                continue
            out.extend(batch)
            sock = first or self._connect(session)
            first = None
            timeout = 0.0
            try:
                sock.sendall(self._request(batch[0], plain=peer.plain))
                reader.reset(sock)
                timeout = self._deadline(session, reader)
                self._read_response(session, reader)
            except TimeoutError as exc:
                raise _Drop(f"no whole response within {timeout:.1f} s") from exc
            finally:
                session.sock = None
                sock.close()

    def _read_response(self, session: _Session, reader: _Reader) -> None:
        """Read the response to ``session.outstanding[0]`` and act on it."""
        peer = session.peer
        out, sched, store = session.outstanding, self._sched, self.store
        i = out[0]
        status, length = reader.header()
        if not peer.answered and status in (BlockStatus.OK, BlockStatus.NOT_PRESENT):
            peer.answered = True
            sched.wake.set()  # the coordinator reconsiders the order now (_update_mode)
        if status == BlockStatus.OK:
            expected = self.cf.block_length(i)
            if length != expected:
                raise _Offence(f"announced {length} bytes for block {i}, which has {expected}")
            body = reader.body(length)
            if store.valid[i]:
                wrote = False  # another peer's copy won the endgame
            else:
                try:
                    wrote = store.write_block(i, body)
                except BlockHashMismatch as exc:
                    raise _Offence(f"sent a corrupt block {i}") from exc
            out.popleft()
            peer.own.discard(i)
            if wrote and sched.done(i):
                session.blocks += 1
                session.bytes += length
                peer.failures = 0
            elif not wrote:
                sched.release(i)
            now = self._clock()
            session.win_bytes += length
            elapsed = now - session.win_start
            if elapsed >= 0.1:
                measured = session.win_bytes / elapsed
                session.rate = measured if session.rate <= 0 else 0.5 * session.rate + 0.5 * measured
                session.win_start, session.win_bytes = now, 0
            if self._bucket is not None:
                # Sleep to hold --max-download-rate (TCP slows the peer meanwhile). The sleep falls
                # in the next rate window, and the next response's deadline starts after it.
                self._bucket.acquire(length)
        elif status == BlockStatus.NOT_PRESENT:
            if length > MAX_MESSAGE:
                raise _Offence(f"sent a {length}-byte message")
            reader.body(length)
            out.popleft()
            peer.own.discard(i)
            sched.release(i, lacked=True)
            if not peer.lacks:
                peer.lacks_since = self._clock()
            peer.lacks.add(i)
            session.not_present += 1
        elif status == BlockStatus.BAD_REQUEST and not peer.plain:
            # Our request is well-formed, so the server must have choked on the KEEPOPEN
            # marker in the reserved bytes: go on with plain requests, one per connection.
            peer.plain = True
            peer.keepopen = False
            raise _Downgrade("rejected a KEEPOPEN request; using plain requests")
        elif status in (BlockStatus.INVALID_HASH, BlockStatus.OUT_OF_RANGE, BlockStatus.BAD_REQUEST):
            message = bytes(reader.body(length)).decode("utf-8", "replace") if length <= MAX_MESSAGE else ""
            raise _Drop(f"answered status {status}: {message[:200]}")
        else:
            raise _Offence(f"sent an unknown status {status}")


def banned_message(peers: list[_Peer], waited: str) -> str | None:
    """The stall message when every peer that could be reached was banned, saying why; else None."""
    reached = [p for p in peers if p.connected_once or p.banned]
    if not reached or not all(p.banned for p in reached):
        return None
    shown = "; ".join(f"{p.name} {p.ban_reason}" for p in reached[:3])
    more = f" (and {len(reached) - 3} more)" if len(reached) > 3 else ""
    which = "its only peer was" if len(reached) == 1 else f"all {len(reached)} peers it reached were"
    return f"no block arrived for {waited}: {which} banned: {shown}{more}"


def _is_local(ip: str) -> bool:
    return ip.startswith("127.") or ip == "0.0.0.0"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
