"""The tracker's numbers for Prometheus, built with ``prometheus_client`` at scrape time.

Nothing is counted twice: announce counters live in the swarm store
(:mod:`tracker.store`), so the binary protocol (``protocol="tcp"``) and the
HTTP API (``protocol="http"``) are counted the same way, in the status codes
of the tracker protocol, and on Redis every tracker on one Redis reports the
same shared totals. :class:`TrackerCollector` reads them when ``/metrics`` is
scraped. HTTP responses are counted apart, per tracker process, by route and
HTTP status, in :class:`HttpCounters`.

Each tracker has its own :class:`~prometheus_client.CollectorRegistry`
(:func:`make_registry`); the library's global default registry is not used.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tracker.store import SwarmStore

# The classic text format (0.0.4): what every Prometheus scrapes, and what tests pin.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Per-swarm gauges for this many of the busiest swarms (most peers); arbitrary,
# small enough that a scrape stays a few KB however many swarms there are.
BUSIEST_SWARMS = 20


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


class TrackerCollector(Collector):
    """Reads the store, the HTTP counters and the gauges at each scrape.

    ``uptime`` and ``stored`` are callables so the collector holds no state of
    its own. A store that is down raises
    :class:`~tracker.store.StoreUnavailable` out of :meth:`collect` (the HTTP
    front end answers 503).
    """

    def __init__(
        self,
        store: SwarmStore,
        http: HttpCounters,
        uptime: Callable[[], float],
        stored: Callable[[], int],
        connections: Callable[[], int],
        busiest: int = BUSIEST_SWARMS,
    ) -> None:
        self._store = store
        self._http = http
        self._uptime = uptime
        self._stored = stored
        self._connections = connections
        self._busiest = busiest

    def collect(self) -> Iterator[Metric]:
        c = self._store.counters()
        requests = CounterMetricFamily(
            "cascade_tracker_requests",
            "Announce requests by protocol, command and tracker status "
            "(0 ok, 1 malformed, 2 not allowed, 3 full, 4 internal, 5 store unavailable).",
            labels=["protocol", "command", "status"],
        )
        for (protocol, command, status), n in sorted(c.requests.items()):
            requests.add_metric([protocol, command, str(status)], n)
        yield requests
        http = CounterMetricFamily(
            "cascade_tracker_http_responses", "HTTP responses by route and status code.", labels=["route", "code"]
        )
        for (route, code), n in sorted(self._http.snapshot().items()):
            http.add_metric([route, str(code)], n)
        yield http
        errors = CounterMetricFamily(
            "cascade_tracker_errors", "Errors by kind (timeouts, refused connections, caps reached).", labels=["kind"]
        )
        for kind, n in sorted(c.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        yield CounterMetricFamily(
            "cascade_tracker_completions",
            "Peers that turned from fetching (enrolled by a list request) into seeders (a subscribe) "
            "while the tracker knew them.",
            value=c.completions,
        )
        yield GaugeMetricFamily("cascade_tracker_swarms", "Swarms held (cascade hashes with peers).", value=c.swarms)
        yield GaugeMetricFamily("cascade_tracker_peers", "Peers held in all swarms.", value=c.peers)
        yield GaugeMetricFamily(
            "cascade_tracker_cascade_files", ".cascade files stored for download.", value=self._stored()
        )
        yield GaugeMetricFamily(
            "cascade_tracker_uptime_seconds", "Seconds since the tracker started.", value=round(self._uptime(), 3)
        )
        yield GaugeMetricFamily(
            "cascade_tracker_http_connections",
            "HTTP connections open on this tracker (idle keep-alive ones included).",
            value=self._connections(),
        )
        seeders = GaugeMetricFamily(
            "cascade_tracker_swarm_seeders",
            f"Seeders (subscribed peers) of the {self._busiest} swarms with the most peers.",
            labels=["cascade_hash"],
        )
        peers = GaugeMetricFamily(
            "cascade_tracker_swarm_peers",
            f"All peers of the {self._busiest} swarms with the most peers.",
            labels=["cascade_hash"],
        )
        if self._busiest > 0:
            busiest = sorted(self._store.swarms(), key=lambda s: s.seeders + s.others, reverse=True)
            for s in busiest[: self._busiest]:
                hx = s.cascade_hash.hex()
                seeders.add_metric([hx], s.seeders)
                peers.add_metric([hx], s.seeders + s.others)
        yield seeders
        yield peers


def make_registry(collector: TrackerCollector) -> CollectorRegistry:
    """A registry of its own for one tracker, holding only ``collector``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The whole ``/metrics`` page; raises what the collector raises (e.g. ``StoreUnavailable``)."""
    return generate_latest(registry)
