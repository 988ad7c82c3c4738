"""``HOST:PORT`` as users write it on the command line, and the address of a tracker."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cascade.errors import UsageError


def parse_hostport(text: str, what: str = "address", default_host: str | None = None) -> tuple[str, int]:
    """``"127.0.0.1:8888"`` -> ``("127.0.0.1", 8888)``; ``"[::1]:80"`` works too.

    With ``default_host``, a bare ``":PORT"`` or ``"PORT"`` takes that host.
    Raises :class:`UsageError` naming ``what``.
    """
    raw = text.strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = "", raw
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        if default_host is None:
            raise UsageError(f"invalid {what} {text!r}: expected HOST:PORT")
        host = default_host
    # The length check comes first: int() refuses strings of over 4300 digits with a ValueError.
    valid = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if not valid or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"invalid {what} {text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def is_specific_ipv4(host: str) -> bool:
    """True for an IPv4 literal other than 0.0.0.0 (one a tracker can hand to other peers)."""
    try:
        return ipaddress.IPv4Address(host) != ipaddress.IPv4Address("0.0.0.0")
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class TrackerAddress:
    """Where a tracker listens: ``HOST:PORT`` of its binary protocol, or the base URL of its HTTP API."""

    host: str
    port: int
    # For a tracker's HTTP API: its base URL (http://HOST:PORT); announces then go over HTTP.
    url: str | None = None

    def __str__(self) -> str:
        return self.url or f"{self.host}:{self.port}"
