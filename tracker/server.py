"""The binary tracker protocol (PROTOCOL.md section 2) over TCP.

Shape: a fixed set of worker threads, each running its own event loop (epoll
on Linux, else the ``selectors`` module: see :mod:`oscompat.poller`) over
non-blocking sockets. Every worker watches the one listening socket
(``EPOLLEXCLUSIVE``, so a new connection wakes one worker, not all). A worker
accepts, tries to read the 54-byte request at once (``TCP_DEFER_ACCEPT``
makes the kernel hand over connections only once data has arrived, so this
usually succeeds), answers and closes. A client that sends slowly is parked
in the worker's epoll set with a read deadline, so an idle or slow client
never holds a worker, and idle connections cost nothing but a file
descriptor. ``max_connections`` caps the parked ones (lowered under
select()'s FD_SETSIZE where select is the event loop). Without
``EPOLLEXCLUSIVE`` every worker wakes for a new connection and the losers'
non-blocking accept finds nothing; without ``TCP_DEFER_ACCEPT`` more
connections are parked before their request arrives. Both are only slower.
:meth:`TrackerServer.serve_connection` hands an already-connected socket to a
worker, which takes it exactly as an accepted one: the socketpair tests use it,
with an injected clock for the read deadline.

Why not ``socketserver.ThreadingTCPServer``: a thread per connection tops out
well below 10,000 requests/s in CPython on two cores, and an idle client
would hold a thread for the whole read timeout.

The server never parses more than the 54 bytes of one request. A malformed
header gets an error reply naming the field as soon as its 16 bytes are in;
then a lingering close drops (never parses) what else the client sent, at
most a few KiB, so the kernel does not reset the connection before the
client reads the message.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cascade.errors import ProtocolError
from cascade.wire import (
    PEER_RECORD_SIZE,
    TRACKER_HEADER_SIZE,
    TRACKER_REQUEST_SIZE,
    TrackerCommand,
    TrackerRequest,
    TrackerStatus,
    is_any_ip_key,
    pack_tracker_reply_header,
    split_tracker_request,
    tracker_request_header,
    with_key_ip,
)
from oscompat import Features, detect
from oscompat.poller import IN, OUT, Poller, make_poller
from tracker.store import StoreUnavailable, SwarmStore
from tracker.swarms import AnnounceRefused

log = logging.getLogger(__name__)

_LIST_HEADER = tracker_request_header(TrackerCommand.LIST)
_SUBSCRIBE_HEADER = tracker_request_header(TrackerCommand.SUBSCRIBE)
_ACCEPT_BATCH = 64  # connections taken per wake-up; arbitrary, keeps other events flowing
_MAX_EVENTS = 64  # epoll events handled per wake-up (the selectors path returns all)
_POLL_CAP = 0.2  # seconds; how often an idle worker looks at the stop flag
# One byte more than a request is asked of recv, never parsed: it tells that the
# client sent more than 54 bytes, and then the reply ends in a lingering close.
_PROBE_SIZE = TRACKER_REQUEST_SIZE + 1
# After an error reply, bytes read and dropped while waiting for the client to
# close; arbitrary, just enough for a client that sent a somewhat longer body.
_DRAIN_LIMIT = 4096
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the TCP front end behaves; the defaults live here."""

    host: str = "0.0.0.0"
    port: int = 8888
    workers: int = 2
    max_connections: int = 1024  # connections parked waiting for their request
    read_timeout: float = 5.0  # seconds from accept to a whole request
    shutdown_grace: float = 0.5  # seconds parked connections get to finish at shutdown
    backlog: int = 1024
    verbose: bool = False


def error_reply(status: int, message: str) -> bytes:
    body = message.encode("utf-8")
    return pack_tracker_reply_header(status, len(body)) + body


class _Conn:
    """A connection parked in a worker's poller."""

    __slots__ = ("buf", "deadline", "drained", "ip", "linger", "out", "sock", "state")

    READING = 0
    WRITING = 1
    DRAINING = 2

    def __init__(self, sock: socket.socket, ip: str, buf: bytes, deadline: float) -> None:
        self.sock = sock
        self.ip = ip
        self.buf = buf
        self.deadline = deadline
        self.out = b""
        self.drained = 0
        self.linger = False
        self.state = _Conn.READING


class _Loop:
    """One worker's event loop: its poller, its connections by fd, their read deadlines."""

    __slots__ = ("conns", "ep", "timeouts")

    def __init__(self, features: Features) -> None:
        self.ep: Poller = make_poller(features)
        self.conns: dict[int, _Conn] = {}
        # Every deadline is "registration + read_timeout", so appending keeps this sorted.
        self.timeouts: deque[tuple[float, _Conn]] = deque()


class TrackerServer:
    """Serves a :class:`~tracker.store.SwarmStore` over the binary protocol until :meth:`shutdown`."""

    def __init__(
        self,
        registry: SwarmStore,
        config: ServerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (monotonic seconds) times the read deadlines; tests pass a virtual one."""
        self.registry = registry
        self.config = config or ServerConfig()
        self._clock = clock
        self.features = detect()
        # select() cannot watch more than FD_SETSIZE sockets: the cap is lowered where it is the selector.
        self.max_connections = self.features.connection_cap(self.config.max_connections)
        # Without MSG_DONTWAIT (Windows, portable mode) accepted sockets are made non-blocking instead.
        self._dontwait = self.features.dontwait
        self._sock: socket.socket | None = None
        # Sockets handed over by serve_connection; the wake socket tells a worker to take them.
        self._handed: queue.SimpleQueue[tuple[socket.socket, str]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._held = 0
        self._held_lock = threading.Lock()
        self._verbose = self.config.verbose

    # --- lifecycle ------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Create the listening socket; returns (host, port). Raises :class:`OSError`."""
        cfg = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.features.defer_accept:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
            sock.bind((cfg.host, cfg.port))
            sock.listen(cfg.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return cfg.host, sock.getsockname()[1]

    def start(self) -> None:
        """Start the workers (after :meth:`bind`, or without it to serve only :meth:`serve_connection`)."""
        for i in range(max(1, self.config.workers)):
            t = threading.Thread(target=self._worker, args=(i,), name=f"tracker-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def alive(self) -> bool:
        """True while at least one worker runs (they only stop on shutdown, or on a logged bug)."""
        return any(t.is_alive() for t in self._threads)

    def serve_connection(self, sock: socket.socket, ip: str = "127.0.0.1") -> None:
        """Serve ``sock``, already connected, exactly as an accepted connection from ``ip``.

        A worker takes it over (the caller must not use it again). ``ip`` is
        the source address (it replaces an announced 0.0.0.0). Call after
        :meth:`start`; raises ``RuntimeError`` once shutting down.
        """
        if self._stopping.is_set() or not self._threads:
            raise RuntimeError("TrackerServer.serve_connection needs a started, running server")
        self._handed.put((sock, ip))
        self._wake_w.send(b"x")

    def shutdown(self, timeout: float = 1.5) -> None:
        """Stop accepting, let parked connections finish (briefly), then close everything."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._sock is not None:
            self._sock.close()
        while not self._handed.empty():  # handed over too late to be taken
            self._handed.get_nowait()[0].close()
        if not self.alive:
            self._wake_r.close()
            self._wake_w.close()

    # --- the request itself -----------------------------------------------

    def _reply(self, data: bytes, ip: str) -> bytes:
        """The whole reply to one 54-byte request received from ``ip``."""
        head, cascade_hash, key = split_tracker_request(data)
        if head == _LIST_HEADER:
            subscribe = False
        elif head == _SUBSCRIBE_HEADER:
            subscribe = True
        else:
            return self._bad_header(head, ip)
        if is_any_ip_key(key):
            key = with_key_ip(key, socket.inet_aton(ip))
        try:
            body = self.registry.announce_packed(cascade_hash, key, subscribe)
        except AnnounceRefused as exc:
            if self._verbose:
                log.info("%s refused: %s", ip, exc.message)
            return error_reply(exc.status, exc.message)
        except StoreUnavailable as exc:  # Redis is down: the store logged it once; answer at once
            return error_reply(TrackerStatus.UNAVAILABLE, str(exc))
        except Exception:  # a bug must cost one request, not the worker
            self.registry.count_error("internal")
            log.exception("tracker: request from %s failed", ip)
            return error_reply(TrackerStatus.INTERNAL, "internal tracker error")
        if self._verbose:
            log.debug(
                "%s %s %s -> %d peers",
                ip,
                "subscribe" if subscribe else "list",
                cascade_hash.hex()[:16],
                len(body) // PEER_RECORD_SIZE,
            )
        return pack_tracker_reply_header(TrackerStatus.OK, len(body)) + body

    def _bad_header(self, head: bytes, ip: str) -> bytes:
        try:
            TrackerRequest.check_header(head)
            message = "malformed request"  # unreachable: a valid header matched above
        except ProtocolError as exc:
            message = str(exc)
        self.registry.count_request("tcp", "invalid", TrackerStatus.BAD_REQUEST)
        if self._verbose:
            log.info("%s bad request: %s", ip, message)
        return error_reply(TrackerStatus.BAD_REQUEST, message)

    def _partial_header_error(self, buf: bytes, ip: str) -> bytes | None:
        """The error reply if the header fields received so far (whole 4-byte fields) are already wrong."""
        whole = min(len(buf), TRACKER_HEADER_SIZE) // 4 * 4
        if whole == 0:
            return None
        got = buf[:whole]
        if got == _LIST_HEADER[:whole] or got == _SUBSCRIBE_HEADER[:whole]:
            return None
        # Complete the header with valid fields, so the message names a field the client really sent wrong.
        return self._bad_header(got + _LIST_HEADER[whole:], ip)

    # --- the event loop -----------------------------------------------------

    def _worker(self, index: int) -> None:
        lsock = self._sock
        lfd = lsock.fileno() if lsock is not None else -1
        wfd = self._wake_r.fileno()
        clock = self._clock
        loop = _Loop(self.features)
        ep, conns, timeouts = loop.ep, loop.conns, loop.timeouts
        if lsock is not None:
            ep.register(lfd, IN, exclusive=True)
        ep.register(wfd, IN, exclusive=True)
        listening = True
        stop_at = 0.0
        # Shutdown and the registry sweep run on real time; read deadlines on ``clock``.
        next_sweep = time.monotonic() + 1.0
        try:
            while True:
                real = time.monotonic()
                if listening and self._stopping.is_set():
                    if lsock is not None:
                        ep.unregister(lfd)
                    ep.unregister(wfd)
                    listening = False
                    stop_at = real + self.config.shutdown_grace
                if not listening and (not conns or real >= stop_at):
                    break
                wait = _POLL_CAP
                if timeouts:
                    wait = min(wait, max(0.0, timeouts[0][0] - clock()))
                for fd, events in ep.poll(wait, _MAX_EVENTS):
                    if fd == lfd:
                        assert lsock is not None
                        self._accept(lsock, loop)
                        continue
                    if fd == wfd:
                        self._take_handed(loop)
                        continue
                    conn = conns.get(fd)
                    if conn is None:
                        continue
                    try:
                        self._on_event(conn, events, loop)
                    except Exception:  # a bug in one request must not stop this worker
                        self.registry.count_error("internal")
                        log.exception("tracker: request from %s failed", conn.ip)
                        self._close(conn, loop)
                now = clock()
                while timeouts and timeouts[0][0] <= now:
                    _, conn = timeouts.popleft()
                    if conns.get(conn.sock.fileno()) is conn:
                        self._expire(conn, loop)
                real = time.monotonic()
                if index == 0 and real >= next_sweep:
                    next_sweep = real + 1.0
                    self.registry.sweep()
        except Exception:  # a bug must not kill the process silently; log it and let the others serve
            log.exception("tracker worker %d crashed", index)
        finally:
            for conn in list(conns.values()):
                self._close(conn, loop)
            ep.close()

    def _accept(self, lsock: socket.socket, loop: _Loop) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
                if not self._dontwait:
                    sock.setblocking(False)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self.registry.count_error("accept")
                    log.warning("cannot accept: %s", exc.strerror or exc)
                    time.sleep(0.05)  # let connections close instead of spinning on a full table
                    return
                continue  # e.g. ECONNABORTED: that client is gone
            self._take(sock, addr[0], loop)

    def _take_handed(self, loop: _Loop) -> None:
        with contextlib.suppress(OSError):
            self._wake_r.recv(64)
        while True:
            try:
                sock, ip = self._handed.get_nowait()
            except queue.Empty:
                return
            sock.setblocking(False)
            self._take(sock, ip, loop)

    def _take(self, sock: socket.socket, ip: str, loop: _Loop) -> None:
        """A new connection: answer at once if its request is already in, else park it."""
        data: bytes | None
        try:
            data = sock.recv(_PROBE_SIZE, self._dontwait)
        except BlockingIOError:
            data = None
        except OSError:
            sock.close()
            return
        if data is None:
            self._park(sock, ip, b"", loop)
        elif len(data) >= TRACKER_REQUEST_SIZE:
            trailing = len(data) > TRACKER_REQUEST_SIZE
            self._send_and_close(sock, self._reply(data, ip), trailing, loop, ip)
        elif not data:  # closed before sending anything
            sock.close()
        else:
            conn = self._park(sock, ip, data, loop)
            if conn is not None:
                bad = self._partial_header_error(data, ip)
                if bad is not None:
                    self._fail(conn, bad, loop)

    def _park(self, sock: socket.socket, ip: str, data: bytes, loop: _Loop) -> _Conn | None:
        with self._held_lock:
            full = self._held >= self.max_connections or not self.features.watchable(sock.fileno())
            if not full:
                self._held += 1
        if full:
            self.registry.count_error("too_many_connections")
            with contextlib.suppress(OSError):
                sock.send(error_reply(TrackerStatus.FULL, "too many connections, try again later"), self._dontwait)
            sock.close()
            return None
        conn = _Conn(sock, ip, data, self._clock() + self.config.read_timeout)
        loop.conns[sock.fileno()] = conn
        loop.timeouts.append((conn.deadline, conn))
        loop.ep.register(sock.fileno(), IN)
        return conn

    def _send_and_close(self, sock: socket.socket, reply: bytes, trailing: bool, loop: _Loop, ip: str) -> None:
        if reply[0] != TrackerStatus.OK or trailing:  # the status byte leads every reply
            conn = self._park(sock, ip, b"", loop)
            if conn is not None:
                self._fail(conn, reply, loop)
            return
        try:
            sent = sock.send(reply, self._dontwait)
        except BlockingIOError:
            sent = 0
        except OSError:
            sock.close()
            return
        if sent == len(reply):
            sock.close()
            return
        conn = self._park(sock, ip, b"", loop)  # a big reply to a slow reader
        if conn is not None:
            conn.state = _Conn.WRITING
            conn.out = reply[sent:]
            loop.ep.modify(sock.fileno(), OUT)

    def _close(self, conn: _Conn, loop: _Loop) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and loop.conns.get(fd) is conn:
            del loop.conns[fd]
            with self._held_lock:
                self._held -= 1
            loop.ep.forget(fd)  # epoll drops it on close; select() must not see a closed descriptor
        conn.sock.close()

    def _fail(self, conn: _Conn, reply: bytes, loop: _Loop) -> None:
        """Send a (small) reply and half-close, then wait for the client to close (a lingering close).

        Used for error replies, for clients that sent more than 54 bytes, and
        for clients that sent their request in pieces.
        Closing at once with unread bytes in the receive buffer makes the
        kernel reset the connection, and the client would lose the reply
        (seen on Linux loopback). So the rest is
        read and dropped, at most ``_DRAIN_LIMIT`` bytes, until the client
        closes or the read deadline passes.
        """
        try:
            sent = conn.sock.send(reply, self._dontwait)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn, loop)
            return
        if sent < len(reply):  # only a huge --max-peers reply; finish it first
            conn.state = _Conn.WRITING
            conn.out = reply[sent:]
            conn.linger = True
            loop.ep.modify(conn.sock.fileno(), OUT)
            return
        self._linger(conn, loop)

    def _linger(self, conn: _Conn, loop: _Loop) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn, loop)
            return
        conn.state = _Conn.DRAINING
        conn.out = b""

    def _on_event(self, conn: _Conn, events: int, loop: _Loop) -> None:
        sock = conn.sock
        if conn.state == _Conn.WRITING:
            try:
                sent = sock.send(conn.out, self._dontwait)
            except BlockingIOError:
                return
            except OSError:
                self._close(conn, loop)
                return
            conn.out = conn.out[sent:]
            if conn.out:
                return
            if conn.linger:
                loop.ep.modify(sock.fileno(), IN)
                self._linger(conn, loop)
            else:
                self._close(conn, loop)
            return
        if conn.state == _Conn.DRAINING:
            try:
                dropped = len(sock.recv(_DRAIN_LIMIT, self._dontwait))
            except BlockingIOError:
                return
            except OSError:
                dropped = 0
            conn.drained += dropped
            if not dropped or conn.drained >= _DRAIN_LIMIT:
                self._close(conn, loop)
            return
        try:
            data = sock.recv(_PROBE_SIZE - len(conn.buf), self._dontwait)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn, loop)
            return
        if not data:
            self.registry.count_error("short_request")
            self._fail(conn, self._short(conn), loop)
            self._close(conn, loop)
            return
        buf = conn.buf = conn.buf + data
        if len(buf) >= TRACKER_REQUEST_SIZE:
            # A client that sends in pieces may still be sending (trailing bytes
            # would reset the connection): always a lingering close here.
            self._fail(conn, self._reply(buf, conn.ip), loop)
            return
        bad = self._partial_header_error(buf, conn.ip)
        if bad is not None:
            self._fail(conn, bad, loop)

    def _short(self, conn: _Conn) -> bytes:
        self.registry.count_request("tcp", "invalid", TrackerStatus.BAD_REQUEST)
        return error_reply(
            TrackerStatus.BAD_REQUEST, f"tracker request is {len(conn.buf)} bytes, expected {TRACKER_REQUEST_SIZE}"
        )

    def _expire(self, conn: _Conn, loop: _Loop) -> None:
        if conn.state == _Conn.READING:
            self.registry.count_error("read_timeout")
            with contextlib.suppress(OSError):
                # Bytes that arrived but were not read yet would make close() reset the
                # connection, and the client would lose the reply (as in _fail). They came
                # before the deadline was noticed, so the reply counts them (short of a
                # whole request); the rest is dropped.
                room = TRACKER_REQUEST_SIZE - 1 - len(conn.buf)
                if room > 0:
                    conn.buf += conn.sock.recv(room, self._dontwait)
                dropped = 0
                while dropped < _DRAIN_LIMIT and (chunk := conn.sock.recv(_DRAIN_LIMIT, self._dontwait)):
                    dropped += len(chunk)
            if self._verbose:
                log.info("%s timed out after %d bytes", conn.ip, len(conn.buf))
            if conn.buf:
                with contextlib.suppress(OSError):
                    conn.sock.send(self._short(conn), self._dontwait)
        self._close(conn, loop)
