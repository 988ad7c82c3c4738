"""The whole-file SHA-256 of a download, computed in the background over the verified prefix as it grows."""

from __future__ import annotations

import errno
import hashlib
import logging
import threading

from peer.clock import REAL_CLOCK, Clock
from peer.storage import BlockStore

log = logging.getLogger("peer.fetch")

# Bytes re-read per step (arbitrary: large enough that syscalls vanish, the same as localdata's chunks).
CHUNK = 4 << 20


class PrefixHasher:
    """Hashes blocks ``0..next-1`` as soon as they are all verified, on its own thread.

    SHA-256 is sequential, so it can only advance while block ``next`` is
    verified; it re-reads those blocks from the page cache in chunks. At the
    end only the part behind the last gap is left to hash.

    When it has caught up it sleeps until ``batch`` more blocks are verified
    (about one chunk): the shell sets ``progress`` once ``store.verified_count``
    reaches ``wake_at`` (one comparison per block), rather than waking it for
    every block: with small blocks, per-block thread hand-offs cost more than
    the hashing.
    """

    def __init__(self, store: BlockStore, clock: Clock = REAL_CLOCK) -> None:
        self.store = store
        self.clock = clock
        self.progress = threading.Event()
        self.wake_at = 0
        self.batch = max(1, min(CHUNK // max(store.cf.block_size, 1), 64))
        self.stop = threading.Event()
        self.sha = hashlib.sha256()
        self.next = 0
        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, name="prefix-hash", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def block_verified(self) -> None:
        """A block was verified (cheap: called once per block)."""
        if self.store.verified_count >= self.wake_at:
            self.progress.set()

    def _advance(self, buf: bytearray) -> bool:
        """Hash the verified blocks from ``next`` on; False when none was ready. Raises ``OSError``."""
        store, cf = self.store, self.store.cf
        valid, count, bs = store.valid, cf.block_count, cf.block_size
        per_chunk = max(1, len(buf) // bs)
        mv = memoryview(buf)
        moved = False
        while self.next < count and valid[self.next]:
            end = self.next + 1
            while end < count and end - self.next < per_chunk and valid[end]:
                end += 1
            offset = self.next * bs
            stop = min(end * bs, cf.data_length)
            while offset < stop:  # blocks larger than the buffer are read in pieces
                view = mv[: min(len(buf), stop - offset)]
                if store.pfile.readinto(view, offset) < len(view):
                    raise OSError(errno.EIO, "the data file is shorter than expected")
                self.sha.update(view)
                offset += len(view)
            self.next = end
            moved = True
        return moved

    def _run(self) -> None:
        buf = bytearray(CHUNK)
        try:
            store, progress = self.store, self.progress
            while not self.stop.is_set() and self.next < store.cf.block_count:
                if not self._advance(buf):
                    # Clear first: a block verified from here on sets the event again.
                    progress.clear()
                    self.wake_at = min(store.verified_count + self.batch, store.cf.block_count)
                    if not self._advance(buf):
                        # No timeout: block_verified, abandon and finish all set the event, and
                        # with a virtual clock a polling wait would move the time on by itself.
                        self.clock.wait(progress, None)
        except OSError as exc:
            self.error = exc

    def abandon(self) -> None:
        """Stop hashing (the download failed); the thread ends soon."""
        self.stop.set()
        self.progress.set()

    def finish(self) -> bytes:
        """Join the thread, hash what is left and return the digest; raises ``OSError``."""
        behind = self.store.cf.block_count - self.next
        self.abandon()
        if self.thread.is_alive():
            self.thread.join()
        log.debug("whole-file hash: %d blocks behind when the last block arrived", behind)
        if self.error is not None:
            raise self.error
        self._advance(bytearray(CHUNK))
        if self.next < self.store.cf.block_count:
            raise OSError(errno.EIO, "finish() called before every block was verified")
        return self.sha.digest()
