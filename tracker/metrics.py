"""The tracker's numbers in the Prometheus text format (version 0.0.4).

Announce counters come from the swarm store (:mod:`tracker.store`), so the
binary protocol (``protocol="tcp"``) and the HTTP API (``protocol="http"``)
are counted the same way, in the status codes of the tracker protocol. HTTP
responses are counted apart, by route and HTTP status, in :class:`HttpCounters`.
"""

from __future__ import annotations

import threading
from collections import Counter

from tracker.swarms import Counters

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HttpCounters:
    """HTTP responses by (route, status), behind a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()

    def count(self, route: str, status: int) -> None:
        with self._lock:
            self._counts[(route, status)] += 1

    def snapshot(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._counts)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(counters: Counters, http: dict[tuple[str, int], int], uptime: float, stored: int) -> str:
    """The whole ``/metrics`` page."""
    out: list[str] = [
        "# HELP cascade_tracker_requests_total Announce requests by protocol, command and tracker status "
        "(0 ok, 1 malformed, 2 not allowed, 3 full, 4 internal, 5 store unavailable).",
        "# TYPE cascade_tracker_requests_total counter",
    ]
    for (protocol, command, status), n in sorted(counters.requests.items()):
        out.append(
            f'cascade_tracker_requests_total{{protocol="{_label(protocol)}",command="{_label(command)}",'
            f'status="{status}"}} {n}'
        )
    out += [
        "# HELP cascade_tracker_http_responses_total HTTP responses by route and status code.",
        "# TYPE cascade_tracker_http_responses_total counter",
    ]
    for (route, status), n in sorted(http.items()):
        out.append(f'cascade_tracker_http_responses_total{{route="{_label(route)}",code="{status}"}} {n}')
    out += [
        "# HELP cascade_tracker_errors_total Errors by kind (timeouts, refused connections, caps reached).",
        "# TYPE cascade_tracker_errors_total counter",
    ]
    for kind, n in sorted(counters.errors.items()):
        out.append(f'cascade_tracker_errors_total{{kind="{_label(kind)}"}} {n}')
    out += [
        "# HELP cascade_tracker_swarms Swarms held (cascade hashes with peers).",
        "# TYPE cascade_tracker_swarms gauge",
        f"cascade_tracker_swarms {counters.swarms}",
        "# HELP cascade_tracker_peers Peers held in all swarms.",
        "# TYPE cascade_tracker_peers gauge",
        f"cascade_tracker_peers {counters.peers}",
        "# HELP cascade_tracker_cascade_files .cascade files stored for download.",
        "# TYPE cascade_tracker_cascade_files gauge",
        f"cascade_tracker_cascade_files {stored}",
        "# HELP cascade_tracker_uptime_seconds Seconds since the tracker started.",
        "# TYPE cascade_tracker_uptime_seconds gauge",
        f"cascade_tracker_uptime_seconds {uptime:.3f}",
    ]
    return "\n".join(out) + "\n"
