"""Pieces shared by the ``peer seed`` and ``peer fetch`` commands.

Defaults, logging setup, the announce-address rule, and signal handling that
turns SIGINT/SIGTERM into a clean stop. Kept light: :mod:`peer.cli` imports it
before it knows which command runs.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

from cascade.addresses import is_specific_ipv4
from cascade.errors import Interrupted as Interrupted  # its old home; the class lives in the tree
from cascade.errors import UsageError
from oscompat import stop_signals
from peer.planner import FetchPolicy
from peer.superseed import SuperSeedPolicy

DEFAULT_LISTEN = "0.0.0.0:6666"
# The tracker forgets a peer after 150 s by default (tracker/swarms.py): 60 s
# lets one announce go missing before a live seeder drops out of the lists,
# for about 17 announces/s per 1000 seeded files at the tracker. README "Tracker".
DEFAULT_ANNOUNCE_INTERVAL = 60.0
# peer fetch's defaults are FetchPolicy's (written there only).
DEFAULT_FETCH_TIMEOUT = FetchPolicy().stall_timeout
DEFAULT_MAX_PEERS = FetchPolicy().max_peers


@dataclass(frozen=True, slots=True)
class BlockServerConfig:
    """The block server's limits and timeouts (peer/server.py); the defaults live here and only here.

    Raises :class:`ValueError` for a limit below 1 or a timeout that is not above 0.
    """

    # Worker threads answering requests. Arbitrary: enough to keep two cores busy
    # while some workers wait on sendfile; idle connections cost no thread.
    max_workers: int = 32
    # Open connections; at the cap the longest-quiet one makes room. Arbitrary, far
    # below the default 1024 descriptors.
    max_connections: int = 512
    # Collection members held open at once while no request holds more (peer/openfiles.py).
    # 256: with a sending descriptor per connection at most (512) and a socket per
    # connection (512), seeding stays near the usual 1,024-descriptor limit that
    # peer seed raises to 1,280 (peer.collection_local.raise_file_limit); and it is
    # far more than the members a few fetchers ask for at once, so their requests
    # hit. A miss costs 13-18 us (open walk, fstat, close), a hit 1 us (BENCHMARKS.md).
    max_open_files: int = 256
    # Whole-process upload limit in bytes per second; None (or 0, as ``--max-upload-rate 0`` says): no limit.
    upload_rate: int | None = None
    # A connection quiet between requests (or not taking its reply) is closed after this long.
    idle_timeout: float = 30.0
    # A request must arrive whole this long after its first byte (or after the connect).
    # Arbitrary, in the range haproxy and nginx deployments use (5-60 s): a real client
    # sends its 64 bytes in one segment, so only a slowloris client ever needs more.
    header_timeout: float = 10.0
    # How a complete file steers have-map askers to different blocks (docs/protocol-extensions.md).
    superseed: SuperSeedPolicy = SuperSeedPolicy()  # noqa: RUF009 - frozen, so one shared default is safe

    def __post_init__(self) -> None:
        if self.max_workers < 1 or self.max_connections < 1 or self.max_open_files < 1:
            raise ValueError("max_workers, max_connections and max_open_files must be positive")
        if not (self.idle_timeout > 0 and self.header_timeout > 0):
            raise ValueError("idle_timeout and header_timeout must be above 0")
        if self.upload_rate is not None and self.upload_rate < 0:
            raise ValueError("upload_rate must not be negative (None or 0 for no limit)")


# The block server's per-request lines (one or more per block served). A busy
# fetcher serves while it downloads, so these come only with -vv.
REQUEST_LOGGER = "peer.server.requests"


# Log lines of long-running servers start with the local time, to the millisecond.
TIMESTAMP_FORMAT = "%(asctime)s.%(msecs)03d %(message)s"
TIMESTAMP_DATEFMT = "%Y-%m-%dT%H:%M:%S"


def setup_logging(verbose: int = 0, timestamps: bool = False) -> None:
    """One-line messages on stderr; with ``timestamps`` (servers), each starts with the local time.

    ``verbose`` 1 (``-v``) adds debug lines (dropped peers, timings), 2
    (``-vv``) also the block server's line for every request.
    """
    handler = logging.StreamHandler(sys.stderr)
    if timestamps:
        handler.setFormatter(logging.Formatter(TIMESTAMP_FORMAT, TIMESTAMP_DATEFMT))
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)


def announce_ip(listen_host: str, explicit: str | None = None) -> str:
    """The IPv4 address to announce to the tracker.

    ``--announce-ip`` if given, else the listen host when it is a specific
    IPv4 address, else ``0.0.0.0``, which the tracker client replaces with
    the local address of its connection to the tracker. Raises
    :class:`UsageError` for a malformed ``explicit`` and for an IPv6 listen
    host: tracker replies carry only IPv4 addresses (PROTOCOL.md section 2),
    so no other peer could be told where this one listens.
    """
    if ":" in listen_host:
        raise UsageError(
            f"cannot listen on IPv6 address {listen_host}: trackers tell peers only IPv4 addresses, "
            "so no peer could reach this one; listen on an IPv4 address (for example 0.0.0.0)"
        )
    if explicit is not None:
        try:
            return str(ipaddress.IPv4Address(explicit.strip()))
        except ValueError as exc:
            raise UsageError(f"invalid --announce-ip {explicit!r}: expected an IPv4 address") from exc
    return listen_host if is_specific_ipv4(listen_host) else "0.0.0.0"


class StopSignal:
    """SIGINT and SIGTERM (Ctrl-C and Ctrl-Break on Windows) set :attr:`event` instead of killing the process.

    Long loops call :meth:`check` (raises :class:`Interrupted`) or wait on
    :attr:`event`; the command then stops its threads and exits 0. A second
    signal while stopping raises :class:`KeyboardInterrupt` in the main thread,
    for a user who really wants out.
    """

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> StopSignal:
        """Install the handlers (main thread only) and return self."""
        for signum in stop_signals():  # SIGINT and SIGTERM; Ctrl-C and Ctrl-Break on Windows
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until a signal (True) or ``timeout`` (False).

        Waits in short slices, so the main thread runs signal handlers promptly.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return self.event.is_set()
            if self.event.wait(left):
                return True
