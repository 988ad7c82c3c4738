"""The downloader's coordinator: fetch the missing blocks of one ``.cascade`` from many peers at once.

The decisions live in the planner (:mod:`peer.planner`, a sans-IO state
machine); one connection's I/O in :mod:`peer.connection`; the whole-file hash
in :mod:`peer.hasher`. This module is the shell that runs them:

- The coordinator thread (:meth:`Fetcher.run`) asks the tracker when the
  planner says so, starts the connects it names (non-blocking, many at once,
  polled here), hands each connection that succeeds to a thread of its own,
  evicts the sessions it names, and waits.
- One thread per peer connection (up to ``max_peers``). It does blocking
  ``recv_into`` with the GIL released, so connections overlap on every core.
- Every call into the planner holds ``Fetcher._lock``; socket I/O, hashing
  and disk writes never do. :meth:`BlockStore.write_sized_block` verifies
  a block's SHA-256 before ``os.pwrite``, so unverified bytes never touch the
  data file.
- The time is read and waited for through a :class:`peer.clock.Clock`
  (socket timeouts excepted), so tests run the coordinator on virtual time.

Memory is bounded by connections, not by the file: one read buffer and one
block buffer per connection, a 4 MiB hashing buffer, plus a few bytes per
missing block.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cascade.errors import BlockHashMismatch, CascadeError, CascadeTimeout, DataError, from_os_error
from cascade.wire import HaveMap
from oscompat import Features, detect
from peer.clock import REAL_CLOCK, Clock
from peer.connection import (
    IDLE_WAIT,
    Closed,
    ConnectDone,
    Connection,
    Connector,
    Downgrade,
    Drop,
    Offence,
    describe,
)
from peer.hasher import PrefixHasher
from peer.planner import FetchPolicy, PeerAddr, PeerInfo, Planner, Session, Spans
from peer.ratelimit import TokenBucket
from peer.storage import BlockStore
from peer.writebehind import Lender, Target, WriteBehind

__all__ = ["FetchPolicy", "FetchResult", "Fetcher", "PeerInfo", "Progress"]

log = logging.getLogger("peer.fetch")

# All connections' block buffers together stay under this (it matters only for huge blocks).
BLOCK_BUFFERS_LIMIT = 512 << 20
# While connects are pending, the coordinator polls them this often (arbitrary:
# short enough that a refused address costs no waiting, long enough to stay idle).
CONNECT_POLL = 0.02
# Connect attempts per coordinator pass at most (arbitrary: bounds one pass to a few ms).
LAUNCH_BATCH = 512
# On the way out, the connection threads get this long together to notice (arbitrary:
# their sockets are shut down, so they return at once unless a disk write hangs).
JOIN_BUDGET = 2.0
# Blocks at least this long are written behind (peer.writebehind), with buffers for this
# many bytes of them. A 64 KiB block costs about as much to hand over as to write; from
# 128 KiB (a block a connection reads into a buffer of its own) one writer thread also keeps
# a swarm's connections from writing into the file at once: with 128 KiB blocks written
# inline, a loopback 1 + 8 swarm spent 6 % of its samples waiting on the file's write lock
# (rwsem_down_write_slowpath) and took 7.3-7.8 s, against 6.1-7.0 s written behind
# (BENCHMARKS.md "128 KiB blocks"). 8 MiB of buffers keep the writer busy across a burst
# without holding much memory.
WRITE_BEHIND_MIN_BLOCK = 128 << 10
WRITE_BEHIND_BYTES = 8 << 20
# The queueing priority of the connections we download on: TC_PRIO_INTERACTIVE, the highest
# a process may set without CAP_NET_ADMIN, and the one pfifo_fast sends from its first band.
DOWNLOAD_PRIORITY = 6


def prioritize_download(sock: socket.socket, features: Features) -> None:
    """Let what ``sock`` sends (block requests, acknowledgements) leave this host before its uploads.

    Both share the host's uplink with the blocks its own server sends. Where
    the queue in front of that uplink is Linux's pfifo_fast (the default root
    queueing discipline wherever fq_codel is not), a full upload held them back:
    on a 10 Mbit/s link the senders of our blocks saw round trips of 0.25-0.4 s
    against 0.1 s to their other downloaders, their TCP windows stayed too
    small for it, and fetchers with 10 Mbit/s of upload among peers with 40
    received blocks at about half the rate the others did (BENCHMARKS.md, WAN). The packets
    on the wire are unchanged, and queues that share out per flow (fq_codel) or
    ignore priorities (pfifo) behave as before. Best effort: a refusal is ignored.
    """
    if features.download_priority:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, DOWNLOAD_PRIORITY)


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


def write_behind(target: Target, written: Callable[[], None], block_size: int, complete: bool) -> WriteBehind | None:
    """The write-behind thread for blocks of at most ``block_size`` bytes, or None when it does not pay.

    Large blocks are written on a thread of their own (peer.writebehind); small ones cost
    more to hand over than to write, and a download already complete writes nothing.
    """
    depth = WRITE_BEHIND_BYTES // max(1, block_size)
    if block_size < WRITE_BEHIND_MIN_BLOCK or depth < 2 or complete:
        return None
    return WriteBehind(target, written, depth, block_size)


class Fetcher:
    """Download every missing block of ``store`` from the peers ``list_peers`` returns.

    ``list_peers`` is called from the fetcher's own thread, now and then; it
    returns ``(ip, port, good)`` or ``(ip, port, good, last_seen)`` tuples and
    may raise :class:`CascadeError` (logged, the download goes on with the
    peers already known).
    ``my_port`` is this process's serving port: a peer at a local address
    with that port is ourselves and never used. ``clock`` reads the time and
    waits; ``rng`` makes the planner's random choices (both real by default).
    """

    def __init__(
        self,
        store: BlockStore,
        list_peers: Callable[[], Iterable[PeerInfo]],
        *,
        policy: FetchPolicy | None = None,
        my_port: int | None = None,
        clock: Clock = REAL_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.cf = store.cf
        self._setup(
            store.valid, self.cf.block_size, self.cf.block_size, list_peers, policy, my_port, clock, rng, spans=None
        )
        self._hasher = PrefixHasher(store, clock)
        if store.complete:
            self._complete.set()

    def _setup(
        self,
        valid: bytearray,
        block_size: int,
        max_block_size: int,
        list_peers: Callable[[], Iterable[PeerInfo]],
        policy: FetchPolicy | None,
        my_port: int | None,
        clock: Clock,
        rng: random.Random | None,
        spans: Spans | None,
    ) -> None:
        """The state every download has: its planner and the coordinator's locks, events and connects.

        ``block_size`` is the typical block length (the planner's depth and timeouts follow it),
        ``max_block_size`` the largest (buffers are sized for it).
        """
        self.policy = pol = policy or FetchPolicy()
        self._features = detect()
        self._list_peers = list_peers
        self._my_port = my_port
        self._clock = clock
        bs = max(max_block_size, 1)
        self.planner = Planner(
            bytearray(valid),
            max(block_size, 1),
            pol,
            rng or random.Random(),
            max_sessions=max(1, min(pol.max_peers, BLOCK_BUFFERS_LIMIT // bs)),
            max_depth=max(2, min(pol.max_depth, pol.inflight_bytes // bs)),
            start=clock.now(),
            my_port=my_port,
            spans=spans,
        )
        # Every call into the planner holds this lock.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Set when every block is verified, or on the way out.
        self._complete = threading.Event()
        # Wakes the coordinator early: completion, a session ended, a peer answered first.
        self._wake = threading.Event()
        self._fatal: CascadeError | None = None
        # The writer of verified blocks, when they are written behind (see Fetcher._begin).
        self._behind: WriteBehind | None = None
        self._threads: list[threading.Thread] = []
        # The open connection of each session, to shut it down on eviction or stop.
        self._socks: dict[Session, socket.socket] = {}
        self._connector = Connector(self._features)
        self._last_peers = 0
        rate = pol.max_download_rate
        self._bucket = TokenBucket(rate) if rate else None

    # --- public -------------------------------------------------------------

    def stop(self) -> None:
        """Ask a running :meth:`run` to return soon (thread-safe)."""
        self._stop.set()
        self._complete.set()
        self._wake.set()

    def add_peers(self, peers: Iterable[PeerInfo]) -> int:
        """Take candidates from a tracker reply; returns how many addresses were new (see Planner.listed)."""
        with self._lock:
            return self.planner.listed(peers, self._clock.now())

    def run(self, on_tick: Callable[[Progress], None] | None = None, tick: float = 0.1) -> FetchResult:
        """Fetch until the file is complete and verified, or fail.

        Raises :class:`CascadeTimeout` when no block arrives within ``stall_timeout``,
        :class:`DataError` (e.g. disk full) and :class:`CascadeError` for a
        whole-file hash mismatch.
        """
        clock, planner, lock = self._clock, self.planner, self._lock
        start = clock.now()
        resumed = self._verified_count()
        self._begin()
        with lock:
            planner.begin(start)
        try:
            while not self._complete.is_set() and self._fatal is None:
                now = clock.now()
                with lock:
                    due = planner.relist_due(now)
                if due:
                    new = self._relist()
                    with lock:
                        planner.relisted(new, now)
                self._launch(now)
                with lock:
                    step = planner.tick(now)
                    stalled = planner.stall(now)
                if step.order is not None:
                    log.debug("%d peers answer: blocks in %s order", step.order[1], step.order[0])
                if step.evict is not None:
                    self._evict(step.evict)
                if stalled is not None:
                    raise CascadeTimeout(stalled)
                if on_tick is not None:
                    on_tick(self._progress())
                with lock:
                    wait = planner.wait_time(clock.now(), tick)
                if len(self._connector):
                    self._on_connects(self._connector.poll(min(wait, CONNECT_POLL)))
                else:
                    clock.wait(self._wake, wait)
                self._wake.clear()
        finally:
            self._stop.set()
            self._complete.set()
            self._shutdown()
            self._flush()
            if not self._all_verified() or self._fatal is not None:
                self._abandon()
        if self._fatal is not None:
            raise self._fatal
        if not self._all_verified():
            raise CascadeError("interrupted before the download completed")
        if on_tick is not None:
            on_tick(self._progress())
        return self._finish(start, resumed)

    # --- what differs for a collection (peer.collection_fetch.CollectionFetcher) -----------

    def _verified_count(self) -> int:
        return self.store.verified_count

    def _all_verified(self) -> bool:
        return self.store.complete

    def _begin(self) -> None:
        self._hasher.start()
        self._behind = write_behind(self.store, self._hasher.block_verified, self.cf.block_size, self.store.complete)

    def _flush(self) -> None:
        """The connections are stopped: write what they verified (a failed write becomes the fetch's error)."""
        behind = self._behind
        if behind is None:
            return
        try:
            behind.drain()
        except CascadeError as exc:
            if self._fatal is None:
                self._fatal = exc
        finally:
            behind.close()
            self._behind = None

    def _abandon(self) -> None:
        self._hasher.abandon()

    def _write(self, session: Session, i: int, body: memoryview, lender: Lender | None) -> bool:
        """Verify and write block ``i`` (maybe behind, see peer.writebehind); False when another copy was first.

        ``lender``: see :meth:`peer.connection.Shell.arrived`. Raises :class:`BlockHashMismatch`
        and :class:`DataError`.
        """
        store, behind = self.store, self._behind
        if behind is not None:
            store.check_block(i, body)
            return behind.put(i, body, lender)
        if store.write_sized_block(i, body):
            self._hasher.block_verified()
            return True
        return False

    def _connection(self, session: Session) -> Connection:
        return Connection(self, session, self.cf, self.policy.connect_timeout)

    def _finish(self, start: float, resumed: int) -> FetchResult:
        """Every block is verified: check the whole-file hash; the figures of the download.

        Raises :class:`DataError` on a mismatch or a failed write.
        """
        clock, planner, store, hasher = self._clock, self.planner, self.store, self._hasher
        finishing = clock.now()
        log.debug("all blocks verified in %.3f s", finishing - start)
        store.fix_length()
        try:
            digest = hasher.finish()
        except OSError as exc:
            raise from_os_error(exc, store.path, "finish the output file") from exc
        if digest != self.cf.file_hash:
            raise DataError(
                f"{store.path}: every block verified but the whole-file SHA-256 does not match the .cascade file"
            )
        log.debug("whole-file hash checked in %.3f s", clock.now() - finishing)
        peers = planner.peers.values()
        # Sessions still open have not folded their counts into their peers yet.
        live: dict[str, tuple[int, int]] = {}
        for s in planner.sessions:
            b, n = live.get(s.peer.name, (0, 0))
            live[s.peer.name] = (b + s.blocks, n + s.not_present)
        for p in peers:
            b, n = live.get(p.name, (0, 0))
            if p.blocks + b or p.not_present + n:
                log.debug("  %s: %d blocks, %d not present", p.name, p.blocks + b, p.not_present + n)
        return FetchResult(
            complete=True,
            bytes_downloaded=sum(p.bytes for p in peers),
            blocks_downloaded=sum(p.blocks for p in peers),
            blocks_total=self.cf.block_count,
            blocks_resumed=resumed,
            seconds=clock.now() - start,
            sources={p.name: p.blocks for p in peers if p.blocks},
            banned=sorted(p.name for p in peers if p.banned),
        )

    def partial_result(self, seconds: float) -> FetchResult:
        """The figures so far, for a download that failed."""
        with self._lock:
            peers = list(self.planner.peers.values())
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
        with self._lock:
            peers = len({s.peer for s in self.planner.sessions})
        if peers or not self._stop.is_set():
            self._last_peers = peers
        return Progress(verified, cf.data_length, self._last_peers)

    def _relist(self) -> int:
        """Ask the tracker for peers; returns how many addresses were new (0 on an error)."""
        planner = self.planner
        had_error = planner.list_error is not None
        try:
            peers = self._list_peers()
        except CascadeError as exc:
            if not had_error:
                log.warning("%s", exc)
            with self._lock:
                planner.list_failed(str(exc))
            return 0
        with self._lock:
            new = planner.listed(peers, self._clock.now())
        if had_error:
            log.info("tracker answered again")
        return new

    def _launch(self, now: float) -> None:
        """Start the connects the planner names, up to LAUNCH_BATCH per pass.

        A refused connect often fails at once (on loopback always): it frees
        its place in the planner's budget within this pass.
        """
        planner, connector, lock = self.planner, self._connector, self._lock
        timeout = self.policy.connect_timeout
        for _ in range(LAUNCH_BATCH):
            with lock:
                addr = planner.next_connect(now)
            if addr is None:
                return
            error = connector.start(addr, timeout)
            if error is not None:
                self._connect_failed(addr, error, now)

    def _connect_failed(self, addr: PeerAddr, error: str, now: float) -> None:
        log.debug("peer %s:%d: cannot connect: %s", addr[0], addr[1], error)
        with self._lock:
            self.planner.connect_failed(addr, now)

    def _on_connects(self, done: list[ConnectDone]) -> None:
        now = self._clock.now()
        for addr, sock, error in done:
            if sock is None:
                self._connect_failed(addr, error, now)
                continue
            with self._lock:
                session = self.planner.connected(addr, now, stopping=self._stop.is_set())
            if session is None:
                sock.close()
                continue
            self._threads = [x for x in self._threads if x.is_alive()]
            t = threading.Thread(target=self._worker, args=(session, sock), name=f"fetch {addr[0]}:{addr[1]}")
            t.daemon = True
            self._threads.append(t)
            t.start()

    def _evict(self, victim: Session) -> None:
        """Give the slot of a far-too-slow peer to an untried candidate: shut its connection."""
        log.debug("peer %s: %.0f B/s, far below the others: slot to an untried peer", victim.peer.name, victim.rate)
        sock = self._socks.get(victim)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _shutdown(self) -> None:
        self._connector.close()
        if self._bucket is not None:
            self._bucket.close()
        for sock in list(self._socks.values()):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        # Real time: joining threads is real waiting whatever the clock says.
        deadline = time.monotonic() + JOIN_BUDGET
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # --- one peer: the connection's Shell ------------------------------------------

    def _worker(self, session: Session, sock: socket.socket) -> None:
        peer, planner = session.peer, self.planner
        try:
            self._connection(session).run(sock)
        except Offence as exc:
            with self._lock:
                banned = planner.offence(session, str(exc), self._clock.now())
            if banned:
                log.warning("banned peer %s: %s", peer.name, exc)
            else:
                log.info("dropped peer %s: %s", peer.name, exc)
        except Downgrade as exc:
            log.debug("peer %s: %s", peer.name, exc)
        except (Drop, Closed, OSError) as exc:
            if session.evicted:
                log.debug("peer %s: evicted", peer.name)
            elif not self._stop.is_set():
                log.debug("peer %s: %s", peer.name, describe(exc))
                with self._lock:
                    planner.failed(session, self._clock.now())
        except DataError as exc:
            self._fatal = exc
            self._complete.set()
        except BaseException as exc:  # a bug must not hang the download: report it as fatal
            self._fatal = CascadeError(f"internal error while fetching from {peer.name}: {exc!r}")
            self._complete.set()
            raise
        finally:
            last = self._socks.pop(session, None)
            if last is not None:
                last.close()
            with self._lock:
                planner.session_ended(session)
            self._wake.set()

    def going(self, session: Session) -> bool:
        return not self._stop.is_set() and not session.peer.banned and not session.evicted

    def complete(self) -> bool:
        return self._complete.is_set()

    def request(self, session: Session, want: int) -> list[int]:
        with self._lock:
            return self.planner.request(session, want, self._clock.now())

    def idle(self, session: Session, wait: float = IDLE_WAIT) -> None:
        self._clock.wait(self._stop, wait)
        with self._lock:
            self.planner.idle(session, self._clock.now())

    def depth(self, session: Session) -> int:
        return self.planner.depth(session)

    def response_timeout(self, session: Session) -> float:
        return self.planner.response_timeout(session)

    def answered(self, session: Session) -> None:
        with self._lock:
            first = self.planner.answered(session)
        if first:
            self._wake.set()  # the coordinator reconsiders the block order now

    def arrived(self, session: Session, i: int, body: memoryview, lender: Lender | None = None) -> None:
        # The one "already have it" check on a block's path: another peer's copy won the endgame.
        if self.planner.have(i):
            wrote = False
        else:
            try:
                wrote = self._write(session, i, body, lender)
            except BlockHashMismatch as exc:
                raise Offence(f"sent a corrupt block {i}") from exc
        now = self._clock.now()
        with self._lock:
            if wrote:
                done = self.planner.verified(session, i, len(body), now)
            else:
                self.planner.duplicate(session, i, len(body), now)
        if wrote and done.complete:
            self._complete.set()
            self._wake.set()

    def have_map(self, session: Session, have: HaveMap) -> None:
        with self._lock:
            self.planner.have_map(session, have.held, have.offer, self._clock.now())

    def lacked(self, session: Session, i: int) -> None:
        with self._lock:
            self.planner.not_present(session, i, self._clock.now())

    def lacks_member(self, session: Session, i: int) -> None:
        with self._lock:
            self.planner.lacks_member(session, i, self._clock.now())

    def throttle(self, length: int) -> None:
        if self._bucket is not None:
            # Sleep to hold --max-download-rate (TCP slows the peer meanwhile). The sleep falls
            # in the next rate window, and the next response's deadline starts after it.
            self._bucket.acquire(length)

    def adopt(self, session: Session, sock: socket.socket) -> None:
        peer = session.peer
        self._socks[session] = sock
        if self._stop.is_set() or peer.banned:
            raise Drop("stopping")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        prioritize_download(sock, self._features)
        if self._my_port is not None and peer.addr[1] == self._my_port and sock.getsockname()[0] == peer.addr[0]:
            with self._lock:
                self.planner.found_self(session)
            raise Drop("this is our own address")
        with self._lock:
            self.planner.reached(session)

    def release_socket(self, session: Session) -> None:
        self._socks.pop(session, None)
