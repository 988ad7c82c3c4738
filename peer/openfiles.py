"""The member files a block server holds open: a bounded, reference-counted LRU.

``peer seed`` of a collection serves thousands of files from one port. Holding
each open would cost a descriptor per file (a 10,000-file collection needs
more than the usual limit of 1,024), so a :class:`~peer.storage.MemberStore`
holds none: the server asks :class:`OpenFiles` for a descriptor when a request
needs one. Each handed-out :class:`OpenFile` is counted until it is released
(a ``sendfile`` to a slow reader may hold it for a while), and only files no
request holds are closed, least recently used first, when more than ``cap``
are open. So the descriptors are at most ``max(cap, responses in flight)``, plus
for an instant one per worker thread opening a file before the least recently
used one is closed: bounded by the connections, never by the number of files.

A file is opened by :meth:`MemberStore.open`, which refuses one that is not
the file verified. An open file belongs to the store's ``generation``; once the
data watcher re-verifies the store, the older descriptor is not handed out
again and is closed as soon as nobody holds it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from oscompat import Features
from oscompat.fileio import PositionalFile
from peer.storage import MemberStore


class OpenFile:
    """A member's descriptor, handed out by :meth:`OpenFiles.acquire` until :meth:`OpenFiles.release`."""

    __slots__ = ("fd", "generation", "refs", "src", "stale", "store")

    def __init__(self, store: MemberStore, fd: int, src: PositionalFile, generation: int) -> None:
        self.store = store
        self.fd = fd
        self.src = src  # for the read-and-send fallback where there is no sendfile
        self.generation = generation
        self.refs = 1
        self.stale = False  # no longer in the table: closed when the last holder releases it


class OpenFiles:
    """At most ``cap`` member files open while no request holds more; the least recently used closed first.

    Thread-safe. Raises nothing of its own: :meth:`acquire` passes on what
    :meth:`MemberStore.open` raises.
    """

    def __init__(self, cap: int, features: Features) -> None:
        if cap < 1:
            raise ValueError("the open-file cap must be at least 1")
        self.cap = cap
        self._features = features
        self._lock = threading.Lock()
        self._files: dict[MemberStore, OpenFile] = {}
        # Files nobody holds, least recently used first: the ones that may be closed.
        self._idle: OrderedDict[MemberStore, OpenFile] = OrderedDict()
        self._count = 0  # descriptors open, stale ones still held included
        self._closed = False
        # For logs, tests and the bench; updated under the lock.
        self.opened = 0
        self.peak = 0

    @property
    def open_count(self) -> int:
        """Descriptors open now (held or idle)."""
        return self._count

    def is_open(self, store: MemberStore) -> bool:
        """Whether a descriptor of ``store``'s file is in the table now (held or idle)."""
        return store in self._files

    def acquire(self, store: MemberStore) -> OpenFile:
        """A descriptor of ``store``'s file, held until :meth:`release`.

        Raises :class:`peer.storage.NotAsVerified` when the file on disk is not
        the one verified, and :class:`cascade.errors.DataError` when it cannot be opened.
        """
        with self._lock:
            f = self._files.get(store)
            if f is not None and f.generation == store.generation:
                if f.refs == 0:
                    del self._idle[store]
                f.refs += 1
                return f
            generation = store.generation
        # Opened without the lock: an open walks the path one folder at a time, and
        # other requests must not wait for it. Two threads may open the same file; one
        # of them keeps its descriptor.
        fd = store.open()
        mine = OpenFile(store, fd, PositionalFile(fd, self._features), generation)
        doomed: list[OpenFile] = []
        with self._lock:
            f = self._files.get(store)
            if f is not None and f.generation == generation and not self._closed:
                if f.refs == 0:
                    del self._idle[store]
                f.refs += 1
                doomed.append(mine)
                mine = f
            else:
                self._count += 1
                self.opened += 1
                if f is not None:  # an older generation's file: never handed out again
                    self._drop(f, doomed)
                if self._closed:
                    mine.stale = True  # the server stopped: closed on release
                else:
                    self._files[store] = mine
                while self._count > self.cap and self._idle:
                    self._drop(next(iter(self._idle.values())), doomed)
                self.peak = max(self.peak, self._count)
        self._close(doomed)
        return mine

    def release(self, f: OpenFile) -> None:
        """Give back a descriptor from :meth:`acquire`; it stays open for the next request while there is room."""
        doomed: list[OpenFile] = []
        with self._lock:
            f.refs -= 1
            if f.refs:
                return
            if f.stale or self._count > self.cap:
                self._drop(f, doomed)
            else:
                self._idle[f.store] = f
        self._close(doomed)

    def forget(self, store: MemberStore) -> None:
        """``store`` is no longer served (replaced): close its file now, or once its holders released it."""
        doomed: list[OpenFile] = []
        with self._lock:
            f = self._files.get(store)
            if f is not None:
                self._drop(f, doomed)
        self._close(doomed)

    def close(self) -> None:
        """Close every file nobody holds; the others are closed as their holders release them."""
        doomed: list[OpenFile] = []
        with self._lock:
            self._closed = True
            for f in list(self._files.values()):
                self._drop(f, doomed)
        self._close(doomed)

    def _drop(self, f: OpenFile, doomed: list[OpenFile]) -> None:
        """Take ``f`` out of the table (lock held); queue it for closing once nobody holds it."""
        if self._files.get(f.store) is f:
            del self._files[f.store]
        if self._idle.get(f.store) is f:
            del self._idle[f.store]
        f.stale = True
        if f.refs == 0:
            self._count -= 1
            doomed.append(f)

    @staticmethod
    def _close(doomed: list[OpenFile]) -> None:
        # Outside the lock: close() of a file with dirty pages or on NFS can take a while.
        for f in doomed:
            f.src.detach()
            os.close(f.fd)
