"""Talking to one peer: non-blocking connects, and one connection's requests and responses.

The decisions (which blocks, how many in flight, how long a response may
take, what an answer means for the peer) belong to the planner
(:mod:`peer.planner`), reached through the :class:`Shell` the coordinator
passes in; this module does the socket I/O.

For a collection (:class:`Members`), block numbers are those of one block
space over every member (:class:`peer.planner.Spans`): each request names the
member's cascade hash and its own block number, so one connection carries
requests for any member. A status 1 for a member means the peer does not
serve that one: the planner stops asking it for that member, and the
connection (which the server closes) is made again. Have maps are per file
and not asked for a collection.

A connection keeps several requests in flight (PROTOCOL.md section 5,
``KEEPOPEN``). Whether a server does keep connections open is learnt on the
first connection to it (the *probe*): a server that closes, resets or goes
silent after exactly one response serves one request per connection, and is
from then on asked one block per connection. A server that rejects the
``KEEPOPEN`` marker with BAD_REQUEST gets plain requests.

Have maps (docs/protocol-extensions.md): the first request on a connection
is a have-map request, alone; a peer that answers it is asked again every
``MAP_REFRESH`` s (pipelined between block requests, answered in order), or
every ``MAP_IDLE_REFRESH`` s while the planner has nothing to ask it. A peer
that answers status 3, closes or breaks off instead is asked for blocks as
before, on a new connection, and never for a map again; a status 1 gets one
more try once the peer is seen to serve the file (a fetcher that had not
opened its file yet).

Responses are read through a small buffer, so many small blocks come in with
one ``recv``; a large body is read straight into a per-connection block
buffer. A response has a deadline as a whole, not per ``recv``: a byte a
second cannot hold a slot.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import Protocol

from cascade.errors import ProtocolError
from cascade.metafile import CascadeFile
from cascade.wire import (
    BLOCK_RESPONSE_HEADER_SIZE,
    BlockStatus,
    HaveMap,
    have_map_forms,
    have_map_size,
    pack_block_request,
    pack_have_map_request,
    unpack_block_response_header_from,
)
from oscompat import Features
from oscompat.poller import make_selector
from peer.planner import PeerAddr, Session
from peer.writebehind import Lender

# An error message longer than this is not a message: the peer is sending garbage.
MAX_MESSAGE = 64 << 10
# Responses are read through a buffer of this size: a recv brings in many
# small blocks at once, while a large body goes straight to the block buffer.
READ_BUFFER = 128 << 10
# With blocks of up to half that size the buffer holds 16 blocks, up to this:
# fewer recv calls (and buffer compactions) per block.
READ_BUFFER_MAX = 1 << 20
# While the planner has nothing for a peer, its connection looks again this often
# (arbitrary: short next to a response timeout, long enough to stay idle).
IDLE_WAIT = 0.05
# In a session's requests in flight, a have-map request (docs/protocol-extensions.md).
MAP = -1
# A peer that answers have maps is asked again this often on a busy connection, and
# after MAP_IDLE_REFRESH when the planner has nothing to ask it: fresh enough that
# rarest-first follows the swarm, for n/8 bytes per map. Arbitrary.
MAP_REFRESH = 0.5
MAP_IDLE_REFRESH = 0.15
# A super-seeder's offer we used up is asked again at once when the blocks asked for
# from it outweigh a map (its reply: two bitmaps); one that named no block we still need,
# after MAP_RETRY seconds, or longer for large maps: at most MAP_RETRY_RATE bytes of maps
# a second. Arbitrary: far below MAP_IDLE_REFRESH, far above a loopback round trip (a
# seeder that keeps offering what we hold is asked at most 50 times a second); the rate
# keeps the maps of a 65,536-block file (16 KiB) to about one per MAP_IDLE_REFRESH.
MAP_RETRY = 0.02
MAP_RETRY_RATE = 128 << 10
# An empty offer ("wait your turn") is asked again after this long. Arbitrary, measured:
# at the idle refresh (0.15 s) the loopback 1 + 8 swarm took 6.0-6.4 s, at 20 ms 4.7-4.9 s,
# at 50 ms 4.9-5.0 s; twelve fetchers waiting send a seeder 240 map requests a second.
MAP_TURN_RETRY = 0.05


class Offence(Exception):
    """The peer broke the protocol or sent bad data: drop it and count an offence."""


class Drop(Exception):
    """The peer cannot help right now (refused, timed out, closed): drop it with backoff."""


class Downgrade(Exception):
    """The peer needs a simpler way of asking: reconnect at once in that mode."""


class Closed(Exception):
    """The peer closed the connection; ``partial`` bytes of a frame had arrived."""

    def __init__(self, partial: int) -> None:
        super().__init__("closed the connection")
        self.partial = partial


def describe(exc: BaseException) -> str:
    """A short text for a low-level error, for logs."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Members(Protocol):
    """A collection's members as one block space, as a connection sees them."""

    @property
    def max_block_size(self) -> int: ...

    def block_length(self, i: int) -> int:
        """The length of block ``i`` of the space."""
        ...

    def request(self, i: int, keep_open: bool) -> bytes:
        """The block request for block ``i`` of the space (its member's hash and own block number)."""
        ...


class Shell(Protocol):
    """What a connection asks of the coordinator (which asks the planner, under its lock)."""

    def going(self, session: Session) -> bool:
        """The session should go on: not stopping, not banned, not evicted."""
        ...

    def complete(self) -> bool: ...

    def request(self, session: Session, want: int) -> list[int]:
        """Blocks to ask for (appended to ``session.outstanding``)."""
        ...

    def idle(self, session: Session, wait: float = IDLE_WAIT) -> None:
        """Nothing to ask for now: wait a little (at most ``wait`` seconds)."""
        ...

    def depth(self, session: Session) -> int: ...

    def response_timeout(self, session: Session) -> float: ...

    def answered(self, session: Session) -> None: ...

    def arrived(self, session: Session, i: int, body: memoryview, lender: Lender | None = None) -> None:
        """The body of block ``i`` (its length checked): verify, write, count; raises :class:`Offence`.

        ``lender``: the reader whose buffer ``body`` is in, which may trade it for another
        (peer.writebehind), so the block need not be copied.
        """
        ...

    def lacked(self, session: Session, i: int) -> None: ...

    def lacks_member(self, session: Session, i: int) -> None:
        """The peer does not serve the collection member of block ``i`` (status 1)."""
        ...

    def have_map(self, session: Session, have: HaveMap) -> None:
        """The peer's have map (its length checked against the file)."""
        ...

    def throttle(self, length: int) -> None:
        """Hold the download rate limit (may sleep)."""
        ...

    def adopt(self, session: Session, sock: socket.socket) -> None:
        """Make a fresh connection the session's; raises :class:`Drop` for ourselves or when stopping."""
        ...

    def release_socket(self, session: Session) -> None:
        """The session's connection is closed (nothing to evict any more)."""
        ...


class Reader:
    """Buffered reads of block responses from one socket, without trusting one ``recv``."""

    __slots__ = ("buf", "deadline", "hi", "lo", "mv", "scratch", "sock")

    def __init__(self, sock: socket.socket | None, block_size: int) -> None:
        self.sock: socket.socket = sock  # type: ignore[assignment]  # set by reset() before use
        small = block_size <= READ_BUFFER // 2
        self.buf = bytearray(max(READ_BUFFER, min(READ_BUFFER_MAX, 16 * block_size)) if small else READ_BUFFER)
        self.mv = memoryview(self.buf)
        self.lo = 0
        self.hi = 0
        # Bodies larger than half the read buffer are read straight into this (see trade).
        self.scratch = None if small else bytearray(block_size)
        # time.monotonic() by which the current response must be complete: a
        # socket timeout alone bounds one recv, and a byte a second never trips it.
        # Real time, not the injected clock: it sets socket timeouts.
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
                raise Closed(self.hi - self.lo)
            self.hi += got

    def header(self) -> tuple[int, int]:
        """The next response header: (status, the body length the peer claims)."""
        # With large blocks, read just the header: the body then goes straight
        # into the block buffer instead of through this one (one copy less).
        self._fill(BLOCK_RESPONSE_HEADER_SIZE, exact=self.scratch is not None)
        status, length = unpack_block_response_header_from(self.buf, self.lo)
        self.lo += BLOCK_RESPONSE_HEADER_SIZE
        return status, length

    def body(self, n: int) -> memoryview:
        """The next ``n`` bytes; the view is valid until the next read."""
        if n <= len(self.buf) // 2 or self.scratch is None:
            if n > len(self.buf):
                raise Offence(f"sent a {n}-byte message")
            self._fill(n)
            view = self.mv[self.lo : self.lo + n]
            self.lo += n
            return view
        scratch = memoryview(self.scratch)
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
                raise Closed(have + 1)
            have += got
        return scratch[:n]

    def lends(self, body: memoryview) -> bool:
        """Whether ``body`` was read into the scratch buffer, which may be traded (peer.writebehind.Lender)."""
        return self.scratch is not None and body.obj is self.scratch

    def trade(self, buf: bytearray) -> bytearray | None:
        """Read large bodies into ``buf`` from now on; the scratch buffer given up (None if ``buf`` is too small).

        The last body read is at its start and is no longer this reader's: whoever
        traded keeps it (the write-behind thread writes from it).
        """
        old = self.scratch
        if old is None or len(buf) < len(old):
            return None
        self.scratch = buf
        return old


class Connection:
    """Runs one session: requests out, responses in, over one connection or one per request.

    Raises :class:`Offence`, :class:`Drop`, :class:`Downgrade`, :class:`Closed`
    or ``OSError`` when the session must end; returns when it ends normally
    (the download is complete, or the peer turned out to serve one request
    per connection: the coordinator reconnects in that mode).
    """

    def __init__(
        self,
        shell: Shell,
        session: Session,
        cf: CascadeFile,
        connect_timeout: float,
        members: Members | None = None,
    ) -> None:
        self.shell = shell
        self.session = session
        self.cf = cf
        self.connect_timeout = connect_timeout
        # A collection: block numbers are of its block space, ``cf`` names no file.
        self.members = members
        self.reader = Reader(None, cf.block_size if members is None else members.max_block_size)
        self._hash = cf.cascade_hash
        self._length = cf.block_length if members is None else members.block_length
        # Responses read on this connection (for the keep-open probe).
        self.responses = 0
        # When the last have-map request went out (time.monotonic), and whether one is in flight.
        self.map_asked = float("-inf")
        self.map_pending = False
        # Bytes of blocks asked for since the last have-map request, and what a map reply weighs.
        self.asked_since_map = 0
        self.map_bytes = 2 * have_map_size(cf.block_count)
        # Maps are read through the read buffer: a file whose maps do not fit is fetched without them.
        self.maps_fit = members is None and self.map_bytes <= READ_BUFFER // 2
        # Not on the connection right after a status 1 to a map request (see _read_map).
        self.blind_probe = session.peer.map_refused
        self.ask_maps = self.maps_fit and not self.blind_probe
        session.peer.map_refused = False

    def run(self, first: socket.socket) -> None:
        """Talk to the peer over ``first`` (already connected), then reconnecting as needed."""
        self.shell.adopt(self.session, first)
        if self.session.peer.keepopen is False:
            self._one_per_connection(first)
        else:
            self._pipelined(first)

    def _request(self, i: int) -> bytes:
        if self.members is not None:
            return self.members.request(i, not self.session.peer.plain)
        return pack_block_request(i, self._hash, keep_open=not self.session.peer.plain)

    def _closes_after_one(self) -> bool:
        """The keep-open probe: a first connection that ends right after one response.

        Such a server serves one request per connection: True (and so
        recorded) when this failure is that, else False.
        """
        peer = self.session.peer
        if self.responses == 1 and peer.keepopen is None:
            peer.keepopen = False
            return True
        return False

    def _pipelined(self, sock: socket.socket) -> None:
        """Kept-open connection with requests in flight; switches the peer to one per connection if it closes."""
        shell, session = self.shell, self.session
        out, reader = session.outstanding, self.reader
        reader.reset(sock)
        peer = session.peer
        idle_since = float("inf")
        while shell.going(session):
            frames: list[bytes] = []
            now = time.monotonic()
            # A super-seeder's offer holds until our next map request reaches it: blocks asked
            # for after that request may have been offered to another downloader meanwhile
            # (docs/protocol-extensions.md). So none are asked for while a map is on its way.
            used_up = turn = False
            wait = IDLE_WAIT
            if (peer.maps is not None or not self.ask_maps) and not (self.map_pending and peer.offer is not None):
                # The first request goes alone: a server that closes after each
                # response then never has unread requests (which would make it reset).
                depth = shell.depth(session) if self.responses else 1
                if len(out) <= depth // 2:
                    batch = shell.request(session, depth - len(out))
                    frames += [self._request(i) for i in batch]
                    if self.ask_maps:  # only a map request reads it (a collection asks none)
                        self.asked_since_map += sum(map(self._length, batch))
                    # A super-seeder's offer gave fewer blocks than the pipeline takes: it is
                    # used up (a first offer names two blocks), and waiting for the next
                    # refresh would idle this connection (150 ms at the start of every fetch).
                    # An empty offer says "wait your turn": asked again a little later.
                    offer = peer.offer
                    if offer is not None and len(batch) < depth - len(out):
                        used_up = 1 in offer
                        turn = not used_up
            if peer.maps is not False and self.ask_maps and not self.map_pending:
                # The first map request goes alone (an old server answers status 3 and may
                # close); later ones ride along behind block requests, answered in order:
                # behind, so that the blocks chosen from the current offer are asked for
                # before the offer is replaced. A used-up offer is asked again at once if
                # its blocks outweigh the map, else after MAP_RETRY (it named only blocks we
                # hold: the seeder learns that from our map request).
                if used_up:
                    retry = max(MAP_RETRY, self.map_bytes / MAP_RETRY_RATE)
                    due = self.map_asked + (0.0 if self.asked_since_map >= self.map_bytes else retry)
                elif turn:
                    due = self.map_asked + max(MAP_TURN_RETRY, self.map_bytes / MAP_RETRY_RATE)
                else:
                    due = self.map_asked + (MAP_REFRESH if idle_since > now else MAP_IDLE_REFRESH)
                if not self.responses or (peer.maps and now >= due):
                    frames.append(pack_have_map_request(self._hash, keep_open=not peer.plain))
                    out.append(MAP)
                    self.map_asked = now
                    self.map_pending = True
                    self.asked_since_map = 0
                elif used_up or turn:
                    wait = min(IDLE_WAIT, due - now)  # idle only until that map is due
            if frames:
                try:
                    sock.sendall(b"".join(frames))
                except OSError as exc:
                    if self._closes_after_one():
                        return
                    raise Drop(f"send failed: {describe(exc)}") from exc
            if not out:
                if shell.complete():
                    return
                if idle_since > now:
                    idle_since = now
                shell.idle(session, wait)  # nothing this peer can give us right now
                continue
            idle_since = float("inf")
            timeout = shell.response_timeout(session)
            reader.deadline = time.monotonic() + timeout
            try:
                self._read_response()
            except (Closed, ConnectionResetError, TimeoutError) as exc:
                if out and out[0] == MAP and peer.maps is None:
                    # It broke off (or never answered) our first map request: an old server
                    # that chokes on block 2^64-1. Ask it for blocks, on a new connection.
                    peer.maps = False
                    raise Downgrade("no answer to a have-map request") from exc
                clean = not isinstance(exc, Closed) or exc.partial == 0
                if clean and self._closes_after_one():
                    return
                if isinstance(exc, Closed) and exc.partial == 0 and self.responses >= 2:
                    return  # closed between responses (an idle or per-connection limit): reconnect at once
                if isinstance(exc, TimeoutError):
                    raise Drop(f"no whole response within {timeout:.1f} s") from exc
                raise
            self.responses += 1
            if self.responses == 2:
                session.peer.keepopen = True
            if self.blind_probe and peer.maps is None:
                raise Downgrade("it serves the file now: ask for its map again")

    def _one_per_connection(self, first: socket.socket | None) -> None:
        """One connection per request, for servers that close after each response (``first``: already open)."""
        shell, session, reader = self.shell, self.session, self.reader
        while shell.going(session):
            batch = shell.request(session, 1)
            if not batch:
                if shell.complete():
                    return
                shell.idle(session)
                continue
            sock = first or self._connect()
            first = None
            timeout = 0.0
            try:
                sock.sendall(self._request(batch[0]))
                reader.reset(sock)
                timeout = shell.response_timeout(session)
                reader.deadline = time.monotonic() + timeout
                self._read_response()
            except TimeoutError as exc:
                raise Drop(f"no whole response within {timeout:.1f} s") from exc
            finally:
                shell.release_socket(session)
                sock.close()

    def _connect(self) -> socket.socket:
        """A blocking connect, for a peer known to be alive (one connection per request)."""
        try:
            sock = socket.create_connection(self.session.peer.addr, timeout=self.connect_timeout)
        except OSError as exc:
            raise Drop(f"cannot connect: {describe(exc)}") from exc
        self.shell.adopt(self.session, sock)
        return sock

    def _read_response(self) -> None:
        """Read the response to the oldest request in flight and act on it."""
        shell, session, reader = self.shell, self.session, self.reader
        peer = session.peer
        i = session.outstanding[0]
        status, length = reader.header()
        if i == MAP:
            self._read_map(status, length)
            return
        if not peer.answered and status in (BlockStatus.OK, BlockStatus.NOT_PRESENT):
            shell.answered(session)
        if status == BlockStatus.OK:
            # The one length check on a block's path: before its body is read.
            expected = self._length(i)
            if length != expected:
                raise Offence(f"announced {length} bytes for block {i}, which has {expected}")
            body = reader.body(length)
            shell.arrived(session, i, body, reader if reader.lends(body) else None)
            shell.throttle(length)
        elif status == BlockStatus.NOT_PRESENT:
            if length > MAX_MESSAGE:
                raise Offence(f"sent a {length}-byte message")
            reader.body(length)
            shell.lacked(session, i)
        elif status == BlockStatus.BAD_REQUEST and not peer.plain:
            # Our request is well-formed, so the server must have choked on the KEEPOPEN
            # marker in the reserved bytes: go on with plain requests, one per connection.
            peer.plain = True
            peer.keepopen = False
            raise Downgrade("rejected a KEEPOPEN request; using plain requests")
        elif status == BlockStatus.INVALID_HASH and self.members is not None:
            # It does not serve this member (an older fetcher that has not started it, or a peer of
            # another collection that shares only some members): it closes now.
            if length <= MAX_MESSAGE:
                reader.body(length)
            shell.lacks_member(session, i)
            raise Downgrade(f"does not serve the member of block {i}")
        elif status in (BlockStatus.INVALID_HASH, BlockStatus.OUT_OF_RANGE, BlockStatus.BAD_REQUEST):
            message = bytes(reader.body(length)).decode("utf-8", "replace") if length <= MAX_MESSAGE else ""
            raise Drop(f"answered status {status}: {message[:200]}")
        else:
            raise Offence(f"sent an unknown status {status}")

    def _read_map(self, status: int, length: int) -> None:
        """The reply to a have-map request: the map, or the news that the peer has no maps."""
        session, reader = self.session, self.reader
        peer = session.peer
        session.outstanding.popleft()
        self.map_pending = False
        if status == BlockStatus.OK:
            try:
                have_map_forms(length, self.cf.block_count)  # before a byte of the body is read
            except ProtocolError as exc:
                # An old server that answers any block number with data, or a broken one:
                # it does not speak have maps; start over without them.
                peer.maps = False
                raise Downgrade(f"no have maps ({exc})") from exc
            have = HaveMap.decode_body(reader.body(length), self.cf.block_count)
            if not peer.answered:
                self.shell.answered(session)
            self.shell.have_map(session, have)
            return
        if status == BlockStatus.INVALID_HASH:
            # It does not serve this file yet (a fetcher that just started), or it answers
            # status 1 for a block number past the end (then it closes). The next connection
            # asks for one block without a map: if that is answered (the file is served), the
            # one after tries a map again, and a second refusal means "no maps".
            peer.map_strikes += 1
            if peer.map_strikes >= 2:
                peer.maps = False
            else:
                peer.map_refused = True
            raise Downgrade("answered status 1 to a have-map request")
        peer.maps = False
        if status == BlockStatus.NOT_PRESENT:
            if length > MAX_MESSAGE:
                raise Offence(f"sent a {length}-byte message")
            reader.body(length)
            return
        # Status 3 (or 4): a version-1 server, which closes now; reconnect without maps.
        raise Downgrade("the peer does not answer have maps")


ConnectDone = tuple[PeerAddr, socket.socket | None, str]


# connect_ex on a non-blocking socket: under way (Windows says WSAEWOULDBLOCK).
_CONNECT_STARTED = frozenset({0, errno.EINPROGRESS, errno.EAGAIN, getattr(errno, "WSAEWOULDBLOCK", errno.EAGAIN)})


class Connector:
    """Non-blocking connects to many addresses at once, each with its own deadline.

    A dead address costs a socket and a selector slot until it is refused
    or its deadline passes, never a thread or a session slot. Deadlines are
    real time (``now``, default ``time.monotonic``), like the sockets'.
    ``features``: what this OS offers, as its caller detected it.
    """

    def __init__(self, features: Features, now: Callable[[], float] = time.monotonic) -> None:
        self._sel = make_selector(features)
        self._pending: dict[socket.socket, tuple[PeerAddr, float]] = {}
        self._now = now

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, addr: PeerAddr, timeout: float) -> str | None:
        """Begin connecting to ``addr``; an error text when it failed at once, else None."""
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            return describe(exc)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(addr)
        except OSError as exc:  # a name that does not resolve, an address of the wrong family
            sock.close()
            return describe(exc)
        if err not in _CONNECT_STARTED:
            sock.close()
            return os.strerror(err)
        self._pending[sock] = (addr, self._now() + timeout)
        self._sel.register(sock, selectors.EVENT_WRITE)
        return None

    def poll(self, timeout: float) -> list[ConnectDone]:
        """Wait up to ``timeout`` s; returns (addr, connected blocking socket or None, error) per finished connect."""
        done: list[ConnectDone] = []
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
        now = self._now()
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
