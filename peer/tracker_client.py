"""Talking to a tracker over the binary protocol (PROTOCOL.md section 2).

One request per connection: connect, send 54 bytes, read the reply until the
tracker closes. Every failure is translated here into a Cascade error.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from cascade.addresses import parse_hostport
from cascade.errors import CascadeError, ProtocolError, TrackerUnreachable
from cascade.wire import (
    MAX_TRACKER_REPLY_BODY,
    TRACKER_REPLY_HEADER_SIZE,
    PeerList,
    PeerRecord,
    TrackerCommand,
    TrackerRequest,
    decode_tracker_reply,
)


class TrackerRefused(CascadeError):
    """The tracker answered with an error status (for example, a hash not on its allow list)."""


@dataclass(frozen=True, slots=True)
class TrackerAddress:
    host: str
    port: int
    # For a tracker's HTTP API: its base URL (http://HOST:PORT); announces then go over HTTP.
    url: str | None = None

    def __str__(self) -> str:
        return self.url or f"{self.host}:{self.port}"


def parse_tracker(text: str, what: str = "tracker address") -> TrackerAddress:
    """``HOST:PORT`` (binary protocol) or ``http://HOST:PORT`` (HTTP API); raises :class:`UsageError`."""
    if text.strip().startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        from peer.publish import tracker_base_url

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

    Raises :class:`TrackerUnreachable`, :class:`TrackerRefused` or :class:`ProtocolError`.
    """
    if tracker.url is not None:
        from peer.http_tracker import announce_http  # requests is imported only for HTTP trackers

        return announce_http(tracker, command, cascade_hash, ip, port, timeout)
    request = TrackerRequest(command, cascade_hash, ip, port).encode()
    limit = TRACKER_REPLY_HEADER_SIZE + MAX_TRACKER_REPLY_BODY
    try:
        with socket.create_connection((tracker.host, tracker.port), timeout=timeout) as sock:
            sock.sendall(request)
            chunks: list[bytes] = []
            received = 0
            while received <= limit:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
    except OSError as exc:
        raise TrackerUnreachable(f"tracker {tracker} unreachable: {exc.strerror or exc}") from exc
    data = b"".join(chunks)
    if received > limit:
        raise ProtocolError(f"tracker {tracker} sent more than {limit} bytes")
    if len(data) < TRACKER_REPLY_HEADER_SIZE:
        raise ProtocolError(f"tracker {tracker} closed after {len(data)} bytes, before a whole reply")
    try:
        reply = decode_tracker_reply(data)
    except ProtocolError as exc:
        raise ProtocolError(f"tracker {tracker}: {exc}") from exc
    if not isinstance(reply, PeerList):
        raise TrackerRefused(f"tracker {tracker} refused: {reply.message} (status {reply.status})")
    return reply.peers
