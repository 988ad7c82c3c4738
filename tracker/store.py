"""The tracker's store interface, its three backends, and ``--store``.

The front ends (:mod:`tracker.server`, :mod:`tracker.http_api`) talk to two
interfaces only:

* :class:`SwarmStore`: announces (enrol a peer, return a reply sample), swarm
  listings for the HTTP API and status page, the allow-list check, counters;
* :class:`CascadeFiles`: the uploaded ``.cascade`` files (put, get, read, list).

Backends, chosen with ``tracker run --store SPEC``:

=====================  ===================================================
``memory`` (default)   :class:`~tracker.swarms.SwarmRegistry` in this
                       process, files in a temporary folder
``sqlite:PATH``        the same, plus ``PATH`` written in the background and
                       files in ``PATH.cascades`` (``--state PATH``)
``redis://H:P/DB``     :class:`~tracker.redis_store.RedisSwarmStore`:
                       everything in Redis, shared by every tracker on it
=====================  ===================================================

One conformance suite (``tests/test_store_conformance.py``) runs against all
three. A backend that cannot reach its storage raises :class:`StoreUnavailable`
from any method; the binary front end answers ``TrackerStatus.UNAVAILABLE``, the
HTTP front end 503.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from cascade.errors import StoreUnavailable as StoreUnavailable  # its old home; the class lives in the tree
from cascade.errors import UsageError, from_os_error
from cascade.wire import PeerRecord
from tracker.cascade_store import CascadeStore, StoredCascade
from tracker.swarms import Counters, SwarmLimits, SwarmRegistry, SwarmSummary


class SwarmStore(Protocol):
    """What the front ends need from a swarm store; :class:`SwarmRegistry` is the reference."""

    @property
    def limits(self) -> SwarmLimits: ...

    def is_allowed(self, cascade_hash: bytes) -> bool:
        """True if announces for ``cascade_hash`` are accepted. Raises :class:`StoreUnavailable`."""
        ...

    def announce(
        self,
        cascade_hash: bytes,
        ip: str,
        port: int,
        subscribe: bool,
        protocol: str = "api",
        source_ip: str | None = None,
    ) -> list[PeerRecord]:
        """Enrol ``ip:port`` and return the reply sample (see :meth:`SwarmRegistry.announce`).

        Raises :class:`~cascade.errors.BadRequest`, :class:`~cascade.errors.AnnounceRefused`, :class:`StoreUnavailable`.
        """
        ...

    def announce_packed(self, cascade_hash: bytes, key: bytes, subscribe: bool, protocol: str = "tcp") -> bytes:
        """The binary front end's hot path: 6-byte key in, packed 12-byte records out."""
        ...

    def remove(self, cascade_hash: bytes, ip: str, port: int, protocol: str = "api") -> bool:
        """Drop ``ip:port`` from the swarm at once (it said "stopped"); True if it was there.

        Raises :class:`~cascade.errors.BadRequest` for a malformed hash, address or port, and :class:`StoreUnavailable`.
        """
        ...

    def now(self) -> float:
        """The store's clock (UNIX seconds), for the ages of last-seen times."""
        ...

    def swarms(self) -> list[SwarmSummary]:
        """Every swarm with a live peer, most recently active first."""
        ...

    def swarm(self, cascade_hash: bytes) -> SwarmSummary | None:
        """One swarm, or ``None`` when it has no live peer."""
        ...

    def count_request(self, protocol: str, command: str, status: int) -> None:
        """Count one request; never raises (a count lost while the store is down is acceptable)."""
        ...

    def count_error(self, kind: str) -> None:
        """Count one error; never raises."""
        ...

    def counters(self) -> Counters:
        """A snapshot of the request and error counters and the swarm/peer gauges."""
        ...

    def sweep(self, max_swarms: int = 64) -> None:
        """Bounded housekeeping, called about once a second (a no-op where the store expires by itself)."""
        ...


class CascadeFiles(Protocol):
    """The uploaded ``.cascade`` files; :class:`~tracker.cascade_store.CascadeStore` is the reference."""

    max_file_size: int

    def put(self, data: bytes, name: str | None = None) -> tuple[StoredCascade, bool]:
        """Validate and store; (entry, True if new). Raises MetafileError, BadRequest, StoreFull."""
        ...

    def get(self, cascade_hash: bytes) -> StoredCascade | None: ...

    def read(self, cascade_hash: bytes) -> bytes | None: ...

    def name_of(self, cascade_hash: bytes) -> str | None: ...

    def entries(self) -> list[StoredCascade]:
        """Every stored file, newest first."""
        ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


# --- --store ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A parsed ``--store`` value."""

    kind: str  # "memory", "sqlite" or "redis"
    target: str = ""  # the SQLite path or the Redis URL


def parse_store_spec(text: str) -> StoreSpec:
    """``memory``, ``sqlite:PATH`` or ``redis://HOST:PORT/DB``; raises :class:`UsageError`."""
    if text == "memory":
        return StoreSpec("memory")
    if text.startswith("sqlite:"):
        path = text[len("sqlite:") :]
        if not path:
            raise UsageError("--store sqlite:PATH needs a path")
        return StoreSpec("sqlite", path)
    if text.startswith("redis://"):
        from tracker.redis_store import check_redis_url  # redis-py is imported only when asked for

        return StoreSpec("redis", check_redis_url(text))
    raise UsageError(f"--store must be memory, sqlite:PATH or redis://HOST:PORT/DB, not {text!r}")


@dataclass
class Backend:
    """An opened store: the swarms, how to open the files store, and how to stop."""

    spec: StoreSpec
    swarms: SwarmStore
    open_files: Callable[[], CascadeFiles]
    start: Callable[[], None] = field(default=lambda: None)
    close: Callable[[], bool] = field(default=lambda: True)  # False if the last write failed
    loaded: int = 0  # peers found at start-up


def _folder_files(folder: str | None) -> CascadeStore:
    """Files in ``folder`` (``None``: a temporary one).

    Raises :class:`~cascade.errors.DataError` if it cannot be made.
    """
    try:
        return CascadeStore(folder)
    except OSError as exc:
        raise from_os_error(exc, folder, "keep .cascade files in this folder") from exc


def open_backend(
    spec: StoreSpec,
    limits: SwarmLimits,
    allowed: frozenset[bytes] | None,
    *,
    clock: Callable[[], float] = time.time,
) -> Backend:
    """Open the store ``spec`` names.

    ``allowed`` is the ``--allow`` list (``None``: every hash). Raises
    :class:`~cascade.errors.DataError` for an unusable SQLite file and
    :class:`StartError` for a Redis that cannot be reached at start-up.
    """
    if spec.kind == "memory":
        return Backend(spec, SwarmRegistry(limits, clock=clock, allowed=allowed), lambda: _folder_files(None))
    if spec.kind == "sqlite":
        from tracker.state import StateStore, load_state

        registry = SwarmRegistry(limits, clock=clock, allowed=allowed, track_changes=True)
        loaded = load_state(spec.target, registry)
        writer = StateStore(spec.target, registry)
        folder = spec.target + ".cascades"
        return Backend(spec, registry, lambda: _folder_files(folder), writer.start, writer.close, loaded)
    if spec.kind == "redis":
        from tracker.redis_store import open_redis

        swarms, files = open_redis(spec.target, limits, allowed, clock=clock)
        return Backend(spec, swarms, lambda: files, close=swarms.close)
    raise UsageError(f"unknown store kind {spec.kind!r}")
