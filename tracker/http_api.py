"""The tracker's HTTP face: a JSON API, a status page, metrics and ``.cascade`` downloads.

It serves the same swarm store as the binary server, so an announce over
HTTP and one over TCP land in the same swarm under the same rules
(enrolment, good flag, subset, 0.0.0.0, allow list).

Shape: aiohttp's low-level server (:class:`aiohttp.web.Server`) on an
asyncio loop in one thread. The loop reads every connection (llhttp parses
the request line and headers), so an idle or slow client costs a few KB and
no thread. When a request head is complete, its body (if the route takes
one) is read on the loop too, and then the endpoint runs in a small thread
pool, because store calls block (Redis is a network round trip; a status page
lists every swarm). Limits, all in :class:`HttpConfig`:

* ``header_timeout``: a connection must deliver a complete request head
  within this many seconds of opening, and of its last response (the
  keep-alive idle time); a silent or trickling (slowloris) client is closed then;
* ``read_timeout`` per body read and ``request_deadline`` for a whole body;
* at most ``max_connections`` open: a newcomer beyond it closes the oldest
  connection that is not being answered, so a flood of idle clients never
  locks out a new one;
* bodies are size-capped before they are read (413), and a ``Content-Length``
  is required (411).

Every malformed request, also one llhttp rejects (bad request line, method,
version, header, chunking), gets a JSON ``{"error": "..."}`` with a 4xx status
and at most one log line, no traceback. A handler bug is logged with its
traceback and answered with 500, and the server keeps serving. HTTP/1.1
connections are kept alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from cascade.errors import BadRequest, MetafileError, ProtocolError, StartError, UsageError, from_os_error
from cascade.wire import PeerRecord, TrackerStatus, parse_hex_hash
from tracker import metrics
from tracker.cascade_store import CascadeStore, StoredCascade, StoreFull, check_name, parse_upload
from tracker.store import CascadeFiles, StoreUnavailable, SwarmStore
from tracker.swarms import AnnounceRefused, SwarmSummary

log = logging.getLogger(__name__)

API = "/api/v1"
_PEERS_PATH = re.compile(r"^/api/v1/swarms/([^/]*)/peers$")
_DOWNLOAD_PATH = re.compile(r"^/cascades/([^/]*)\.cascade$")
_JSON = "application/json"
_SERVER = "cascade-tracker"
# Longest request line and header line llhttp accepts (aiohttp's defaults);
# longer ones are a 400.
_MAX_LINE = 8190
# After an error reply to a client still sending its body, read and drop it
# for at most this long so the kernel does not reset the connection and eat
# the reply (aiohttp's "lingering close"). Arbitrary; covers an oversized upload.
_LINGER_SECONDS = 2.0
# After a client half-closes, a connection that is not being answered within
# this many seconds is closed (a complete request gets to its handler in
# microseconds; this only covers a loaded loop). Arbitrary.
_EOF_GRACE = 0.2


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """How the HTTP front end behaves; the defaults live here."""

    host: str = "0.0.0.0"
    port: int = 0
    token: str | None = None  # required as "Authorization: Bearer TOKEN" for uploads
    # Seconds a connection may take to send a whole request head, counted from
    # when it opened or got its last response: the slowloris cut and the
    # keep-alive idle time at once. A few seconds (a browser sends its head in
    # one packet); uvicorn's keep-alive default is the same 5 s.
    header_timeout: float = 5.0
    read_timeout: float = 10.0  # seconds any single read of a body may take
    request_deadline: float = 30.0  # seconds a whole body may take
    # Open connections; beyond it the oldest one not being answered is closed.
    # Arbitrary: an idle connection costs about 6 KB (measured), so this is about 25 MB.
    max_connections: int = 4096
    # Threads that run endpoints (store calls block). Arbitrary: enough to
    # overlap Redis round trips, few enough not to thrash 2 cores.
    handler_threads: int = 8
    max_json_body: int = 64 << 10
    refresh_seconds: int = 5  # the status page reloads itself this often
    max_listed_swarms: int = 1000  # per JSON or HTML answer; the most recently active first
    max_page_peers: int = 20  # peers shown per swarm on the status page
    busiest_swarms: int = metrics.BUSIEST_SWARMS  # per-swarm gauges in /metrics
    verbose: bool = False


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True, slots=True)
class _Call:
    """One request as an endpoint sees it: plain values, safe to hand to a pool thread."""

    method: str
    params: tuple[str, ...]
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    remote: str
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    ctype: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, doc: object, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, json.dumps(doc).encode(), _JSON, headers)


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _json(status, {"error": message}, headers)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """What serves one (route, method): ``run`` in a pool thread, after ``check`` and the body read on the loop."""

    run: Callable[[_Call], _Reply]
    body_cap: Callable[[], int] | None = None  # the largest body taken; None: the body is not read
    check: Callable[[_Call], None] | None = None  # pure checks that answer before the body is read


class _Connection(RequestHandler):
    """aiohttp's connection protocol, answering what llhttp rejects as a JSON 4xx with no traceback."""

    def __init__(self, manager: _Manager, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.owner = manager.owner
        self.manager = manager
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.body: StreamReader | None = None  # the body being read, ended at once by a half-close

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio.Protocol allows a bool
        # asyncio would close the transport at once (aiohttp returns None here),
        # dropping the answer to a request sent just before a half-close (nc -N,
        # an HTTP/1.0 client). Keep the sending side open; end a body being read;
        # close if nothing is being answered shortly after.
        self.eof = True
        if self.body is not None:
            self.body.feed_eof()
        self.manager.event_loop.call_later(_EOF_GRACE, self._close_if_idle)
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None:  # a reset, mid-request or not: the client vanished
            self.owner.count_error("http_connection_lost")
        super().connection_lost(exc)

    def _close_if_idle(self) -> None:
        if self not in self.manager.busy:
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        owner = self.owner
        if status >= 500:  # an exception escaped the handler: a bug
            owner.count_error("http_internal")
            log.error("http request from %s failed", request.remote, exc_info=exc)
            text = "internal error"
        else:  # llhttp refused the request: a malformed request, not our fault
            owner.count_error("http_malformed")
            # llhttp's message is several lines (a caret under the bad byte): keep the first.
            first = str(message or exc or "bad request").strip().splitlines()[0].rstrip(":")
            text = f"malformed request: {first}"[:300]
            if owner.config.verbose:
                log.info("%s %s", request.remote, text)
        owner.http_counters.count("unknown", status)
        resp = web.Response(status=status, body=json.dumps({"error": text}).encode(), headers=owner.headers(_JSON, ()))
        resp.force_close()
        return resp


class _Request(web.BaseRequest):
    """A request; ``sent_version`` is the HTTP version the client wrote (the reply speaks HTTP/1.1 if it is bad)."""

    sent_version: HttpVersion = HttpVersion11


class _Manager(web.Server):
    """Makes a :class:`_Connection` per accepted socket and holds open connections under ``max_connections``."""

    def __init__(self, owner: TrackerHttpServer, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(owner.handle, loop=loop, request_factory=self._request)
        self.owner = owner
        self.event_loop = loop
        cfg = owner.config
        self.protocol_args: dict[str, Any] = {
            "keepalive_timeout": cfg.header_timeout,
            "lingering_time": _LINGER_SECONDS,
            "max_line_size": _MAX_LINE,
            "max_field_size": _MAX_LINE,
            "logger": log,
            "access_log": logging.getLogger("tracker.http.access") if cfg.verbose else None,
        }
        # Insertion order is age: the eviction scan starts from the oldest.
        self.open: dict[RequestHandler, None] = {}
        self.busy: set[RequestHandler] = set()  # being answered: never evicted

    def _request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # llhttp takes "HTTP/0.9" (no version), "HTTP/2.0" and the like, and
        # aiohttp echoes that version in its status line: answer those in
        # HTTP/1.1, once (the handler turns them down with a 400).
        sent = message.version
        if sent not in (HttpVersion10, HttpVersion11):
            message = message._replace(version=HttpVersion11, should_close=True)
        request = _Request(message, payload, protocol, writer, task, self.event_loop)
        request.sent_version = sent
        return request

    def __call__(self) -> _Connection:
        return _Connection(self, loop=self.event_loop, **self.protocol_args)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open[handler] = None
        if len(self.open) > self.owner.config.max_connections:
            for old in self.open:
                if old is not handler and old not in self.busy:
                    self.owner.count_error("http_evicted")
                    del self.open[old]
                    old.force_close()
                    break

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open.pop(handler, None)


class TrackerHttpServer:
    """Serves the store and the ``.cascade`` files over HTTP from :meth:`start` until :meth:`stop`.

    The socket is bound at construction: raises :class:`OSError` if the address cannot be had.
    """

    def __init__(self, registry: SwarmStore, store: CascadeFiles, config: HttpConfig | None = None) -> None:
        self.registry = registry
        self.store = store
        self.config = config or HttpConfig()
        self.http_counters = metrics.HttpCounters()
        self.started = time.monotonic()
        self._sock = socket.create_server((self.config.host, self.config.port), backlog=1024)
        self.server_address: tuple[str, int] = self._sock.getsockname()[:2]
        self._pool = ThreadPoolExecutor(self.config.handler_threads, thread_name_prefix="tracker-http")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._manager: _Manager | None = None
        self.metrics = metrics.make_registry(
            metrics.TrackerCollector(
                registry,
                self.http_counters,
                uptime=lambda: time.monotonic() - self.started,
                stored=lambda: len(self.store),
                connections=self.connection_count,
                busiest=self.config.busiest_swarms,
            )
        )
        self._routes = self._route_table()

    @property
    def address(self) -> tuple[str, int]:
        return self.config.host, int(self.server_address[1])

    def connection_count(self) -> int:
        """HTTP connections open now."""
        manager = self._manager
        return 0 if manager is None else len(manager.open)

    def start(self) -> None:
        """Serve in a thread of its own; returns once the loop accepts connections."""
        self._thread = threading.Thread(target=self._run_loop, name="tracker-http", daemon=True)
        self._thread.start()
        self._ready.wait(10.0)

    def _run_loop(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        manager = _Manager(self, loop)
        self._manager = manager
        server = await loop.create_server(manager, sock=self._sock, backlog=1024)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            # Running requests get a moment; idle and slow connections are closed now.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(manager.shutdown(1.0), 2.0)

    def stop(self) -> None:
        """Stop accepting, close every connection, the socket and the files store."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
            self._thread.join(5.0)
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def count_error(self, kind: str) -> None:
        """Count an error from the loop thread: in the pool, since a Redis store's counter is a round trip."""
        with contextlib.suppress(RuntimeError):  # the pool is shut down: the server is stopping
            self._pool.submit(self.registry.count_error, kind)

    def headers(self, ctype: str, extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
        """The headers of every answer."""
        out = {
            "Content-Type": ctype,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Server": _SERVER,
        }
        out.update(extra)
        return out

    # --- one request -----------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's request handler: route, read the body, run the endpoint in the pool, answer."""
        manager = self._manager
        conn = request.protocol
        if manager is not None:
            manager.busy.add(conn)
        try:
            route, reply = await self._answer(request)
        finally:
            if manager is not None:
                manager.busy.discard(conn)
        self.http_counters.count(route, reply.status)
        if self.config.verbose:
            log.info("%s %s %s -> %d", request.remote, request.method, request.raw_path[:200], reply.status)
        resp = web.Response(status=reply.status, body=reply.body, headers=self.headers(reply.ctype, reply.headers))
        if reply.status == 408 or (isinstance(conn, _Connection) and conn.eof):
            resp.force_close()
        return resp

    async def _answer(self, request: web.BaseRequest) -> tuple[str, _Reply]:
        route = "unknown"
        try:
            sent = request.sent_version if isinstance(request, _Request) else request.version
            if sent not in (HttpVersion10, HttpVersion11):
                raise _HttpError(400, f"HTTP/{sent.major}.{sent.minor} is not spoken here; use HTTP/1.1 or HTTP/1.0")
            parts = urlsplit(request.raw_path)
            route, handlers, params = self._resolve(parts.path)
            method = request.method
            endpoint = handlers.get("GET" if method == "HEAD" else method)
            if endpoint is None:
                allow = sorted([*handlers, "HEAD"] if "GET" in handlers else handlers)
                raise _HttpError(405, f"{method} is not allowed here", (("Allow", ", ".join(allow)),))
            try:
                query = parse_qs(parts.query, max_num_fields=20)
            except ValueError as exc:  # too many fields
                raise _HttpError(400, f"bad query string: {exc}") from exc
            call = _Call(method, params, query, request.headers, request.remote or "")
            if endpoint.check is not None:
                endpoint.check(call)
            if endpoint.body_cap is not None:
                call = replace(call, body=await self._read_body(request, endpoint.body_cap()))
        except _HttpError as exc:
            return route, _error(exc.status, exc.message, exc.headers)
        except TimeoutError:
            self.count_error("http_read_timeout")
            return route, _error(408, "request timed out")
        except OSError as exc:  # the client went away mid-body; the reply will not reach it
            self.count_error("http_connection_lost")
            return route, _error(400, f"connection lost: {exc}")
        loop = asyncio.get_running_loop()
        return route, await loop.run_in_executor(self._pool, self._run, endpoint.run, call)

    def _run(self, fn: Callable[[_Call], _Reply], call: _Call) -> _Reply:
        """``fn(call)`` in a pool thread, every failure turned into an answer."""
        try:
            return fn(call)
        except _HttpError as exc:
            return _error(exc.status, exc.message, exc.headers)
        except StoreUnavailable as exc:  # Redis is down: logged once by the store; answer at once
            return _error(503, str(exc), (("Retry-After", "1"),))
        except Exception:  # a bug must not take the server down: log it, answer 500, keep serving
            self.registry.count_error("http_internal")
            log.exception("http %s failed", fn.__name__)
            return _error(500, "internal error")

    async def _read_body(self, request: web.BaseRequest, cap: int) -> bytes:
        """The request body, at most ``cap`` bytes; raises :class:`_HttpError`, TimeoutError, OSError."""
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            raise _HttpError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        text = request.headers.get("Content-Length")
        if text is None:
            raise _HttpError(411, "a Content-Length header is required")
        if not (text.strip().isascii() and text.strip().isdigit()):  # llhttp refuses these first; kept as a guard
            raise _HttpError(400, f"invalid Content-Length {text[:40]!r}")
        length = int(text)
        if length > cap:
            raise _HttpError(413, f"body of {length} bytes is larger than the limit of {cap}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_deadline
        chunks: list[bytes] = []
        got = 0
        conn = request.protocol
        if isinstance(conn, _Connection):
            conn.body = request.content
            if conn.eof:
                request.content.feed_eof()
        try:
            while got < length:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                chunk = await asyncio.wait_for(request.content.readany(), min(self.config.read_timeout, left))
                if not chunk:
                    raise _HttpError(400, f"body ended after {got} of {length} bytes")
                chunks.append(chunk)
                got += len(chunk)
        finally:
            if isinstance(conn, _Connection):
                conn.body = None
        return b"".join(chunks)

    # --- routing ---------------------------------------------------------------

    def _route_table(self) -> dict[str, tuple[str, dict[str, _Endpoint]]]:
        return {
            "/": ("page", {"GET": _Endpoint(self._page)}),
            "/healthz": ("healthz", {"GET": _Endpoint(self._healthz)}),
            "/metrics": ("metrics", {"GET": _Endpoint(self._metrics)}),
            f"{API}/swarms": ("swarms", {"GET": _Endpoint(self._swarms)}),
            f"{API}/announce": (
                "announce",
                {"POST": _Endpoint(self._announce, body_cap=lambda: self.config.max_json_body)},
            ),
            f"{API}/cascades": (
                "cascades",
                {
                    "GET": _Endpoint(self._list_cascades),
                    "PUT": _Endpoint(self._upload, body_cap=lambda: self.store.max_file_size, check=self._check_upload),
                },
            ),
        }

    def _resolve(self, path: str) -> tuple[str, dict[str, _Endpoint], tuple[str, ...]]:
        """(route name, method -> endpoint, path parameters) for ``path``; raises :class:`_HttpError` 404."""
        if path in self._routes:
            name, handlers = self._routes[path]
            return name, handlers, ()
        m = _PEERS_PATH.match(path)
        if m:
            return "peers", {"GET": _Endpoint(self._peers)}, (m.group(1),)
        m = _DOWNLOAD_PATH.match(path)
        if m:
            return "download", {"GET": _Endpoint(self._download)}, (m.group(1),)
        raise _HttpError(404, f"no such path: {path[:200]}")

    # --- endpoints (run in a pool thread) -----------------------------------------

    def _healthz(self, call: _Call) -> _Reply:
        c = self.registry.counters()
        uptime = time.monotonic() - self.started
        return _json(200, {"status": "ok", "swarms": c.swarms, "peers": c.peers, "uptime_seconds": round(uptime, 3)})

    def _metrics(self, call: _Call) -> _Reply:
        return _Reply(200, metrics.render(self.metrics), metrics.CONTENT_TYPE)

    def _swarms(self, call: _Call) -> _Reply:
        all_swarms = self.registry.swarms()
        shown = all_swarms[: self.config.max_listed_swarms]
        return _json(
            200,
            {
                "swarms": [_swarm_json(s, self.store.name_of(s.cascade_hash)) for s in shown],
                "count": len(all_swarms),
                "truncated": len(shown) < len(all_swarms),
            },
        )

    def _peers(self, call: _Call) -> _Reply:
        h = _hash_param(call.params[0])
        summary = self.registry.swarm(h)
        if summary is None:
            if self.store.get(h) is None:
                raise _HttpError(404, f"no swarm for cascade hash {h.hex()}")
            return _json(200, {"cascade_hash": h.hex(), "name": self.store.name_of(h), "peers": []})
        doc = _swarm_json(summary, self.store.name_of(h))
        now = self.registry.now()
        doc["peers"] = [_peer_json(p, now) for p in summary.peers]
        return _json(200, doc)

    def _announce(self, call: _Call) -> _Reply:
        try:
            h, ip, port, action = _parse_announce(call.body)
        except _HttpError:
            self.registry.count_request("http", "invalid", TrackerStatus.BAD_REQUEST)
            raise
        if ip == "0.0.0.0":
            ip = call.remote
        try:
            if action == "stopped":
                self.registry.remove(h, ip, port, protocol="http")
                return _json(200, {"peers": []})
            peers = self.registry.announce(h, ip, port, action == "subscribe", protocol="http")
        except AnnounceRefused as exc:
            code = 403 if exc.status == TrackerStatus.NOT_ALLOWED else 503
            return _json(code, {"error": exc.message, "status": exc.status})
        except BadRequest as exc:  # e.g. a source address that is not IPv4
            raise _HttpError(400, str(exc)) from exc
        now = self.registry.now()
        return _json(200, {"peers": [_peer_json(p, now) for p in peers]})

    def _list_cascades(self, call: _Call) -> _Reply:
        return _json(200, {"cascades": [_stored_json(e) for e in self.store.entries()]})

    def _check_upload(self, call: _Call) -> None:
        """The token and the name, before a byte of the body is read; raises :class:`_HttpError`."""
        self._check_token(call)
        _upload_name(call)

    def _check_token(self, call: _Call) -> None:
        token = self.config.token
        if token is None:
            return
        given = call.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _HttpError(
                401, "uploads need an Authorization: Bearer TOKEN header", (("WWW-Authenticate", "Bearer"),)
            )
        if not hmac.compare_digest(value.strip().encode("utf-8", "replace"), token.encode("utf-8")):
            raise _HttpError(403, "wrong API token")

    def _upload(self, call: _Call) -> _Reply:
        name = _upload_name(call)
        data = call.body
        try:
            up = parse_upload(data, "upload")
            # A collection is never announced, only its members are: with an allow list,
            # it is taken when every member is allowed (an upload does not extend the list).
            for h in up.member_hashes or (up.cascade_hash,):
                if not self.registry.is_allowed(h):
                    what = "a member's cascade hash" if up.member_hashes else "cascade hash"
                    raise _HttpError(403, f"{what} {h.hex()} is not tracked here")
            entry, new = self.store.put(data, name)
        except MetafileError as exc:
            raise _HttpError(400, f"not a valid .cascade file: {exc}") from exc
        except BadRequest as exc:
            raise _HttpError(400, str(exc)) from exc
        except StoreFull as exc:
            raise _HttpError(507, str(exc)) from exc
        doc = _stored_json(entry)
        doc["url"] = self._base_url(call) + str(doc["path"])
        doc["new"] = new
        return _json(201 if new else 200, doc, (("Location", str(doc["path"])),))

    def _base_url(self, call: _Call) -> str:
        host = call.headers.get("Host", "")
        if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host):
            h, p = self.address
            host = f"{'127.0.0.1' if h == '0.0.0.0' else h}:{p}"
        return f"http://{host}"

    def _download(self, call: _Call) -> _Reply:
        try:
            h = parse_hex_hash(call.params[0])
        except ProtocolError as exc:
            raise _HttpError(404, f"no such file: {call.params[0][:80]!r} is not a cascade hash") from exc
        data = self.store.read(h)
        if data is None:
            raise _HttpError(404, f"no .cascade file with hash {h.hex()}")
        name = self.store.name_of(h)
        headers: list[tuple[str, str]] = [("ETag", f'"{h.hex()}"')]
        if name is not None:
            quoted = quote(name, safe="")
            headers.append(("X-Cascade-Name", quoted))
            headers.append(("Content-Disposition", f"attachment; filename*=UTF-8''{quoted}.cascade"))
        return _Reply(200, data, "application/octet-stream", tuple(headers))

    # --- the status page -----------------------------------------------------

    def _page(self, call: _Call) -> _Reply:
        cfg = self.config
        all_swarms = self.registry.swarms()
        shown = all_swarms[: cfg.max_listed_swarms]
        c = self.registry.counters()
        now = self.registry.now()
        esc = html.escape
        rows: list[str] = []
        for s in shown:
            hx = s.cascade_hash.hex()
            name = self.store.name_of(s.cascade_hash)
            stored = self.store.get(s.cascade_hash) is not None
            link = f'<a href="/cascades/{hx}.cascade">{esc(hx)}</a>' if stored else esc(hx)
            peers = ", ".join(
                f"{esc(p.ip)}:{p.port} ({'seeder, ' if p.good else ''}seen {_ago(_age(p, now))})"
                for p in s.peers[: cfg.max_page_peers]
            )
            more = len(s.peers) - cfg.max_page_peers
            if more > 0:
                peers += f", and {more} more"
            rows.append(
                f'<tr class="swarm" data-hash="{esc(hx)}"><td><code>{link}</code></td>'
                f"<td>{esc(name) if name is not None else '<i>unknown</i>'}</td>"
                f"<td>{s.seeders}</td><td>{s.others}</td><td>{_ago(now - s.last_activity)}</td>"
                f"<td>{peers}</td></tr>"
            )
        files = [
            f'<tr><td><code><a href="/cascades/{e.cascade_hash.hex()}.cascade">{e.cascade_hash.hex()}</a></code>'
            f"</td><td>{esc(e.name) if e.name is not None else '<i>unknown</i>'}</td><td>{e.data_length}</td></tr>"
            for e in self.store.entries()[: cfg.max_listed_swarms]
        ]
        truncated = f"<p>Showing the {len(shown)} most recently active.</p>" if len(shown) < len(all_swarms) else ""
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{cfg.refresh_seconds}">
<title>Cascade tracker</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}}code{{font-size:.85em}}</style>
</head><body>
<h1>Cascade tracker</h1>
<p>{len(all_swarms)} swarms, {c.peers} peers, {len(self.store)} .cascade files.
This page reloads every {cfg.refresh_seconds} s.</p>
<h2>Swarms</h2>{truncated}
<table id="swarms"><tr><th>cascade hash</th><th>file</th><th>seeders</th><th>others</th><th>last activity</th>
<th>peers</th></tr>
{"".join(rows) or '<tr><td colspan="6">no swarms yet</td></tr>'}
</table>
<h2>.cascade files</h2>
<table id="files"><tr><th>cascade hash</th><th>file</th><th>bytes</th></tr>
{"".join(files) or '<tr><td colspan="3">none uploaded</td></tr>'}
</table>
<p><a href="{API}/swarms">{API}/swarms</a> · <a href="{API}/cascades">{API}/cascades</a> ·
<a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a></p>
</body></html>
"""
        return _Reply(200, page.encode("utf-8"), "text/html; charset=utf-8")


# --- pure helpers ----------------------------------------------------------------


def _peer_json(p: PeerRecord, now: float) -> dict[str, object]:
    """One peer; ``age`` is the whole seconds since it was last seen."""
    return {"ip": p.ip, "port": p.port, "last_seen": p.last_seen, "good": p.good, "age": _age(p, now)}


def _age(p: PeerRecord, now: float) -> int:
    return max(0, int(now) - p.last_seen)


def _swarm_json(s: SwarmSummary, name: str | None) -> dict[str, object]:
    return {
        "cascade_hash": s.cascade_hash.hex(),
        "name": name,
        "seeders": s.seeders,
        "others": s.others,
        "peers": s.seeders + s.others,
        "last_activity": round(s.last_activity, 3),
    }


def _stored_json(e: StoredCascade) -> dict[str, object]:
    doc: dict[str, object] = {
        "cascade_hash": e.cascade_hash.hex(),
        "name": e.name,
        "data_length": e.data_length,
        "block_size": e.block_size,
        "block_count": e.block_count,
        "size": e.size,
        "stored_at": round(e.stored_at, 3),
        "path": f"/cascades/{e.cascade_hash.hex()}.cascade",
    }
    if e.members:  # a collection: its hash is a collection hash, block_size 0 (docs/collection-format.md)
        doc["members"] = e.members
    return doc


def _hash_param(text: str) -> bytes:
    try:
        return parse_hex_hash(text)
    except ProtocolError as exc:
        raise _HttpError(400, f"invalid cascade hash {text[:80]!r}: {exc}") from exc


def parse_json_body(body: bytes) -> object:
    """``body`` as JSON; raises ValueError for anything that is not (bad UTF-8, nesting too deep).

    The one boundary where the decoder's errors are caught: a document nested
    deeper than the interpreter's recursion limit raises ``RecursionError``,
    which is not a ``ValueError``.
    """
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(str(exc)) from exc


def _parse_announce(body: bytes) -> tuple[bytes, str, int, str]:
    try:
        doc = parse_json_body(body)
    except ValueError as exc:
        raise _HttpError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _HttpError(400, "body must be a JSON object")
    raw_hash = doc.get("cascade_hash")
    if not isinstance(raw_hash, str):
        raise _HttpError(400, "cascade_hash must be a string of 64 hex digits")
    h = _hash_param(raw_hash)
    port = doc.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise _HttpError(400, "port must be a whole number from 0 to 65535")
    ip = doc.get("ip", "0.0.0.0")
    if not isinstance(ip, str):
        raise _HttpError(400, "ip must be a string holding an IPv4 address")
    try:
        ip = str(ipaddress.IPv4Address(ip))
    except ValueError as exc:
        raise _HttpError(400, f"ip {ip[:60]!r} is not an IPv4 address") from exc
    action = doc.get("action")
    if not isinstance(action, str) or action not in ("list", "subscribe", "stopped"):
        raise _HttpError(400, 'action must be "list", "subscribe" or "stopped"')
    return h, ip, port, action


def _upload_name(call: _Call) -> str | None:
    """The data file's name from ``?name=`` or ``X-Cascade-Name``; raises :class:`_HttpError` 400."""
    names = call.query.get("name")
    name: str | None = names[-1] if names else None
    if name is None:
        header = call.headers.get("X-Cascade-Name")
        if header is not None:
            try:
                name = unquote(header, errors="strict")
            except UnicodeDecodeError as exc:
                raise _HttpError(400, "X-Cascade-Name must be percent-encoded UTF-8") from exc
    if name is None:
        return None
    try:
        return check_name(name)
    except BadRequest as exc:
        raise _HttpError(400, f"invalid name: {exc}") from exc


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s // 3600} h ago"


def open_http(
    registry: SwarmStore,
    *,
    host: str,
    port: int,
    token: str | None = None,
    state: str | None = None,
    files: Callable[[], CascadeFiles] | None = None,
    verbose: bool = False,
) -> TrackerHttpServer:
    """The HTTP server of ``tracker run --http-port``, bound but not started.

    ``files`` opens the store's ``.cascade`` files (see :mod:`tracker.store`);
    without it they live in ``STATE.cascades`` beside ``--state``, else in a
    temporary folder removed at :meth:`TrackerHttpServer.stop`. Raises
    :class:`UsageError` for an empty token, :class:`~cascade.errors.DataError` when the folder
    cannot be used and :class:`StartError` when the port cannot be had.
    """
    if token is not None and not token.strip():
        raise UsageError("--api-token must not be empty")
    folder = None if state is None else state + ".cascades"
    try:
        store: CascadeFiles = files() if files is not None else CascadeStore(folder)
    except OSError as exc:
        raise from_os_error(exc, folder, "keep .cascade files in this folder") from exc
    try:
        return TrackerHttpServer(registry, store, HttpConfig(host=host, port=port, token=token, verbose=verbose))
    except OSError as exc:
        store.close()
        raise StartError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}") from exc
