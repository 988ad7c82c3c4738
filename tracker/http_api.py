"""The tracker's HTTP face: a JSON API, a status page, metrics and ``.cascade`` downloads.

It serves the same :class:`~tracker.swarms.SwarmRegistry` as the binary
server, so an announce over HTTP and one over TCP land in the same swarm
under the same rules (enrolment, good flag, subset, 0.0.0.0, allow list).

Shape: :class:`http.server.ThreadingHTTPServer`, one thread per connection,
HTTP/1.0 (one request per connection, so an idle keep-alive never holds a
thread). Limits, all in :class:`HttpConfig`:

* at most ``max_workers`` requests at once; a connection that finds no free
  slot within ``queue_wait`` seconds gets a 503 at once, and while no slot has
  been freed since that, later ones get it without waiting (so a crowd of idle
  clients costs the accept loop one wait, not one each);
* every read has a ``read_timeout``; a connection older than
  ``request_deadline`` is shut down by the serving thread, so a client that
  trickles one byte at a time cannot hold a worker for long;
* bodies are size-capped before they are read (413), and a ``Content-Length``
  is required (411).

Errors are JSON ``{"error": "..."}`` with a 4xx status; a handler bug is
logged and answered with 500, and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import hmac
import html
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from cascade.errors import BadRequest, MetafileError, StartError, UsageError, from_os_error
from cascade.metafile import parse_cascade
from cascade.wire import PeerRecord
from tracker import metrics
from tracker.cascade_store import CascadeStore, StoredCascade, StoreFull, check_name, parse_hex_hash
from tracker.store import CascadeFiles, StoreUnavailable, SwarmStore
from tracker.swarms import STATUS_BAD_REQUEST, STATUS_NOT_ALLOWED, AnnounceRefused, SwarmSummary

log = logging.getLogger(__name__)

API = "/api/v1"
_PEERS_PATH = re.compile(r"^/api/v1/swarms/([^/]*)/peers$")
_DOWNLOAD_PATH = re.compile(r"^/cascades/([^/]*)\.cascade$")
# After an error reply to a client still sending its body, read and drop at
# most this much (or until it closes) so the kernel does not reset the
# connection and eat the reply. Arbitrary; covers an oversized upload.
_DRAIN_LIMIT = 32 << 20
_DRAIN_TIME = 2.0
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """How the HTTP front end behaves; the defaults live here."""

    host: str = "0.0.0.0"
    port: int = 0
    token: str | None = None  # required as "Authorization: Bearer TOKEN" for uploads
    max_workers: int = 32  # arbitrary; each is a thread blocked on one client
    # Seconds a new connection may wait for a free worker. Short, because the
    # accept loop waits with it: a long wait would let a few idle clients slow everyone.
    queue_wait: float = 0.25
    read_timeout: float = 10.0  # seconds any single read may take
    request_deadline: float = 30.0  # seconds a whole connection may take
    max_json_body: int = 64 << 10
    refresh_seconds: int = 5  # the status page reloads itself this often
    max_listed_swarms: int = 1000  # per JSON or HTML answer; the most recently active first
    max_page_peers: int = 20  # peers shown per swarm on the status page
    verbose: bool = False


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class TrackerHttpServer(ThreadingHTTPServer):
    """Serves the registry and the ``.cascade`` store over HTTP until :meth:`shutdown`.

    Construct, then :meth:`start`; raises :class:`OSError` if the address cannot be bound.
    """

    daemon_threads = True
    block_on_close = False  # stop() must not wait for slow clients; their deadlines end them
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, registry: SwarmStore, store: CascadeFiles, config: HttpConfig | None = None) -> None:
        self.registry = registry
        self.store = store
        self.config = config or HttpConfig()
        self.http_counters = metrics.HttpCounters()
        self.started = time.monotonic()
        self._slots = threading.BoundedSemaphore(self.config.max_workers)
        # True after a wait for a slot timed out, until a slot is freed: no point waiting again.
        self._saturated = False
        self._active: dict[socket.socket, float] = {}  # connection -> deadline (monotonic)
        self._active_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__((self.config.host, self.config.port), _Handler)

    @property
    def address(self) -> tuple[str, int]:
        return self.config.host, int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.2,), name="tracker-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the socket and the store (running requests end on their own deadlines)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(2.0)
        self.server_close()
        self.store.close()

    # --- bounded concurrency --------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._saturated:
            got = self._slots.acquire(blocking=False)
        else:
            got = self._slots.acquire(timeout=self.config.queue_wait)
        if not got:
            self._saturated = True
            self.registry.count_error("http_busy")
            self.http_counters.count("busy", 503)
            body = b'{"error": "too many requests at once, try again later"}'
            with contextlib.suppress(OSError):
                request.settimeout(0.5)
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
            self.shutdown_request(request)
            return
        with self._active_lock:
            self._active[request] = time.monotonic() + self.config.request_deadline
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: socket.socket) -> None:
        with self._active_lock:
            if self._active.pop(request, None) is None:
                return
        self._slots.release()
        self._saturated = False

    def service_actions(self) -> None:
        """Called by ``serve_forever`` between polls: cut connections past their deadline."""
        now = time.monotonic()
        with self._active_lock:
            late = [sock for sock, deadline in self._active.items() if deadline <= now]
        for sock in late:
            self.registry.count_error("http_deadline")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called for exceptions that escaped the handler: a client that vanished
        # while http.server read its headers (one short line), or a bug (a traceback).
        who = client_address[0] if client_address else "?"
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            self.registry.count_error("http_connection_lost")
            if self.config.verbose:
                log.info("%s connection lost: %s", who, exc)
            return
        self.registry.count_error("http_internal")
        log.exception("http request from %s failed", who)


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


class _Handler(BaseHTTPRequestHandler):
    server: TrackerHttpServer
    server_version = "cascade-tracker"
    sys_version = ""
    protocol_version = "HTTP/1.0"

    _route = "unknown"
    _unread = 0  # body bytes the client announced and we did not read
    _query: dict[str, list[str]] = {}

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.config.read_timeout)

    # --- plumbing -------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.config.verbose:
            log.debug("%s %s", self.client_address[0], format % args)

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        self.server.http_counters.count(self._route, code)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every error, also those http.server itself raises (a bad request line, an unknown method), as JSON."""
        if self.request_version == "HTTP/0.9":  # an unparsable request line: still answer with a status line
            self.request_version = "HTTP/1.0"
        self._reply_error(code, message or HTTPStatus(code).phrase)

    def _reply_error(self, code: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        if self.server.config.verbose:
            log.info("%s %s -> %d %s", self.client_address[0], getattr(self, "path", "?"), code, message)
        self.close_connection = True
        self._send(code, json.dumps({"error": message}).encode(), _JSON, headers)

    def _send(self, code: int, body: bytes, ctype: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, doc: object, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._send(code, json.dumps(doc).encode(), _JSON, headers)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._unread:
                self._drain()

    def _drain(self) -> None:
        """A lingering close: the reply is out; drop what the client still sends, briefly."""
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _DRAIN_TIME
            left = min(self._unread, _DRAIN_LIMIT)
            while left > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sock.settimeout(remaining)
                chunk = sock.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _read_body(self, cap: int) -> bytes:
        """The request body, at most ``cap`` bytes; raises :class:`_HttpError`."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._unread = _DRAIN_LIMIT
            raise _HttpError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
        text = self.headers.get("Content-Length")
        if text is None:
            raise _HttpError(411, "a Content-Length header is required")
        if not (text.strip().isascii() and text.strip().isdigit()):
            raise _HttpError(400, f"invalid Content-Length {text[:40]!r}")
        length = int(text)
        if length > cap:
            self._unread = length
            raise _HttpError(413, f"body of {length} bytes is larger than the limit of {cap}")
        chunks: list[bytes] = []
        left = length
        self._unread = left
        while left > 0:
            chunk = self.rfile.read1(min(left, 1 << 16))  # raises TimeoutError after read_timeout
            if not chunk:
                self._unread = 0
                raise _HttpError(400, f"body ended after {length - left} of {length} bytes")
            chunks.append(chunk)
            left -= len(chunk)
            self._unread = left
        return b"".join(chunks)

    # --- dispatch -------------------------------------------------------------

    def _routes(self, path: str) -> tuple[str, dict[str, Callable[[list[str]], None]], list[str]]:
        """(route name, method -> handler, path parameters) for ``path``; raises :class:`_HttpError` 404."""
        fixed: dict[str, tuple[str, dict[str, Callable[[list[str]], None]]]] = {
            "/": ("page", {"GET": self._page}),
            "/healthz": ("healthz", {"GET": self._healthz}),
            "/metrics": ("metrics", {"GET": self._metrics}),
            f"{API}/swarms": ("swarms", {"GET": self._swarms}),
            f"{API}/announce": ("announce", {"POST": self._announce}),
            f"{API}/cascades": ("cascades", {"GET": self._list_cascades, "PUT": self._upload}),
        }
        if path in fixed:
            name, handlers = fixed[path]
            return name, handlers, []
        m = _PEERS_PATH.match(path)
        if m:
            return "peers", {"GET": self._peers}, [m.group(1)]
        m = _DOWNLOAD_PATH.match(path)
        if m:
            return "download", {"GET": self._download}, [m.group(1)]
        raise _HttpError(404, f"no such path: {path[:200]}")

    def _dispatch(self) -> None:
        method = self.command
        announced = self.headers.get("Content-Length", "0").strip()
        # Until the body is read, an early error reply must end in a lingering close.
        self._unread = min(int(announced), _DRAIN_LIMIT) if announced.isascii() and announced.isdigit() else 0
        try:
            parts = urlsplit(self.path)
            route, handlers, params = self._routes(parts.path)
            self._route = route
            handler = handlers.get("GET" if method == "HEAD" else method)
            if handler is None:
                allow = sorted([*handlers, "HEAD"] if "GET" in handlers else handlers)
                raise _HttpError(405, f"{method} is not allowed here", (("Allow", ", ".join(allow)),))
            try:
                self._query = parse_qs(parts.query, max_num_fields=20)
            except ValueError as exc:  # too many fields
                raise _HttpError(400, f"bad query string: {exc}") from exc
            handler(params)
        except _HttpError as exc:
            self._reply_error(exc.status, exc.message, exc.headers)
        except StoreUnavailable as exc:  # Redis is down: logged once by the store; answer at once
            self._reply_error(503, str(exc), (("Retry-After", "1"),))
        except TimeoutError:
            self.registry.count_error("http_read_timeout")
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._reply_error(408, "request timed out")
        except OSError as exc:  # the client went away mid-request
            self.registry.count_error("http_connection_lost")
            self.close_connection = True
            if self.server.config.verbose:
                log.info("%s connection lost: %s", self.client_address[0], exc)
        except Exception:  # a bug must not take the server down: log it, answer 500, keep serving
            self.registry.count_error("http_internal")
            log.exception("http %s %s failed", method, self.path[:200])
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._reply_error(500, "internal error")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    @property
    def registry(self) -> SwarmStore:
        return self.server.registry

    @property
    def store(self) -> CascadeFiles:
        return self.server.store

    def _hash_param(self, text: str) -> bytes:
        try:
            return parse_hex_hash(text)
        except BadRequest as exc:
            raise _HttpError(400, f"invalid cascade hash {text[:80]!r}: {exc}") from exc

    # --- endpoints -----------------------------------------------------------

    def _healthz(self, params: list[str]) -> None:
        c = self.registry.counters()
        uptime = time.monotonic() - self.server.started
        self._json(200, {"status": "ok", "swarms": c.swarms, "peers": c.peers, "uptime_seconds": round(uptime, 3)})

    def _metrics(self, params: list[str]) -> None:
        text = metrics.render(
            self.registry.counters(),
            self.server.http_counters.snapshot(),
            time.monotonic() - self.server.started,
            len(self.store),
        )
        self._send(200, text.encode(), metrics.CONTENT_TYPE)

    def _swarms(self, params: list[str]) -> None:
        all_swarms = self.registry.swarms()
        shown = all_swarms[: self.server.config.max_listed_swarms]
        self._json(
            200,
            {
                "swarms": [_swarm_json(s, self.store.name_of(s.cascade_hash)) for s in shown],
                "count": len(all_swarms),
                "truncated": len(shown) < len(all_swarms),
            },
        )

    def _peers(self, params: list[str]) -> None:
        h = self._hash_param(params[0])
        summary = self.registry.swarm(h)
        if summary is None:
            if self.store.get(h) is None:
                raise _HttpError(404, f"no swarm for cascade hash {h.hex()}")
            self._json(200, {"cascade_hash": h.hex(), "name": self.store.name_of(h), "peers": []})
            return
        doc = _swarm_json(summary, self.store.name_of(h))
        now = self.registry.now()
        doc["peers"] = [_peer_json(p, now) for p in summary.peers]
        self._json(200, doc)

    def _announce(self, params: list[str]) -> None:
        body = self._read_body(self.server.config.max_json_body)
        try:
            h, ip, port, action = self._parse_announce(body)
        except _HttpError:
            self.registry.count_request("http", "invalid", STATUS_BAD_REQUEST)
            raise
        if ip == "0.0.0.0":
            ip = self.client_address[0]
        try:
            if action == "stopped":
                self.registry.remove(h, ip, port, protocol="http")
                self._json(200, {"peers": []})
                return
            peers = self.registry.announce(h, ip, port, action == "subscribe", protocol="http")
        except AnnounceRefused as exc:
            code = 403 if exc.status == STATUS_NOT_ALLOWED else 503
            self._json(code, {"error": exc.message, "status": exc.status})
            return
        except BadRequest as exc:  # e.g. a source address that is not IPv4
            raise _HttpError(400, str(exc)) from exc
        now = self.registry.now()
        self._json(200, {"peers": [_peer_json(p, now) for p in peers]})

    def _parse_announce(self, body: bytes) -> tuple[bytes, str, int, str]:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HttpError(400, f"body is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise _HttpError(400, "body must be a JSON object")
        raw_hash = doc.get("cascade_hash")
        if not isinstance(raw_hash, str):
            raise _HttpError(400, "cascade_hash must be a string of 64 hex digits")
        h = self._hash_param(raw_hash)
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

    def _list_cascades(self, params: list[str]) -> None:
        self._json(200, {"cascades": [self._stored_json(e) for e in self.store.entries()]})

    def _stored_json(self, e: StoredCascade) -> dict[str, object]:
        return {
            "cascade_hash": e.cascade_hash.hex(),
            "name": e.name,
            "data_length": e.data_length,
            "block_size": e.block_size,
            "block_count": e.block_count,
            "size": e.size,
            "stored_at": round(e.stored_at, 3),
            "path": f"/cascades/{e.cascade_hash.hex()}.cascade",
        }

    def _check_token(self) -> None:
        token = self.server.config.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _HttpError(
                401, "uploads need an Authorization: Bearer TOKEN header", (("WWW-Authenticate", "Bearer"),)
            )
        if not hmac.compare_digest(value.strip().encode("utf-8", "replace"), token.encode("utf-8")):
            raise _HttpError(403, "wrong API token")

    def _upload_name(self) -> str | None:
        names = self._query.get("name")
        name: str | None = names[-1] if names else None
        if name is None:
            header = self.headers.get("X-Cascade-Name")
            if header is not None:
                name = unquote(header, errors="strict")
        if name is None:
            return None
        try:
            return check_name(name)
        except BadRequest as exc:
            raise _HttpError(400, f"invalid name: {exc}") from exc

    def _upload(self, params: list[str]) -> None:
        self._check_token()
        try:
            name = self._upload_name()
        except UnicodeDecodeError as exc:
            raise _HttpError(400, "X-Cascade-Name must be percent-encoded UTF-8") from exc
        data = self._read_body(self.store.max_file_size)
        try:
            cascade_hash = parse_cascade(data, "upload").cascade_hash
            if not self.registry.is_allowed(cascade_hash):
                raise _HttpError(403, f"cascade hash {cascade_hash.hex()} is not tracked here")
            entry, new = self.store.put(data, name)
        except MetafileError as exc:
            raise _HttpError(400, f"not a valid .cascade file: {exc}") from exc
        except BadRequest as exc:
            raise _HttpError(400, str(exc)) from exc
        except StoreFull as exc:
            raise _HttpError(507, str(exc)) from exc
        doc = self._stored_json(entry)
        doc["url"] = self._base_url() + str(doc["path"])
        doc["new"] = new
        self._json(201 if new else 200, doc, (("Location", str(doc["path"])),))

    def _base_url(self) -> str:
        host = self.headers.get("Host", "")
        if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host):
            h, p = self.server.address
            host = f"{'127.0.0.1' if h == '0.0.0.0' else h}:{p}"
        return f"http://{host}"

    def _download(self, params: list[str]) -> None:
        try:
            h = parse_hex_hash(params[0])
        except BadRequest as exc:
            raise _HttpError(404, f"no such file: {params[0][:80]!r} is not a cascade hash") from exc
        data = self.store.read(h)
        if data is None:
            raise _HttpError(404, f"no .cascade file with hash {h.hex()}")
        name = self.store.name_of(h)
        headers: list[tuple[str, str]] = [("ETag", f'"{h.hex()}"')]
        if name is not None:
            quoted = quote(name, safe="")
            headers.append(("X-Cascade-Name", quoted))
            headers.append(("Content-Disposition", f"attachment; filename*=UTF-8''{quoted}.cascade"))
        self._send(200, data, "application/octet-stream", tuple(headers))

    # --- the status page -----------------------------------------------------

    def _page(self, params: list[str]) -> None:
        cfg = self.server.config
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
        self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")


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
