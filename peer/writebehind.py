"""Verified blocks written on a thread of their own, so a connection receives the next block meanwhile.

A connection thread receives a block, checks its SHA-256 and writes it, in
turn. Writing is the slowest of the three where the page cache is cold: on the
benchmark VM a ``pwrite`` of 1 GiB into a new file takes 2.4 s (memory the
host must hand back page by page), against 0.6 s to hash it. :class:`WriteBehind`
takes the verified block and writes it on its own thread, while the
connection goes on receiving and hashing. A block in a buffer of its own (a
connection's :class:`peer.connection.Reader` receives large bodies so) is not
copied: :meth:`WriteBehind.put` trades that buffer for one of a few free ones
(:class:`Lender`) and writes the block from it; any other block is copied into
a free one. The trade takes 1 GiB of copying off the connection thread for a
1 GiB file (BENCHMARKS.md).

What stays true: a block is marked verified in the store (so served, hashed
into the whole-file hash, counted as done) only once its bytes are written; a
block whose write is pending when the process is killed is simply not in the
``.part`` (it was never marked there), and is fetched again; a failed write
stops the download with the store's one-line error, at the next block or at
:meth:`WriteBehind.drain`. Memory: ``depth`` buffers of one block each; a
connection that gets ahead waits for a free one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from cascade.errors import CascadeError


class Target(Protocol):
    """Where verified blocks go: a file's store (peer.storage), or a collection's members (peer.collection_fetch)."""

    @property
    def valid(self) -> Sequence[int]:
        """Per block, 1 once it is verified and written."""
        ...

    def write_verified(self, index: int, data: memoryview) -> bool:
        """Write block ``index``, already checked, and mark it verified; False when a copy was first."""
        ...


class Lender(Protocol):
    """Whoever read a block into a buffer of its own and may give that buffer up (peer.connection.Reader)."""

    def trade(self, buf: bytearray) -> bytearray | None:
        """Read into ``buf`` from now on; the buffer the last block is in (None: ``buf`` is too small, no trade)."""
        ...


class WriteBehind:
    """Writes verified blocks to ``store`` on one thread; ``written`` is called after each (on that thread).

    ``block_size``: the longest block, the size of each of the ``depth`` buffers.
    """

    def __init__(self, store: Target, written: Callable[[], None], depth: int, block_size: int) -> None:
        self.store = store
        self._written = written
        size = max(1, block_size)
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(max(1, depth)):
            self._free.put(bytearray(size))
        self._todo: queue.SimpleQueue[tuple[int, bytearray, int] | None] = queue.SimpleQueue()
        # Blocks verified here or in the store: a second copy of one (the endgame) is not written twice.
        self._claimed = bytearray(store.valid)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self.error: CascadeError | None = None
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._thread.start()

    def put(self, index: int, data: memoryview, lender: Lender | None = None) -> bool:
        """Queue verified block ``index``; False when a copy was first.

        ``data`` may be reused at once: it is copied, or with ``lender`` (``data`` is the
        start of the lender's buffer) that buffer is kept and the lender given a free one
        instead. Waits for a free buffer. Raises the :class:`CascadeError` of an earlier
        failed write.
        """
        if self.error is not None:
            raise self.error
        with self._lock:
            if self._claimed[index]:
                return False
            self._claimed[index] = 1
            self._pending += 1
        buf = self._free.get()
        n = len(data)
        kept = lender.trade(buf) if lender is not None else None
        if kept is not None:
            buf = kept  # data is its start
        else:
            buf[:n] = data
        self._todo.put((index, buf, n))
        return True

    def drain(self) -> None:
        """Wait until every queued block is written; raises the error of a failed write, if any."""
        with self._idle:
            while self._pending:
                self._idle.wait()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, then stop the thread (errors stay in :attr:`error`)."""
        self._todo.put(None)
        self._thread.join()

    def _run(self) -> None:
        store = self.store
        while True:
            item = self._todo.get()
            if item is None:
                return
            index, buf, n = item
            try:
                if self.error is None and store.write_verified(index, memoryview(buf)[:n]):
                    self._written()
            except CascadeError as exc:
                self.error = exc
            finally:
                self._free.put(buf)
                with self._idle:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()
