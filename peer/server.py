"""The block server: one port serves every file this peer holds (PROTOCOL.md sections 3-5).

Shape: one selector thread and a bounded pool of worker threads.

- The selector thread owns the listening socket and every *idle* connection.
  It waits on epoll (or, off Linux, the ``selectors`` module: see
  :mod:`oscompat.poller`), accepts new connections (or adopts one handed over by
  :meth:`BlockServer.serve_connection`, the same way), and hands a connection
  that has bytes to read to the pool. Holding hundreds of idle kept-open connections
  costs a file descriptor each, not a thread. It also closes connections that
  stay idle for longer than ``idle_timeout``, or half-sent for longer than
  ``header_timeout`` (both in :class:`BlockServerConfig`, measured on the
  injectable clock, so tests advance virtual time instead of sleeping).
- A worker reads whatever the connection has, answers every whole 64-byte
  request in order, and keeps going while more requests are already waiting.
  When the connection goes quiet it re-arms it on epoll (one-shot, so exactly
  one thread owns a connection at any time) and takes the next job; a busy
  connection yields after ``FAIR_SHARE`` requests when others wait. A client
  that sends half a request and stalls therefore never pins a worker: its
  bytes wait in the connection's buffer until the rest arrives or it times out.
- Floods (slowloris and idle connections) cannot lock real clients out. A
  request must arrive whole within ``header_timeout`` of its first byte (and a
  new connection must send its first request within it), like nginx's
  ``client_header_timeout``. At ``max_connections`` the newcomer is accepted
  and the connection that has been quiet longest is closed instead: one that
  sent nothing, half a request, or takes its reply slowly. Connections of an
  address holding more than half the slots go first, so one flooding host
  loses its own connections before anyone else's.
- Block data goes out with sendfile(2), zero-copy from the data file (where
  the OS lacks it, or ``CASCADE_PORTABLE`` is set, by a bounded read-and-send
  loop from a reused buffer, :func:`oscompat.fileio.send_from_file`). We call
  :func:`os.sendfile` (the system call behind ``socket.sendfile``) on the
  non-blocking socket ourselves: when a reader is slow and its socket stays
  full, the worker parks the half-sent response on the selector (EPOLLOUT)
  and moves on, so slow readers cannot hold the pool either. With a rate
  limit, the data goes out in slices metered by one shared token bucket.

Keep-open (section 5): a request with ``KEEPOPEN`` in bytes 8-15 keeps the
connection after a status 0 or 2 reply; anything else is answered and closed,
which is what old clients that read until EOF need.

Have maps (docs/protocol-extensions.md): a request for block 2^64-1 with
``HAVEMAP1`` in bytes 16-23 is answered with status 0 and the bitmap of the
blocks verified so far; a complete file asked by several downloaders adds an
offer per downloader (:mod:`peer.superseed`), so each is steered to blocks
the others are not getting from us. Bytes 16-23 of any other request are
never looked at: clients fill them with garbage.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from cascade.errors import DataError
from cascade.wire import (
    BLOCK_MAGIC,
    BLOCK_REQUEST_SIZE,
    HAVEMAP,
    HAVEMAP_INDEX,
    KEEPOPEN,
    BlockStatus,
    HaveMap,
    pack_block_response_header,
    unpack_block_request_from,
)
from oscompat import detect
from oscompat.fileio import SEND_CHUNK, PositionalFile, send_backlog, send_from_file
from oscompat.poller import IN, OUT, Poller, make_poller, wait_writable
from peer.common import REQUEST_LOGGER
from peer.common import BlockServerConfig as BlockServerConfig  # the policy is passed with the server
from peer.openfiles import OpenFile, OpenFiles
from peer.ratelimit import TokenBucket
from peer.storage import BlockStore, MemberStore, NotAsVerified, VerifiedBlocks, signature_of
from peer.superseed import SuperSeeder

log = logging.getLogger("peer.server")
# Lines about single connections and requests (one or more per block served)
# go to their own logger, enabled only by -vv: a fetcher that serves while it
# downloads would otherwise spend its time logging.
request_log = logging.getLogger(REQUEST_LOGGER)

# One recv takes up to this much: many pipelined requests at once, and a
# bound on what one connection can make us buffer.
RECV_SIZE = 64 << 10
# With a rate limit, data goes out in sendfile slices of this size so that the
# shared bucket interleaves connections fairly.
LIMITED_SLICE = 64 << 10
# A closed-after-reply connection whose client still has bytes in flight is
# drained for at most this long, so the reply is not lost to a TCP reset.
LINGER_SECONDS = 2.0
# A worker answers this many requests on one connection before it lets a
# waiting connection have its turn.
FAIR_SHARE = 64
# The selector wakes at least this often to close idle connections.
SWEEP_INTERVAL = 0.25
# At the connection cap, one scan of the open connections picks this many
# eviction victims, oldest first, so a flood of newcomers costs a scan per
# batch rather than per accept. Arbitrary.
EVICT_BATCH = 32
# A watched file is fstat-ed every this many requests (a power of two): about
# 1 us each, so 1 KiB blocks lose well under 1 % of their rate. Arbitrary.
FSTAT_EVERY = 8

# A complete file's have maps offer every block (peer.superseed) while the upload
# sends below SPARE_FRACTION of the best rate it reached in the last BEST_RATE_FOR
# seconds, each rate taken over RATE_WINDOW seconds, looked at every SPARE_RECHECK
# seconds at most. A super-seeder keeps each block to one copy because its upload is
# the swarm's bottleneck; a seeder faster than its downloaders' uploads is not, and
# idled at 30-40 % with slow downloaders (BENCHMARKS.md). Arbitrary: a second is
# long enough to smooth out single blocks, short beside a download; 0.8 leaves room
# for the gaps between one block and the next request on a busy link.
SPARE_FRACTION = 0.8
RATE_WINDOW = 1.0
SPARE_AFTER = 3.0
SPARE_HOLD = 10.0
# A hold that starts within SPARE_HOLD of the last one's end is twice as long as that
# one, up to SPARE_HOLD_MAX: the small offers in between ran the upload low again, and
# each such return costs SPARE_AFTER seconds of a half-idle upload (a 100 Mbit/s seeder
# with 8 downloaders at 10: BENCHMARKS.md). The cap bounds how long downloaders that
# arrive meanwhile, and make the upload the bottleneck again, go without the offers that
# keep each block to one copy. Arbitrary: returns every 40 s are 3 s of small offers in 43.
SPARE_HOLD_MAX = 40.0
BEST_RATE_FOR = 30.0
SPARE_RECHECK = 0.05

# How long a worker waits for a full socket to drain before parking the
# connection on the selector: far longer than a fast reader needs, short
# enough that slow readers cannot hold the pool.
WRITE_WAIT_MS = 20


class _Close(Exception):
    """The connection is finished (closed by the client, broken, or stalled)."""


@dataclass(slots=True)
class _Served:
    """What a request needs to know about one served file, computed once."""

    # A BlockStore holds its file open (``fd``); a MemberStore is opened on demand
    # through the server's OpenFiles, and ``fd`` is -1.
    store: BlockStore | MemberStore
    fd: int
    count: int
    block_size: int
    full_header: bytes
    last_length: int
    last_header: bytes
    # Sends per block and the offers made to have-map askers (docs/protocol-extensions.md);
    # made on the file's first map request (BlockServer._seeder_of): a collection's members
    # are fetched without maps, and the state costs about 1 KB and 10 us each.
    seeder: SuperSeeder | None
    # For a watched file (see add_store): called when an fstat shows it changed, or
    # (a member) when it could not be reopened as verified.
    changed: Callable[[VerifiedBlocks], None] | None = None
    seen: tuple[int, int, int] = (0, 0, 0)
    tick: int = 0


class _Conn:
    """One client connection. Exactly one thread owns it at a time (see ``idle``).

    ``out_*`` is the response being sent: unsent header or message bytes, then
    ``out_left`` bytes of ``out_fd`` from ``out_offset``. It survives parking,
    so a response to a slow reader resumes where it stopped.
    """

    __slots__ = (
        "active",
        "buf",
        "deadline",
        "draining",
        "fd",
        "host",
        "idle",
        "maps",
        "name",
        "out_block",
        "out_credit",
        "out_fd",
        "out_head",
        "out_keep",
        "out_left",
        "out_offset",
        "out_open",
        "out_seeder",
        "out_src",
        "partial_since",
        "sock",
    )

    def __init__(self, sock: socket.socket, host: str, name: str, now: float, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.host = host
        self.name = name
        self.buf = b""
        self.deadline = deadline
        # When it connected or last had a reply sent whole: eviction closes the oldest first.
        self.active = now
        # When the first byte of a still incomplete request arrived (0.0: none pending).
        self.partial_since = 0.0
        self.idle = True  # True while the selector thread owns it
        # The files it asked have maps of (their claims go back to the others when it closes).
        self.maps: set[SuperSeeder] = set()
        self.draining = False
        self.out_head = b""
        self.out_fd = -1
        self.out_src: PositionalFile | None = None  # out_fd for the read-and-send fallback
        # A member's descriptor held from the server's OpenFiles until the reply is sent whole.
        self.out_open: OpenFile | None = None
        self.out_offset = 0
        self.out_left = 0
        self.out_credit = 0  # bytes already taken from the rate limiter
        self.out_keep = False
        # The block being sent and its file's super-seeding state, told when the send completes.
        self.out_block = -1
        self.out_seeder: SuperSeeder | None = None


def spare_hold(now: float, last_until: float, last_hold: float) -> float:
    """How long a spell of spare upload starting at ``now`` lasts, the last one ``last_hold`` long to ``last_until``."""
    if now - last_until < SPARE_HOLD:
        return min(2 * last_hold, SPARE_HOLD_MAX)
    return SPARE_HOLD


def _error_reply(status: BlockStatus, message: str) -> bytes:
    body = message.encode("utf-8")
    return pack_block_response_header(status, len(body)) + body


_UNKNOWN_HASH = _error_reply(BlockStatus.INVALID_HASH, "invalid hash: this peer does not serve that file")
_BAD_REQUEST = _error_reply(BlockStatus.BAD_REQUEST, "the request could not be parsed: expected magic CASCADE1")


class BlockServer:
    """Serves the verified blocks of every added :class:`BlockStore` on one TCP port.

    ``start`` binds and returns at once; ``address`` is the real bound
    address; ``stop`` closes everything within ``timeout`` seconds. Stores may
    gain blocks while they are served: every request checks ``store.has``.
    ``config`` holds the limits and timeouts. ``clock`` (seconds, monotonic)
    times the connections' deadlines and, with ``sleep``, the upload limit:
    tests pass virtual ones. :meth:`serve_connection` serves an
    already-connected socket, so a test needs no port.
    """

    def __init__(
        self,
        host: str,
        port: int,
        config: BlockServerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        cfg = config or BlockServerConfig()
        self.config = cfg
        self._host = host
        self._port = port
        self._clock = clock
        self.features = detect()
        self.max_workers = cfg.max_workers
        # select() cannot watch more than FD_SETSIZE sockets: the cap is lowered where it is the selector.
        self.max_connections = self.features.connection_cap(cfg.max_connections)
        self.idle_timeout = cfg.idle_timeout
        self.header_timeout = min(cfg.header_timeout, cfg.idle_timeout)
        self._limiter = TokenBucket(cfg.upload_rate, clock=clock, sleep=sleep) if cfg.upload_rate else None
        self._served: dict[bytes, _Served] = {}
        # Response headers by body length (most files share one or two), and the lock that
        # makes a file's super-seeding state once (see _seeder_of).
        self._headers: dict[int, bytes] = {}
        self._seeders_lock = threading.Lock()
        # The collection members open now, at most cfg.max_open_files that no reply holds.
        self.open_files = OpenFiles(cfg.max_open_files, self.features)
        self._conns: dict[int, _Conn] = {}
        # Held while a worker hands a connection back to the selector (``idle``
        # set, then the poller re-armed) and while the selector closes an idle one,
        # so a connection is never closed between the two and its descriptor
        # number reused under the worker's poller.modify.
        self._handover = threading.Lock()
        # Eviction candidates, oldest last (selector thread only).
        self._victims: list[tuple[float, _Conn]] = []
        self._jobs: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()
        # Sockets handed over by serve_connection, adopted by the selector thread.
        self._adopt: queue.SimpleQueue[tuple[socket.socket, str, str]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._poller: Poller | None = None
        # Each worker's buffer for the read-and-send fallback (no sendfile).
        self._local = threading.local()
        self._wake_r, self._wake_w = socket.socketpair()
        self._address: tuple[str, int] | None = None
        self._debug = False
        self._msg_more = self.features.msg_more
        # Counters for logs and tests; updated without a lock, so approximate.
        self.blocks_sent = 0
        self.have_maps_sent = 0
        self.bytes_sent = 0
        self.evicted = 0
        # Whether the upload has room to spare (see _upload_spare): the last look (when,
        # verdict), (when, bytes gone for good) over the last RATE_WINDOW, and the best
        # rate lately (bytes per second, when).
        self._spare_seen = (-SPARE_RECHECK, False)
        self._spare_lock = threading.Lock()  # one worker looks at a time; the others take the last verdict
        self._gone: collections.deque[tuple[float, int]] = collections.deque()
        self._best_rate = (0.0, 0.0)
        self._low_since: float | None = None  # since when the rate is below SPARE_FRACTION of the best
        self._spare_until = float("-inf")  # when the last spell of spare upload ends (see spare_hold)
        self._spare_hold = SPARE_HOLD  # the length of the last hold

    # --- files ---------------------------------------------------------------

    def add_store(
        self, store: BlockStore | MemberStore, changed: Callable[[VerifiedBlocks], None] | None = None
    ) -> None:
        """Serve ``store`` under its cascade hash (replacing an earlier store for the same hash).

        A :class:`MemberStore` is opened when a request needs it, through
        :attr:`open_files`. With ``changed``, requests now and then ``fstat``
        the data file and call ``changed(store)`` (from a worker thread: it
        must be quick) when its size or times moved, or when a member could not
        be reopened as the file verified, so a re-verification need not wait
        for the next periodic look. Raises ``OSError`` if an open file cannot be ``fstat``-ed.
        """
        cf = store.cf
        last = cf.last_block_length
        fd = store.fd if isinstance(store, BlockStore) else -1
        seen = _fstat_signature(fd) if changed is not None and fd >= 0 else (0, 0, 0)
        old = self._served.get(store.cascade_hash)
        self._served[store.cascade_hash] = _Served(
            store=store,
            fd=fd,
            count=cf.block_count,
            block_size=cf.block_size,
            full_header=self._ok_header(cf.block_size),
            last_length=last,
            last_header=self._ok_header(last),
            # A replaced store (a member's .part that got its name) keeps what was sent of it.
            seeder=old.seeder if old is not None and old.count == cf.block_count else None,
            changed=changed,
            seen=seen,
        )

    def _ok_header(self, length: int) -> bytes:
        """The status-0 header for a body of ``length`` bytes, shared by every file with that block length."""
        header = self._headers.get(length)
        if header is None:
            header = self._headers.setdefault(length, pack_block_response_header(BlockStatus.OK, length))
        return header

    def _seeder_of(self, served: _Served) -> SuperSeeder:
        """The super-seeding state of ``served``, made on first use (by whichever worker comes first)."""
        seeder = served.seeder
        if seeder is None:
            with self._seeders_lock:
                seeder = served.seeder
                if seeder is None:
                    seeder = served.seeder = SuperSeeder(served.count, self.config.superseed)
        return seeder

    # --- lifecycle -----------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); only valid after :meth:`start`."""
        if self._address is None:
            raise RuntimeError("BlockServer.address is known only after start()")
        return self._address

    def start(self, listen: bool = True) -> None:
        """Bind, listen and start the selector and worker threads; raises ``OSError`` if binding fails.

        With ``listen=False`` nothing is bound: connections come only through
        :meth:`serve_connection` (the socketpair tests).
        """
        listener = None
        if listen:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self._host, self._port))
                listener.listen(min(self.max_connections, socket.SOMAXCONN))
                listener.setblocking(False)
            except OSError:
                listener.close()
                raise
            self._listener = listener
            bound = listener.getsockname()
            self._address = (str(bound[0]), int(bound[1]))
        self._debug = request_log.isEnabledFor(logging.DEBUG)
        self._wake_r.setblocking(False)
        # A full wake socket already holds a pending wake-up: senders never block on it.
        self._wake_w.setblocking(False)
        ep = make_poller(self.features)
        if listener is not None:
            ep.register(listener.fileno(), IN)
        ep.register(self._wake_r.fileno(), IN)
        self._poller = ep
        threads = [threading.Thread(target=self._selector_loop, name="peer-selector", daemon=True)]
        threads += [
            threading.Thread(target=self._worker_loop, name=f"peer-worker-{i}", daemon=True)
            for i in range(self.max_workers)
        ]
        self._threads = threads
        for t in threads:
            t.start()

    def serve_connection(self, sock: socket.socket, host: str = "local", name: str = "") -> None:
        """Serve ``sock``, already connected, exactly as if it had just been accepted.

        The selector thread adopts it (limits and eviction included) and owns
        it from then on: the caller must not use it again. ``host`` and
        ``name`` label it in the logs and in the per-host eviction share.
        Call after :meth:`start`; raises ``RuntimeError`` once stopping.
        """
        if self._stopping.is_set() or self._poller is None:
            raise RuntimeError("BlockServer.serve_connection needs a started, running server")
        self._adopt.put((sock, host, name or f"{host}:fd{sock.fileno()}"))
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    def stop(self, timeout: float = 1.5) -> None:
        """Stop accepting, drop every connection and join the threads (at most ``timeout`` s)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._limiter:
            self._limiter.close()
        # Shutting a socket down (never closing one another thread owns) wakes
        # a worker blocked in poll or sendfile on it.
        for conn in list(self._conns.values()):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        for _ in range(self.max_workers):
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        while not self._adopt.empty():  # handed over too late to be adopted
            self._adopt.get_nowait()[0].close()
        if self._listener is not None:
            self._listener.close()
        if self._poller is not None and not any(t.is_alive() for t in self._threads):
            self._poller.close()
        self._wake_r.close()
        self._wake_w.close()
        # Files a reply still holds (a worker that outlived the timeout) close on release.
        self.open_files.close()

    # --- selector thread -----------------------------------------------------

    def _selector_loop(self) -> None:
        ep = self._poller
        assert ep is not None
        listen_fd = self._listener.fileno() if self._listener else -1
        wake_fd = self._wake_r.fileno()
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        try:
            while not self._stopping.is_set():
                try:
                    events = ep.poll(SWEEP_INTERVAL)
                except InterruptedError:
                    continue
                for fd, _mask in events:
                    try:
                        if fd == listen_fd:
                            self._accept()
                        elif fd == wake_fd:
                            with contextlib.suppress(OSError):
                                self._wake_r.recv(4096)
                            self._adopt_handed_over()
                        else:
                            self._dispatch(fd)
                    except Exception:
                        # One broken connection must not take the server down with it.
                        log.exception("block server: error handling a connection event")
                # The sweep runs on real time; the deadlines it checks are on the injectable clock.
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + SWEEP_INTERVAL
                    self._sweep(self._clock())
        except Exception:
            log.exception("block server selector failed; no longer accepting connections")
        finally:
            for conn in list(self._conns.values()):
                if conn.idle:
                    self._close(conn)
            while not self._adopt.empty():
                self._adopt.get_nowait()[0].close()

    def _dispatch(self, fd: int) -> None:
        conn = self._conns.get(fd)
        if conn is None:
            return
        if conn.draining:
            self._drain(conn)
        else:
            conn.idle = False
            self._jobs.put(conn)

    def _accept(self) -> None:
        assert self._listener is not None and self._poller is not None
        for _ in range(64):  # bounded; the listener stays readable if more are waiting
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors or similar: say so, and let the backlog wait a moment.
                log.warning("accept failed: %s", exc.strerror or exc)
                self._stopping.wait(0.05)
                return
            host = str(addr[0])
            self._take(sock, host, f"{host}:{addr[1]}")

    def _adopt_handed_over(self) -> None:
        while not self._adopt.empty():
            self._take(*self._adopt.get_nowait())

    def _take(self, sock: socket.socket, host: str, name: str) -> None:
        """Make a new connection ours (selector thread only): room at the cap, then its first deadline."""
        assert self._poller is not None
        now = self._clock()
        if not self.features.watchable(sock.fileno()):
            if self._debug:
                request_log.debug("%s: refused, descriptor %d is beyond what select() can watch", name, sock.fileno())
            sock.close()
            return
        if len(self._conns) >= self.max_connections and not self._evict():
            # Every slot is in a worker's hands right now: nothing idle to give up.
            if self._debug:
                request_log.debug("%s: refused, %d connections open and busy", name, len(self._conns))
            sock.close()
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, host, name, now, now + self.header_timeout)
        self._conns[conn.fd] = conn
        try:
            self._poller.register(conn.fd, IN, oneshot=True)
        except OSError:
            self._close(conn)
            return
        if self._debug:
            request_log.debug("%s: connected", name)

    def _drain(self, conn: _Conn) -> None:
        """Read and discard what a closing client still sends, until it closes too.

        A few reads per event at most: a client that keeps sending must not hold
        the selector thread; the linger deadline ends it.
        """
        try:
            for _ in range(4):
                if not conn.sock.recv(RECV_SIZE):
                    break
            else:
                self._rearm(conn)
                return
        except (BlockingIOError, InterruptedError):
            self._rearm(conn)
            return
        except OSError:
            pass
        self._close(conn)

    def _evict(self) -> bool:
        """Close the idle connection that has been quiet longest, to make room; False if none is idle.

        Candidates come in batches from one scan (see ``EVICT_BATCH``); one
        that woke up or closed since is skipped.
        """
        for _ in range(2):
            while self._victims:
                stamp, conn = self._victims.pop()
                with self._handover:
                    if conn.idle and conn.active == stamp and self._conns.get(conn.fd) is conn:
                        if self._debug:
                            request_log.debug("%s: evicted at the connection limit", conn.name)
                        self._close(conn)
                        self.evicted += 1
                        return True
            self._victims = self._pick_victims()
            if not self._victims:
                return False
        return False

    def _pick_victims(self) -> list[tuple[float, _Conn]]:
        """The next eviction candidates, oldest last: an address over half the slots first, then by age."""
        conns = list(self._conns.values())
        per_host = Counter(c.host for c in conns)
        share = self.max_connections // 2
        # Only as many from each host over its share as bring it down to it:
        # past that, its other connections are no more to blame than anyone's.
        over = {host: n - share for host, n in per_host.items() if n > share}
        idle = [(c.active, c) for c in conns if c.idle and c.host in over]
        batch: list[tuple[float, _Conn]] = []
        for active, conn in sorted(idle, key=lambda t: t[0]):
            if over[conn.host] > 0 and len(batch) < EVICT_BATCH:
                over[conn.host] -= 1
                batch.append((active, conn))
        if not batch:
            idle = [(c.active, c) for c in conns if c.idle]
            batch = heapq.nsmallest(EVICT_BATCH, idle, key=lambda t: t[0])
        batch.reverse()
        return batch

    def _sweep(self, now: float) -> None:
        with self._handover:
            for conn in list(self._conns.values()):
                if conn.idle and conn.deadline < now:
                    if self._debug and not conn.draining:
                        request_log.debug("%s: timed out, closed", conn.name)
                    self._close(conn)

    # --- connection ownership --------------------------------------------------

    def _close(self, conn: _Conn) -> None:
        # Forget the descriptor before closing it, so a reused number is never confused.
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]
        if self._poller is not None and conn.sock.fileno() >= 0:
            self._poller.forget(conn.fd)
        if conn.out_seeder is not None:
            conn.out_seeder.abandoned(id(conn))  # a block cut short left no copy: not a send
            conn.out_seeder = None
        # Its super-seeding claims go back to the other downloaders now.
        for seeder in conn.maps:
            seeder.forget(id(conn))
        conn.maps.clear()
        conn.sock.close()
        self._release(conn)

    def _release(self, conn: _Conn) -> None:
        """Give back the member file the finished (or abandoned) reply was sent from."""
        held = conn.out_open
        if held is not None:
            conn.out_open = None
            conn.out_fd = -1
            conn.out_src = None
            self.open_files.release(held)

    def _rearm(self, conn: _Conn, mask: int = IN) -> None:
        """Give the connection back to the selector thread (the caller must not touch it after)."""
        with self._handover:
            conn.idle = True
            try:
                assert self._poller is not None
                self._poller.modify(conn.fd, mask, oneshot=True)
            except (OSError, ValueError):
                # Closed meanwhile by stop().
                conn.idle = False
                self._close(conn)
                return
        # select() sees a re-armed descriptor only on its next call.
        if self._poller is not None and self._poller.needs_wake:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def _close_after_reply(self, conn: _Conn) -> None:
        """Close without losing the reply: with unread client bytes, close would send a reset."""
        sock = conn.sock
        try:
            pending = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pending = b""
        except OSError:
            self._close(conn)
            return
        if not pending or self._stopping.is_set():
            self._close(conn)
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        conn.draining = True
        conn.buf = b""
        conn.deadline = self._clock() + LINGER_SECONDS
        self._rearm(conn)

    # --- workers ---------------------------------------------------------------

    def _worker_loop(self) -> None:
        while True:
            conn = self._jobs.get()
            if conn is None or self._stopping.is_set():
                if conn is not None:
                    self._close(conn)
                return
            try:
                self._serve(conn)
            except _Close:
                self._close(conn)
            except OSError as exc:
                if self._debug:
                    request_log.debug("%s: %s", conn.name, exc.strerror or exc)
                self._close(conn)
            except Exception:
                log.exception("%s: unexpected error, connection dropped", conn.name)
                self._close(conn)

    def _serve(self, conn: _Conn) -> None:
        """Answer every whole request the connection has; park, re-arm or close it when done."""
        if conn.out_head or conn.out_left:
            # A response to a slow reader, resumed now that its socket is writable.
            if not self._pump(conn):
                return
            self._release(conn)
            if not conn.out_keep:
                self._close_after_reply(conn)
                return
            conn.active = now = self._clock()
            conn.deadline = now + self.idle_timeout
        sock = conn.sock
        buf = conn.buf
        clock = self._clock
        answered = 0
        while True:
            pos = 0
            end = len(buf) - BLOCK_REQUEST_SIZE
            while pos <= end:
                self._answer(conn, buf, pos)
                pos += BLOCK_REQUEST_SIZE
                if not self._pump(conn):
                    conn.buf = buf[pos:]
                    return
                self._release(conn)
                if not conn.out_keep:
                    self._close_after_reply(conn)
                    return
                conn.active = now = clock()
                conn.deadline = now + self.idle_timeout
                conn.partial_since = 0.0
                answered += 1
            if pos:
                buf = buf[pos:]
            if buf and not BLOCK_MAGIC.startswith(buf[:8]):
                # No need to wait for 64 bytes to know that a request cannot be parsed.
                self._reject_early(conn)
                return
            if self._stopping.is_set():
                raise _Close
            if answered >= FAIR_SHARE and not self._jobs.empty():
                # Others are waiting for a worker: take turns instead of serving one busy client forever.
                conn.buf = buf
                self._jobs.put(conn)
                return
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                raise _Close
            buf = buf + data if buf else data
        conn.buf = buf
        now = clock()
        if buf:
            # Half a request: the rest must come within header_timeout of its first byte.
            if not conn.partial_since:
                conn.partial_since = now
                conn.deadline = min(conn.deadline, now + self.header_timeout)
        else:
            conn.partial_since = 0.0
        if conn.deadline < now:
            if self._debug:
                request_log.debug("%s: request incomplete in time, closed", conn.name)
            raise _Close
        self._rearm(conn)

    def _reject_early(self, conn: _Conn) -> None:
        if self._debug:
            request_log.debug("%s: unparseable request (no CASCADE1 magic), closing", conn.name)
        conn.buf = b""
        conn.out_head, conn.out_keep = _BAD_REQUEST, False
        if self._pump(conn):
            self._close_after_reply(conn)

    def _answer(self, conn: _Conn, buf: bytes, pos: int) -> None:
        """Decide the reply to the request at ``buf[pos:pos+64]`` and queue it in ``conn.out_*``."""
        # The other 8 reserved bytes are looked at only for block number 2^64-1 (a have-map request).
        magic, marker, reserved, index, cascade_hash = unpack_block_request_from(buf, pos)
        if magic != BLOCK_MAGIC:
            if self._debug:
                request_log.debug("%s: unparseable request (magic %r), closing", conn.name, magic)
            conn.out_head, conn.out_keep = _BAD_REQUEST, False
            return
        keep: bool = marker == KEEPOPEN
        served = self._served.get(cascade_hash)
        if served is None:
            if self._debug:
                request_log.debug("%s: unknown hash %s", conn.name, cascade_hash.hex()[:16])
            conn.out_head, conn.out_keep = _UNKNOWN_HASH, False
            return
        count = served.count
        if index == HAVEMAP_INDEX and reserved == HAVEMAP:
            self._answer_have_map(conn, served, keep)
            return
        if index >= count:
            if self._debug:
                request_log.debug("%s: block %d past the end", conn.name, index)
            message = f"block number too large: block {index} requested, the file has {count} blocks"
            conn.out_head, conn.out_keep = _error_reply(BlockStatus.OUT_OF_RANGE, message), False
            return
        store = served.store
        if not store.has(index):
            self._not_present(conn, index, keep)
            return
        if isinstance(store, BlockStore):
            conn.out_fd = served.fd
            conn.out_src = store.pfile
        elif not self._open_member(conn, served, store, index):
            self._not_present(conn, index, keep)
            return
        if served.changed is not None:
            served.tick += 1  # unlocked: a lost increment only delays a check
            if not served.tick & (FSTAT_EVERY - 1):
                self._check_file(served, conn.out_fd)
        if index == count - 1:
            conn.out_head, conn.out_left = served.last_header, served.last_length
        else:
            conn.out_head, conn.out_left = served.full_header, served.block_size
        conn.out_offset = index * served.block_size
        conn.out_keep = keep
        # Sends count only to downloaders that ask for maps (peer.superseed), and the state is
        # made by the file's first map request: until then there is nothing to count.
        seeder = served.seeder
        conn.out_block, conn.out_seeder = index, seeder
        if seeder is not None:
            seeder.sending(index, id(conn), self._clock())
        self.blocks_sent += 1
        self.bytes_sent += conn.out_left
        if self._debug:
            request_log.debug("%s: sending block %d (%d bytes)", conn.name, index, conn.out_left)

    def _not_present(self, conn: _Conn, index: int, keep: bool) -> None:
        if self._debug:
            request_log.debug("%s: block %d not present", conn.name, index)
        conn.out_head = _error_reply(BlockStatus.NOT_PRESENT, f"block not present: block {index}")
        conn.out_keep = keep

    def _open_member(self, conn: _Conn, served: _Served, store: MemberStore, index: int) -> bool:
        """Hold a descriptor of the member for this reply; False (reply status 2) when it cannot be had.

        A file that is no longer the one verified wakes the watcher, which
        re-verifies it and logs one line; it is never served under the old hash.
        """
        try:
            held = self.open_files.acquire(store)
        except NotAsVerified as exc:
            if self._debug:
                request_log.debug("%s: block %d: %s", conn.name, index, exc)
            if served.changed is not None:
                served.changed(store)
            return False
        except DataError as exc:  # out of descriptors, say: try again later, the file is fine
            if self._debug:
                request_log.debug("%s: block %d: %s", conn.name, index, exc)
            return False
        if not store.has(index):  # re-verified meanwhile, and this block did not survive
            self.open_files.release(held)
            return False
        conn.out_open = held
        conn.out_fd = held.fd
        conn.out_src = held.src
        return True

    def _answer_have_map(self, conn: _Conn, served: _Served, keep: bool) -> None:
        """Queue the have map of ``served`` (docs/protocol-extensions.md): what it holds, and maybe an offer."""
        store = served.store
        held = bytes(store.valid)
        seeder = self._seeder_of(served)
        conn.maps.add(seeder)
        # Only a seeder proper (its file read-only, complete from the start) super-seeds: a
        # downloader that just finished has nothing the swarm lacks, and its offers would
        # only steer the last downloaders away from the blocks they still need.
        now = self._clock()
        complete = store.complete and not store.writable
        spare = complete and seeder.policy.spare_upload and self._upload_spare(now)
        offer = seeder.offer(id(conn), now, complete, spare)
        conn.out_head = HaveMap(held, offer).encode()
        conn.out_keep = keep
        self.have_maps_sent += 1
        if self._debug:
            request_log.debug(
                "%s: have map, %d of %d blocks held%s",
                conn.name,
                store.verified_count,
                served.count,
                "" if offer is None else f", {offer.count(1)} offered",
            )

    def _upload_spare(self, now: float) -> bool:
        """Whether this peer's upload has room to spare: it sends well below the best rate it showed lately.

        The rate is what left for good (``bytes_sent`` less what waits in replies
        under way and, unacknowledged, in the kernel's send queues) over the last
        ``RATE_WINDOW`` seconds; the best is the highest such rate in the last
        ``BEST_RATE_FOR`` seconds. An upload that is the swarm's bottleneck runs near
        its best; one that only waits for requests runs far below it. Looked at
        most every ``SPARE_RECHECK`` seconds (the map requests of many
        downloaders share a look); never without a way to ask the kernel (off Linux).
        """
        if not self.features.send_backlog:
            return False
        seen, spare = self._spare_seen
        if 0 <= now - seen < SPARE_RECHECK or not self._spare_lock.acquire(blocking=False):
            return spare  # looked at lately, or being looked at by another worker
        try:
            return self._look_for_spare(now, spare)
        finally:
            self._spare_lock.release()

    def _look_for_spare(self, now: float, spare: bool) -> bool:
        """One look of :meth:`_upload_spare` (under ``_spare_lock``): ``spare`` is the last verdict."""
        try:
            conns = list(self._conns.values())  # owned by the selector thread: a snapshot
        except RuntimeError:  # it changed under us: the last verdict stands a little longer
            return spare
        pending = 0
        for conn in conns:
            pending += conn.out_left
            with contextlib.suppress(OSError):  # closed meanwhile
                pending += send_backlog(conn.fd)
        gone = self.bytes_sent - pending
        samples = self._gone
        samples.append((now, gone))
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW:
            samples.popleft()
        t0, gone0 = samples[0]
        if now - t0 >= RATE_WINDOW / 2:
            rate = (gone - gone0) / (now - t0)
            best, when = self._best_rate
            if rate >= best or now - when > BEST_RATE_FOR:
                self._best_rate = best, when = rate, now
            # Spare once the rate has stayed low for SPARE_AFTER seconds (a swarm's tail, or
            # the gap between two turns, passes sooner), then for SPARE_HOLD seconds: the rate
            # climbs to new bests meanwhile, which says nothing about the room left.
            if now < self._spare_until:
                spare = True
            elif rate >= SPARE_FRACTION * best:
                self._low_since = None
                spare = False
            else:
                if self._low_since is None:
                    self._low_since = now
                spare = now - self._low_since >= SPARE_AFTER
                if spare:
                    self._spare_hold = spare_hold(now, self._spare_until, self._spare_hold)
                    self._spare_until = now + self._spare_hold
                    self._low_since = None
        self._spare_seen = (now, spare)
        return spare

    def _check_file(self, served: _Served, fd: int) -> None:
        store = served.store
        try:
            if isinstance(store, MemberStore):
                # Against what was verified: the descriptor may be newer than the last look.
                if signature_of(os.fstat(fd)) != store.verified and served.changed is not None:
                    served.changed(store)
                return
            now = _fstat_signature(fd)
        except OSError:
            return  # closed meanwhile by stop(); the watcher's own look covers the rest
        if now != served.seen and served.changed is not None:
            served.seen = now
            served.changed(store)

    # --- sending: zero-copy, rate-limited, never pinned by a slow reader ----------

    def _pump(self, conn: _Conn) -> bool:
        """Send the rest of ``conn``'s response. False when it was parked on a full socket.

        Raises ``_Close`` or ``OSError`` when the connection is finished.
        """
        sock = conn.sock
        while conn.out_head:
            # MSG_MORE holds a data header back so it leaves in one segment with the data.
            flags = self._msg_more if conn.out_left else 0
            try:
                n = sock.send(conn.out_head, flags)
            except (BlockingIOError, InterruptedError):
                if not self._writable_soon(conn):
                    return False
                continue
            conn.out_head = conn.out_head[n:]
        limiter = self._limiter
        out = conn.fd
        zero_copy = self.features.sendfile
        while conn.out_left:
            if limiter is None:
                count = conn.out_left
            else:
                if not conn.out_credit:
                    credit = min(conn.out_left, LIMITED_SLICE)
                    if not limiter.acquire(credit):
                        raise _Close
                    conn.out_credit = credit
                count = conn.out_credit
            try:
                if zero_copy:
                    sent = os.sendfile(out, conn.out_fd, conn.out_offset, count)
                else:
                    assert conn.out_src is not None
                    sent = send_from_file(sock, conn.out_src, conn.out_offset, count, self._send_buffer())
            except (BlockingIOError, InterruptedError):
                if not self._writable_soon(conn):
                    return False
                continue
            if sent == 0:
                # The data file shrank under us: nothing sane to send. The seeder's
                # watcher re-verifies the file and says so once; no line per request.
                if self._debug:
                    request_log.debug("%s: data file ended early at offset %d", conn.name, conn.out_offset)
                raise _Close
            conn.out_offset += sent
            conn.out_left -= sent
            if limiter is not None:
                conn.out_credit -= sent
        seeder = conn.out_seeder
        if seeder is not None:
            # Counted now, not when queued: a block on a shared slow link is seconds under way.
            conn.out_seeder = None
            seeder.sent_block(conn.out_block, id(conn), self._clock())
        return True

    def _writable_soon(self, conn: _Conn) -> bool:
        """Wait briefly for room in the socket; else park the connection on the selector.

        A fast reader frees room within microseconds, so the worker keeps it. A
        slow one is handed back to the selector thread (EPOLLOUT), so it never
        pins a worker; the idle sweep drops it if it makes no progress.
        """
        if self._stopping.is_set():
            raise _Close
        if wait_writable(conn.fd, WRITE_WAIT_MS, self.features):
            return True
        if self._stopping.is_set():
            raise _Close
        conn.deadline = self._clock() + self.idle_timeout
        if self._debug:
            request_log.debug("%s: slow reader, %d bytes of the reply wait for room", conn.name, conn.out_left)
        self._rearm(conn, OUT)
        return False

    def _send_buffer(self) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(SEND_CHUNK)
        return buf


def _fstat_signature(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
