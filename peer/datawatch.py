"""Noticing that a seeded data file changed under ``peer seed``.

A background thread looks at each data file's path every ``interval`` seconds
(one ``stat``: identity, size, modification and change times). When anything
moved, it re-verifies that file (:meth:`BlockStore.reverify`, one file at a
time, memory bounded by :func:`peer.localdata.check_data`), so the server
stops sending blocks that no longer match, and logs one line. A file that is
gone or unreadable is no longer served, also with one line; if it comes back,
it is verified and served again. While a changed file is re-verified, none
of its blocks are served. The block server also ``fstat``-s a watched file
every few requests and wakes the watcher when it moved (:meth:`wake`), and so
does a collection member that could not be reopened as the file verified: the
watcher then re-verifies that store if it still cannot be opened as verified,
even though its path looks the same (a folder on its way swapped for a link).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from cascade.errors import DataError
from peer.storage import DiskSignature, VerifiedBlocks

log = logging.getLogger("peer")

# Arbitrary: a stat per file every 2 s costs nothing, and a fetcher hears
# status 2 instead of bad blocks within a few seconds of the change.
DEFAULT_INTERVAL = 2.0
# ... but not for a collection of many files: a stat costs about 10 us, so a seeder of
# 10,000 members spent 5-9 % of a core looking. The passes are spaced so that at most
# this many files are looked at per second (arbitrary: about 2 % of a core). Nothing
# changed is served meanwhile: a member is checked against its verified signature each
# time it is opened, and a single file's descriptor is fstat-ed every few requests.
MAX_LOOKS_PER_SECOND = 2000


def pass_interval(files: int, interval: float = DEFAULT_INTERVAL) -> float:
    """Seconds between two looks at every one of ``files`` files: ``interval``, longer for many files."""
    return max(interval, files / MAX_LOOKS_PER_SECOND)


# Called after each re-verification with the store and its verified count before and after.
ChangeFn = Callable[[VerifiedBlocks, int, int], None]


class _Stopped(Exception):
    """The watcher is stopping: abandon the re-verification in progress."""


class DataWatcher:
    """Re-verifies the data file of each store when it changes on disk."""

    def __init__(self, *, interval: float = DEFAULT_INTERVAL, on_change: ChangeFn | None = None) -> None:
        self.interval = interval
        self._on_change = on_change
        # Each store with its file's signature as of its last verification.
        self._seen: list[tuple[VerifiedBlocks, DiskSignature | None]] = []
        # Stores the server woke us about: looked at again even if their path looks the same.
        self._suspects: set[VerifiedBlocks] = set()
        self._suspects_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-datawatch", daemon=True)

    def add(self, store: VerifiedBlocks, seen: DiskSignature | None) -> None:
        """Watch ``store``, whose file was verified as it was at ``seen`` (taken before verifying); before start."""
        self._seen.append((store, seen))

    def start(self) -> None:
        self._thread.start()

    def wake(self, store: VerifiedBlocks | None = None) -> None:
        """Look at the files now rather than at the next interval, and re-verify ``store`` even if it looks the same.

        The server calls it on a changed ``fstat`` and on a member that could not be reopened as verified.
        """
        if store is not None:
            with self._suspects_lock:
                self._suspects.add(store)
        self._wake.set()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread; a re-verification in progress is abandoned within about one chunk."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(pass_interval(len(self._seen), self.interval))
                self._wake.clear()
                if not self._stop.is_set():
                    self.check_once()
        except _Stopped:
            pass
        except Exception:
            log.exception("data file watcher failed; changed files will no longer be noticed")

    def check_once(self) -> None:
        """Look at every file once and re-verify those that changed (raises nothing but ``_Stopped``)."""
        with self._suspects_lock:
            suspects, self._suspects = self._suspects, set()
        for n, (store, seen) in enumerate(self._seen):
            now = store.disk_signature()
            if now == seen and (store not in suspects or store.as_verified()):
                continue
            self._seen[n] = (store, now)
            self._recheck(store, seen, now)

    def _recheck(self, store: VerifiedBlocks, seen: DiskSignature | None, now: DiskSignature | None) -> None:
        before = store.verified_count
        count = store.cf.block_count

        def progress(_n: int) -> None:
            if self._stop.is_set():
                raise _Stopped

        # Until it is verified again, a changed file serves nothing: a status 2
        # sends a fetcher elsewhere, a block that fails its hash gets us banned.
        store.suspend()
        try:
            after = store.reverify(now, progress)
        except DataError as exc:
            if seen != now or before:  # else said already, when it stopped being served
                log.warning("%s; no longer serving its blocks", exc)
            after = 0
        else:
            if seen == now and after == before:
                return  # woken for nothing: the file is as verified (no line, no change to announce)
            if seen is not None and now is not None and seen[:2] != now[:2]:
                what = "was replaced"
            elif seen is not None and now is not None and seen[2] != now[2]:
                what = f"changed size ({seen[2]} -> {now[2]} bytes)"
            elif seen is None:
                what = "is back"
            else:
                what = "was modified"
            lost = f"; {before - after} no longer match and are not served" if after < before else ""
            gone = ", not announced any more" if after == 0 and count else ""
            log.warning("%s: data file %s; %d/%d blocks verified%s%s", store.path, what, after, count, lost, gone)
        if self._on_change is not None:
            self._on_change(store, before, after)
