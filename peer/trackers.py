"""Several trackers for one swarm: ``--tracker`` given more than once (BEP 12's announce-list, flattened).

A peer may name several trackers, binary and HTTP mixed. :class:`TrackerSet`
asks all of them for peers at once, each with its own timeout, and merges the
answers: one record per address, with the newest ``last_seen`` of any tracker
and "good" if any tracker says so. A listing succeeds while any one tracker
answers; it fails only when every tracker failed, with one line naming each
tracker's failure. A tracker that failed is left out of the next listings
for a growing while (its own :class:`~peer.announcer.Backoff`), so a dead
tracker costs no timeout on every relist; while every tracker is down, all
are asked again each time, as a single tracker is.

With a single tracker everything is as it always was: its own errors, unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from cascade.addresses import TrackerAddress
from cascade.errors import CascadeError, ProtocolError, TrackerRefused, TrackerUnreachable
from cascade.wire import PeerRecord, TrackerCommand
from peer.announcer import Backoff
from peer.tracker_client import announce, parse_tracker

log = logging.getLogger("peer.trackers")

# An HTTP announce may make 1 + RETRIES attempts of ``timeout`` each; a thread
# still busy after this many timeouts (plus a second) counts as not answering.
_JOIN_FACTOR = 4

ListFn = Callable[[TrackerAddress], tuple[PeerRecord, ...]]


def parse_trackers(texts: Iterable[str], what: str = "--tracker") -> tuple[TrackerAddress, ...]:
    """Every ``--tracker`` value as a :class:`TrackerAddress`, in order, each once.

    Raises :class:`~cascade.errors.UsageError` for a bad one.
    """
    out: list[TrackerAddress] = []
    for text in texts:
        tracker = parse_tracker(text, what)
        if tracker not in out:
            out.append(tracker)
    return tuple(out)


def merge_peers(replies: Iterable[Iterable[PeerRecord]]) -> tuple[PeerRecord, ...]:
    """One record per (ip, port), in order of first appearance: the newest ``last_seen``, good if any is."""
    merged: dict[tuple[str, int], PeerRecord] = {}
    for records in replies:
        for r in records:
            key = (r.ip, r.port)
            old = merged.get(key)
            if old is None:
                merged[key] = r
            else:
                merged[key] = PeerRecord(r.ip, r.port, max(old.last_seen, r.last_seen), old.good or r.good)
    return tuple(merged.values())


def all_failed(failures: Sequence[tuple[TrackerAddress, CascadeError]]) -> CascadeError:
    """The one error for a listing no tracker answered: each tracker's own error, on one line.

    A single tracker's error is returned as it is. Several keep their class
    when they agree (every tracker refused), else they count as unreachable.
    """
    if len(failures) == 1:
        return failures[0][1]
    kinds = {type(exc) for _, exc in failures}
    cls: type[CascadeError] = kinds.pop() if len(kinds) == 1 else TrackerUnreachable
    if cls not in (TrackerRefused, TrackerUnreachable, ProtocolError):
        cls = TrackerUnreachable
    # Each message names its tracker already ("tracker HOST:PORT unreachable: ...").
    reasons = "; ".join(" ".join(str(exc).split()) for _, exc in failures)
    return cls(f"no tracker answered: {reasons}")


class TrackerSet:
    """The trackers of one peer, asked together; each has its own failure count and backoff."""

    def __init__(
        self,
        trackers: Sequence[TrackerAddress],
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises :class:`ValueError` for no tracker at all."""
        if not trackers:
            raise ValueError("at least one tracker")
        self.trackers = tuple(trackers)
        self.backoff = backoff or Backoff()
        self._clock = clock
        self._failures = dict.fromkeys(self.trackers, 0)
        self._retry_at = dict.fromkeys(self.trackers, float("-inf"))
        self._last_error: dict[TrackerAddress, CascadeError] = {}
        # The trackers that answered at least once (a peer says "stopped" only to those).
        self.answered: set[TrackerAddress] = set()

    def __len__(self) -> int:
        return len(self.trackers)

    def list_peers(self, cascade_hash: bytes, ip: str, port: int, timeout: float) -> tuple[PeerRecord, ...]:
        """Ask every usable tracker at once; the merged peers of those that answered.

        Raises the error of :func:`all_failed` when none answered.
        """

        def ask(tracker: TrackerAddress) -> tuple[PeerRecord, ...]:
            return announce(tracker, TrackerCommand.LIST, cascade_hash, ip, port, timeout)

        return self.ask(ask, timeout)

    def ask(self, fn: ListFn, timeout: float) -> tuple[PeerRecord, ...]:
        """Call ``fn`` for every usable tracker, concurrently; see :meth:`list_peers`."""
        now = self._clock()
        usable = [t for t in self.trackers if self._retry_at[t] <= now] or list(self.trackers)
        results = _call_all(usable, fn, timeout)
        replies: list[tuple[PeerRecord, ...]] = []
        news: list[CascadeError] = []
        for tracker, result in zip(usable, results, strict=True):
            if isinstance(result, CascadeError):
                if self._failed(tracker, result):
                    news.append(result)
            else:
                self._answered(tracker)
                replies.append(result)
        if not replies:
            # One line for the whole listing (the caller's), not one per tracker as well.
            raise all_failed([(t, self._last_error[t]) for t in self.trackers if t in self._last_error])
        for exc in news:
            log.warning("%s; asking the other trackers", exc)
        return merge_peers(replies)

    def _failed(self, tracker: TrackerAddress, exc: CascadeError) -> bool:
        """Count a failure; True if it is news worth a line (another tracker answers meanwhile)."""
        self._failures[tracker] += 1
        self._retry_at[tracker] = self._clock() + self.backoff.delay(self._failures[tracker])
        news = tracker not in self._last_error or str(exc) != str(self._last_error[tracker])
        self._last_error[tracker] = exc
        # With one tracker, its caller reports the failure (as it always has).
        return len(self.trackers) > 1 and news

    def _answered(self, tracker: TrackerAddress) -> None:
        if len(self.trackers) > 1 and tracker in self._last_error:
            log.info("tracker %s is back", tracker)
        self._failures[tracker] = 0
        self._retry_at[tracker] = float("-inf")
        self._last_error.pop(tracker, None)
        self.answered.add(tracker)


def _call_all(
    trackers: Sequence[TrackerAddress], fn: ListFn, timeout: float
) -> list[tuple[PeerRecord, ...] | CascadeError]:
    """``fn(tracker)`` for each tracker, in threads (the caller's own thread for just one)."""
    if len(trackers) == 1:
        try:
            return [fn(trackers[0])]
        except CascadeError as exc:
            return [exc]
    results: list[tuple[PeerRecord, ...] | CascadeError | None] = [None] * len(trackers)

    def run(i: int) -> None:
        try:
            results[i] = fn(trackers[i])
        except CascadeError as exc:
            results[i] = exc
        except Exception as exc:  # a bug or an unforeseen reply: this tracker failed, the others go on
            results[i] = TrackerUnreachable(f"tracker {trackers[i]} failed: {exc!r}")

    threads = [threading.Thread(target=run, args=(i,), name="peer-list", daemon=True) for i in range(len(trackers))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + _JOIN_FACTOR * timeout + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    out: list[tuple[PeerRecord, ...] | CascadeError] = []
    for tracker, result in zip(trackers, results, strict=True):
        out.append(result if result is not None else TrackerUnreachable(f"tracker {tracker} did not answer"))
    return out
