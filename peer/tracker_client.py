"""Talking to a tracker over the binary protocol (PROTOCOL.md section 2).

One request per connection: connect, send 54 bytes, read the 5-byte reply
header and then exactly the body length it announces. Every failure is translated here into a Cascade error.
"""

from __future__ import annotations

import socket

from cascade.addresses import TrackerAddress as TrackerAddress  # their old home; they live in cascade/ now
from cascade.addresses import is_specific_ipv4, parse_hostport
from cascade.errors import ProtocolError, TrackerUnreachable
from cascade.errors import TrackerRefused as TrackerRefused
from cascade.wire import (
    TRACKER_REPLY_HEADER_SIZE,
    PeerList,
    PeerRecord,
    TrackerCommand,
    TrackerRequest,
    decode_tracker_reply,
    decode_tracker_reply_header,
)


def parse_tracker(text: str, what: str = "tracker address") -> TrackerAddress:
    """``HOST:PORT`` (binary protocol) or ``http://HOST:PORT`` (HTTP API); raises :class:`UsageError`."""
    if text.strip().startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        from peer.http_client import tracker_base_url

        url = tracker_base_url(text, what)
        parts = urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        return TrackerAddress(parts.hostname or "", parts.port or default_port, url)
    host, port = parse_hostport(text, what)
    return TrackerAddress(host, port)


def announce(
    tracker: TrackerAddress,
    command: TrackerCommand,
    cascade_hash: bytes,
    ip: str,
    port: int,
    timeout: float = 10.0,
) -> tuple[PeerRecord, ...]:
    """Send one list or subscribe request and return the peers in the reply.

    An ``ip`` of 0.0.0.0 (a peer listening on every address) is replaced by
    the local address of the connection to the tracker: a tracker may store
    0.0.0.0 as sent, and no other machine could reach the peer then.
    Raises :class:`TrackerUnreachable`, :class:`TrackerRefused` or :class:`ProtocolError`.
    """
    if tracker.url is not None:
        from peer.http_tracker import announce_http  # requests is imported only for HTTP trackers

        return announce_http(tracker, command, cascade_hash, ip, port, timeout)
    try:
        with socket.create_connection((tracker.host, tracker.port), timeout=timeout) as sock:
            sock.sendall(TrackerRequest(command, cascade_hash, local_ip(sock, ip), port).encode())
            # The reply is read by its length, not until the tracker closes: a tracker
            # that keeps the connection open after a whole reply must not cost a timeout.
            try:
                header = _recv_exact(sock, TRACKER_REPLY_HEADER_SIZE)
            except TimeoutError:
                if _answers_http(sock):
                    raise _http_port_error(tracker) from None
                raise
            if header == b"HTTP/":
                raise _http_port_error(tracker)
            if len(header) < TRACKER_REPLY_HEADER_SIZE:
                raise ProtocolError(f"tracker {tracker} closed after {len(header)} bytes, before a whole reply")
            try:
                _status, length = decode_tracker_reply_header(header)
            except ProtocolError as exc:
                raise ProtocolError(f"tracker {tracker}: {exc}") from exc
            body = _recv_exact(sock, length)
    except OSError as exc:
        raise TrackerUnreachable(f"tracker {tracker} unreachable: {exc.strerror or exc}") from exc
    if len(body) < length:
        raise ProtocolError(f"tracker {tracker} closed after {len(body)} of the {length} body bytes it announced")
    try:
        reply = decode_tracker_reply(header + body)
    except ProtocolError as exc:
        raise ProtocolError(f"tracker {tracker}: {exc}") from exc
    if not isinstance(reply, PeerList):
        raise TrackerRefused(f"tracker {tracker} refused: {reply.message} (status {reply.status})")
    return reply.peers


def local_ip(sock: socket.socket, ip: str) -> str:
    """``ip``, or for 0.0.0.0 the IPv4 address ``sock`` (connected to the tracker) goes out from."""
    if ip != "0.0.0.0":
        return ip
    local = sock.getsockname()[0]
    return local if is_specific_ipv4(local) else ip


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer if the other side closes first."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 16))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _http_port_error(tracker: TrackerAddress) -> ProtocolError:
    return ProtocolError(
        f"tracker {tracker} answered in HTTP: this looks like the tracker's HTTP port; "
        f"use http://{tracker.host}:{tracker.port}"
    )


# Seconds to wait for an HTTP status line after the nudge (arbitrary: a local answer takes
# milliseconds, and this is spent only on a tracker that already timed out).
HTTP_PROBE_TIMEOUT = 1.0


def _answers_http(sock: socket.socket) -> bool:
    """True if the silent server on ``sock`` turns out to speak HTTP.

    An HTTP server waits for the end of a request line that our 54 bytes never
    send; an empty line completes it and the server answers ``HTTP/1.x 400``.
    A binary tracker that stayed silent this long has failed already, so the
    extra bytes cost nothing.
    """
    try:
        sock.settimeout(HTTP_PROBE_TIMEOUT)
        sock.sendall(b"\r\n\r\n")
        return _recv_exact(sock, 5) == b"HTTP/"
    except OSError:
        return False
