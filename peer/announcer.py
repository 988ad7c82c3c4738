"""Keeping this peer's subscriptions alive at its trackers.

Each tracker (``--tracker`` may be given several times) has its own schedule:
a background thread per tracker subscribes (command 2) each added cascade hash at once,
then again every ``interval`` seconds, well within the tracker's TTL. When the
tracker is unreachable the peer keeps serving: the thread retries with
exponential backoff, logging one line when the tracker goes away and one when
it is back. A reply it cannot use (not the protocol, not JSON) counts as a
failure like an unreachable tracker: one line, then retries with backoff. On
:meth:`Announcer.stop` it tells an HTTP tracker that the peer stopped (the
``"stopped"`` action), so the tracker lists no ghost seeder; the binary
protocol has no such command, and there the tracker's TTL decides.

With several trackers, each has its own backoff and its own "unreachable" /
"is back" lines; one tracker down costs the others nothing, and the peer
serves on whatever they answer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from cascade.addresses import TrackerAddress
from cascade.backoff import Backoff
from cascade.errors import CascadeError, TrackerRefused
from cascade.wire import TrackerCommand
from peer.clock import REAL_CLOCK, Clock
from peer.common import DEFAULT_ANNOUNCE_INTERVAL
from peer.tracker_client import announce

__all__ = ["AnnounceFn", "Announcer", "Backoff"]

log = logging.getLogger("peer.announcer")

# Subscribes are retried after 1 s, doubling up to 30 s.
DEFAULT_BACKOFF = Backoff(initial=1.0, factor=2.0, cap=30.0)


DEFAULT_INTERVAL = DEFAULT_ANNOUNCE_INTERVAL
# A tracker that does not answer a subscribe within this time counts as down.
ANNOUNCE_TIMEOUT = 5.0
# All the "stopped" announces of one stop() together take about this long at most,
# so `peer seed` still exits within 2 s (a tracker that misses one drops the peer
# at its TTL). Arbitrary; a tracker on the LAN answers one in milliseconds.
STOPPED_BUDGET = 0.5

AnnounceFn = Callable[[TrackerAddress, TrackerCommand, bytes, str, int, float], object]


class Announcer:
    """Subscribes cascade hashes at one or more trackers, each from its own background thread."""

    def __init__(
        self,
        trackers: TrackerAddress | Sequence[TrackerAddress],
        announce_ip: str,
        port: int,
        *,
        interval: float = DEFAULT_INTERVAL,
        backoff: Backoff = DEFAULT_BACKOFF,
        timeout: float = ANNOUNCE_TIMEOUT,
        announce_fn: AnnounceFn = announce,
        clock: Clock = REAL_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(trackers, TrackerAddress):
            trackers = [trackers]
        self._schedules = [
            _Schedule(
                t,
                announce_ip,
                port,
                interval=interval,
                backoff=backoff,
                timeout=timeout,
                announce_fn=announce_fn,
                clock=clock,
                rng=rng,
            )
            for t in dict.fromkeys(trackers)  # each tracker once, in order
        ]

    def add(self, cascade_hash: bytes) -> None:
        """Start subscribing ``cascade_hash`` at every tracker; the first subscribes go out at once."""
        for s in self._schedules:
            s.add(cascade_hash)

    def discard(self, cascade_hash: bytes) -> None:
        """Stop re-subscribing ``cascade_hash``; each tracker forgets this peer for it after its TTL."""
        for s in self._schedules:
            s.discard(cascade_hash)

    def start(self) -> None:
        for s in self._schedules:
            s.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop every thread, then say "stopped" to each HTTP tracker that answered, all at once.

        An announce in progress is abandoned after ``timeout`` seconds; the
        "stopped" announces take at most ``STOPPED_BUDGET`` seconds more.
        """
        deadline = time.monotonic() + timeout
        for s in self._schedules:
            s.signal_stop()
        for s in self._schedules:
            s.join(max(0.0, deadline - time.monotonic()))
        if len(self._schedules) == 1:
            self._schedules[0].say_stopped()
            return
        threads = [
            threading.Thread(target=s.say_stopped, name="peer-stopped", daemon=True)
            for s in self._schedules
            if s.should_say_stopped
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + STOPPED_BUDGET
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        """True while every tracker's thread runs (a thread that died would stop its announces)."""
        return all(s.alive for s in self._schedules)

    @property
    def successes(self) -> int:
        """Announces that reached a tracker, all trackers together."""
        return sum(s.successes for s in self._schedules)

    @property
    def tracker_down(self) -> bool:
        """True when no tracker answers (the last announce to each failed)."""
        return all(s.tracker_down for s in self._schedules)


class _Schedule:
    """Subscribes cascade hashes at one tracker from a background thread."""

    def __init__(
        self,
        tracker: TrackerAddress,
        announce_ip: str,
        port: int,
        *,
        interval: float = DEFAULT_INTERVAL,
        backoff: Backoff = DEFAULT_BACKOFF,
        timeout: float = ANNOUNCE_TIMEOUT,
        announce_fn: AnnounceFn = announce,
        clock: Clock = REAL_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.tracker = tracker
        self.announce_ip = announce_ip
        self.port = port
        self.interval = interval
        self.backoff = backoff
        self.timeout = timeout
        self._announce = announce_fn
        self._clock = clock
        # Jitters the backoff when it asks for jitter.
        self._rng = rng or random.Random()
        self._due: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-announcer", daemon=True)
        self._failures = 0
        self._last_failure = ""
        self._refused: set[bytes] = set()
        # Announces that reached the tracker; tests and logs read it.
        self.successes = 0

    def add(self, cascade_hash: bytes) -> None:
        """Start subscribing ``cascade_hash``; the first subscribe goes out at once."""
        with self._lock:
            self._due[cascade_hash] = float("-inf")
        self._wake.set()

    def discard(self, cascade_hash: bytes) -> None:
        """Stop re-subscribing ``cascade_hash``; the tracker forgets this peer for it after its TTL."""
        with self._lock:
            self._due.pop(cascade_hash, None)

    def start(self) -> None:
        self._thread.start()

    def signal_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def should_say_stopped(self) -> bool:
        # Only a tracker that answered: a dead one would only cost timeouts.
        return self.tracker.url is not None and self.successes > 0 and not self.tracker_down

    def say_stopped(self) -> None:
        """Say "stopped" for every hash to an HTTP tracker that answered, within ``STOPPED_BUDGET``."""
        if not self.should_say_stopped:
            return
        from peer.http_tracker import STOPPED_TIMEOUT, announce_stopped

        with self._lock:
            hashes = list(self._due)
            self._due.clear()
        deadline = time.monotonic() + STOPPED_BUDGET  # real: it bounds real HTTP requests
        for done, cascade_hash in enumerate(hashes):
            left = deadline - time.monotonic()
            if left <= 0:
                log.debug("no time to say stopped for %d files; the tracker's TTL drops them", len(hashes) - done)
                return
            try:
                announce_stopped(self.tracker, cascade_hash, self.announce_ip, self.port, min(STOPPED_TIMEOUT, left))
            except CascadeError as exc:
                log.debug("could not say stopped: %s", exc)
                return

    @property
    def tracker_down(self) -> bool:
        return self._failures > 0

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._announce_due()
                with self._lock:
                    next_due = min(self._due.values(), default=None)
                wait = None if next_due is None else max(0.0, next_due - self._clock.now())
                if wait is None or wait > 0:
                    self._clock.wait(self._wake, wait)
                self._wake.clear()
        except Exception:
            log.exception("announcer failed; the tracker will no longer be told about this peer")

    def _announce_due(self) -> None:
        now = self._clock.now()
        with self._lock:
            due = [h for h, t in self._due.items() if t <= now]
        for cascade_hash in due:
            if self._stop.is_set():
                return
            try:
                self._announce(
                    self.tracker, TrackerCommand.SUBSCRIBE, cascade_hash, self.announce_ip, self.port, self.timeout
                )
            except TrackerRefused as exc:
                self._tracker_answered()
                if cascade_hash not in self._refused:
                    self._refused.add(cascade_hash)
                    log.warning("%s", exc)
            except Exception as exc:  # any bad reply (even a bug it hits): one line, retry; never stop
                self._failures += 1
                delay = self.backoff.delay(self._failures, self._rng)
                message = str(exc) if isinstance(exc, CascadeError) else f"announce failed: {exc!r}"
                if self._failures == 1 or message != self._last_failure:
                    log.warning("%s; still serving, retrying with backoff", message)
                self._last_failure = message
                # Every hash waits: one unreachable tracker is not worth a timeout per file.
                retry_at = self._clock.now() + delay
                with self._lock:
                    for h in due:
                        self._due[h] = retry_at
                return
            else:
                self._tracker_answered()
                self._refused.discard(cascade_hash)
                self.successes += 1
                log.debug("subscribed %s at tracker %s", cascade_hash.hex()[:16], self.tracker)
            with self._lock:
                if cascade_hash in self._due:
                    self._due[cascade_hash] = self._clock.now() + self.interval

    def _tracker_answered(self) -> None:
        if self._failures:
            log.info("tracker %s is back", self.tracker)
        self._failures = 0
        self._last_failure = ""
