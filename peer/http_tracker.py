"""Announcing over a tracker's HTTP API (``--tracker http://HOST:PORT``).

Same contract as :func:`peer.tracker_client.announce`, which hands over to
:func:`announce_http` for an HTTP tracker: one ``POST /api/v1/announce`` with
``{"cascade_hash", "ip", "port", "action"}``, answered with
``{"peers": [{"ip", "port", "last_seen", "good"}, ...]}``. The session
retries connection errors and 502/503/504 a bounded number of times
(:func:`peer.http_client.http_session`); every failure becomes a Cascade error.

:func:`announce_stopped` sends the ``"stopped"`` action, which the binary
protocol has no command for: the tracker drops the peer from the swarm at
once instead of waiting for its TTL (BitTorrent's ``event=stopped``).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from cascade.addresses import TrackerAddress, is_specific_ipv4
from cascade.errors import ProtocolError, TrackerRefused, TrackerUnreachable
from cascade.wire import MAX_TRACKER_REPLY_BODY, PeerRecord, TrackerCommand
from peer.http_client import RETRIES, describe_request_error, error_message, http_session, parse_json

# A JSON peer record is at most ~80 bytes; this leaves room for 65,536 of them.
MAX_REPLY_BYTES = MAX_TRACKER_REPLY_BODY * 8
# A peer says "stopped" on its way out: one quick attempt, so a dead tracker
# cannot hold up the exit (the TTL removes the peer anyway). Arbitrary.
STOPPED_TIMEOUT = 1.0

if TYPE_CHECKING:
    import requests


def announce_http(
    tracker: TrackerAddress,
    command: TrackerCommand,
    cascade_hash: bytes,
    ip: str,
    port: int,
    timeout: float = 10.0,
) -> tuple[PeerRecord, ...]:
    """POST one announce and return the peers in the reply.

    ``timeout`` bounds the connect and each read of one attempt. Raises
    :class:`TrackerUnreachable`, :class:`TrackerRefused` or :class:`ProtocolError`.
    """
    action = "subscribe" if command == TrackerCommand.SUBSCRIBE else "list"
    doc = {"cascade_hash": cascade_hash.hex(), "ip": _announced_ip(tracker, ip), "port": port, "action": action}
    body = _post(tracker, doc, timeout)
    return _parse_peers(body, tracker)


def announce_stopped(
    tracker: TrackerAddress, cascade_hash: bytes, ip: str, port: int, timeout: float = STOPPED_TIMEOUT
) -> None:
    """Tell the tracker that ``ip:port`` left the swarm of ``cascade_hash``; one attempt, no retry.

    Raises :class:`TrackerUnreachable`, :class:`TrackerRefused` or :class:`ProtocolError`.
    """
    doc = {"cascade_hash": cascade_hash.hex(), "ip": _announced_ip(tracker, ip), "port": port, "action": "stopped"}
    _post(tracker, doc, timeout, 0)


def _announced_ip(tracker: TrackerAddress, ip: str) -> str:
    """``ip``, or for 0.0.0.0 the local address that reaches the tracker (it may store 0.0.0.0 as sent)."""
    return route_ip(tracker.host, tracker.port) if ip == "0.0.0.0" else ip


def _post(tracker: TrackerAddress, doc: dict[str, object], timeout: float, retries: int = RETRIES) -> bytes:
    import requests

    assert tracker.url is not None
    try:
        with (
            http_session(retries) as session,
            session.post(f"{tracker.url}/api/v1/announce", json=doc, timeout=timeout, stream=True) as r,
        ):
            body = _read_capped(r)
            status = r.status_code
            if status != 200:
                raise TrackerRefused(f"tracker {tracker} refused: {error_message(r)} (HTTP {status})")
    except requests.RequestException as exc:
        raise TrackerUnreachable(f"tracker {tracker} unreachable: {describe_request_error(exc)}") from exc
    return body


def route_ip(host: str, port: int) -> str:
    """The local IPv4 address this machine reaches ``host`` from, else 0.0.0.0.

    Connecting a UDP socket sends nothing; the kernel only picks the route and
    the source address, the same one a TCP connection to the tracker gets.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.connect((host, port or 80))
            local = str(udp.getsockname()[0])
    except OSError:  # an unresolvable host: the request itself will say so
        return "0.0.0.0"
    return local if is_specific_ipv4(local) else "0.0.0.0"


def _read_capped(r: requests.Response) -> bytes:
    length = r.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_REPLY_BYTES:
        raise ProtocolError(f"tracker reply is larger than {MAX_REPLY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    for chunk in r.iter_content(1 << 16):
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise ProtocolError(f"tracker reply is larger than {MAX_REPLY_BYTES} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    r._content = data  # so error_message() can still read the body
    return data


def _parse_peers(body: bytes, tracker: TrackerAddress) -> tuple[PeerRecord, ...]:
    try:
        doc = parse_json(body)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        raw = doc["peers"]
        if not isinstance(raw, list):
            raise TypeError("peers is not a list")
        peers = []
        for p in raw:
            if not isinstance(p, dict):
                raise TypeError("a peer is not a JSON object")
            ip, port, last_seen, good = p["ip"], p["port"], p["last_seen"], p["good"]
            if not (isinstance(port, int) and isinstance(last_seen, int) and isinstance(good, bool)):
                raise TypeError("a peer has a field of the wrong type")
            peers.append(PeerRecord(str(ip), port, last_seen, good))
    except (ValueError, KeyError, TypeError, ProtocolError) as exc:
        raise ProtocolError(f"tracker {tracker} sent a reply that is not its API: {exc}") from exc
    return tuple(peers)
