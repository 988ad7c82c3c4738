"""Several trackers for one swarm: ``--tracker`` given more than once (BEP 12's announce-list, flattened).

A peer may name several trackers, binary and HTTP mixed. :class:`TrackerSet`
asks all of them for peers at once, each with its own timeout (once one has
answered, the others get ``LATE_GRACE`` seconds more), and merges the
answers: one record per address, with the newest ``last_seen`` of any
tracker and "good" if any tracker says so. A listing succeeds while any one tracker
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
from peer.planner import PeerInfo
from peer.tracker_client import announce, parse_tracker

log = logging.getLogger("peer.trackers")

# An HTTP announce may make 1 + RETRIES attempts of ``timeout`` each; a thread
# still busy after this many timeouts (plus a second) counts as not answering.
_JOIN_FACTOR = 4

# Once one tracker answered a listing, the others get this many seconds more (arbitrary:
# a tracker on the LAN answers in milliseconds, and the fetcher waits while it lists).
LATE_GRACE = 1.0

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
        late_grace: float = LATE_GRACE,
    ) -> None:
        """Raises :class:`ValueError` for no tracker at all."""
        if not trackers:
            raise ValueError("at least one tracker")
        self.trackers = tuple(trackers)
        self.backoff = backoff or Backoff()
        self.late_grace = late_grace
        self._clock = clock
        self._failures = dict.fromkeys(self.trackers, 0)
        self._retry_at = dict.fromkeys(self.trackers, float("-inf"))
        self._last_error: dict[TrackerAddress, CascadeError] = {}
        # The trackers that answered at least once (a peer says "stopped" only to those).
        self.answered: set[TrackerAddress] = set()

    @property
    def live(self) -> list[TrackerAddress]:
        """The trackers that answered, the last time asked (in order)."""
        return [t for t in self.trackers if t in self.answered and t not in self._last_error]

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
        results = _call_all(usable, fn, timeout, self.late_grace)
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
    trackers: Sequence[TrackerAddress], fn: ListFn, timeout: float, late_grace: float
) -> list[tuple[PeerRecord, ...] | CascadeError]:
    """``fn(tracker)`` for each tracker, in threads (the caller's own thread for just one).

    Once one tracker answered, the others get ``late_grace`` seconds more; one
    still busy then counts as failed (its thread ends by its own timeout, its
    answer unused), so a tracker that hangs holds up no listing for long.
    """
    if len(trackers) == 1:
        try:
            return [fn(trackers[0])]
        except CascadeError as exc:
            return [exc]
    results: list[tuple[PeerRecord, ...] | CascadeError | None] = [None] * len(trackers)
    done = threading.Condition()
    first_answer: list[float] = []

    def run(i: int) -> None:
        result: tuple[PeerRecord, ...] | CascadeError
        try:
            result = fn(trackers[i])
        except CascadeError as exc:
            result = exc
        except Exception as exc:  # a bug or an unforeseen reply: this tracker failed, the others go on
            result = TrackerUnreachable(f"tracker {trackers[i]} failed: {exc!r}")
        with done:
            results[i] = result
            if not isinstance(result, CascadeError) and not first_answer:
                first_answer.append(time.monotonic())
            done.notify_all()

    started = time.monotonic()
    for i in range(len(trackers)):
        threading.Thread(target=run, args=(i,), name="peer-list", daemon=True).start()
    deadline = started + _JOIN_FACTOR * timeout + 1.0
    with done:
        while any(r is None for r in results):
            limit = min(deadline, first_answer[0] + late_grace) if first_answer else deadline
            left = limit - time.monotonic()
            if left <= 0:
                break
            done.wait(left)
        snapshot = list(results)
    waited = time.monotonic() - started
    return [
        r if r is not None else TrackerUnreachable(f"tracker {t} did not answer within {waited:.1f} s")
        for t, r in zip(trackers, snapshot, strict=True)
    ]


def peer_infos(records: Iterable[PeerRecord]) -> list[PeerInfo]:
    """The fetcher's view of a tracker's peer records. Raises nothing.

    ``last_seen`` (UNIX seconds, the tracker's clock) is kept: the fetcher tries
    recently seen peers first.
    """
    return [(r.ip, r.port, r.good, r.last_seen) for r in records]
