"""Hashing data files: build a ``.cascade`` and check which blocks are present.

This is the one place in ``cascade/`` that reads data files. It reads with
positional reads (:class:`oscompat.fileio.PositionalFile`) in chunks of whole
blocks, so memory stays bounded by the chunks in flight, and hashes the chunks
on a small thread pool: ``hashlib`` releases the GIL, so block hashing runs on
every core. The whole-file SHA-256 is inherently sequential; it is fed in order
from the same chunks while the pool hashes blocks, so the file is read once.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cascade.errors import DataError, UsageError, from_os_error
from cascade.metafile import (
    HASH_SIZE,
    MAX_BLOCK_COUNT,
    MAX_BLOCK_SIZE,
    MAX_DATA_LENGTH,
    CascadeFile,
    block_count_for,
    encode_cascade,
)
from oscompat import detect
from oscompat.fileio import PositionalFile

if TYPE_CHECKING:
    from concurrent.futures import Future

# About 4 MiB per read: large enough that syscall and pool overhead vanish,
# small enough that memory stays bounded (chunks in flight = 2 x workers).
CHUNK_TARGET = 4 << 20
# A cap on the bytes read but not yet consumed, so blocks far larger than
# CHUNK_TARGET (a chunk is at least one block) do not multiply memory use.
MAX_IN_FLIGHT = 64 << 20

Progress = Callable[[int], None]

# Windows opens files in text mode unless told otherwise; 0 elsewhere.
_O_BINARY: int = getattr(os, "O_BINARY", 0)


def default_workers(main_thread_hashes: bool = False) -> int:
    """Pool size: one per core, less the core the calling thread uses when it
    feeds the sequential whole-file hash (measured: 2 workers plus the main
    thread on 2 cores made verify ~20 % slower than 1 worker)."""
    cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1 if main_thread_hashes else cores))


def _chunk_size(block_size: int) -> int:
    return max(1, CHUNK_TARGET // block_size) * block_size


def _hash_chunk(src: PositionalFile, offset: int, buf: memoryview, block_size: int) -> tuple[int, bytes]:
    """Read ``len(buf)`` bytes at ``offset`` into ``buf``; return (bytes read, concatenated block digests).

    A short read (file shorter than expected) hashes what is there; the caller
    decides what a missing tail means. Reading into a reused buffer, rather
    than ``os.pread`` returning fresh bytes, spares the page faults and unmaps
    of a new multi-MiB allocation per chunk, which cost about a third of the
    hashing time when threads run side by side.
    """
    n = src.readinto(buf, offset)
    data = buf[:n]
    sha = hashlib.sha256
    return n, b"".join(sha(data[i : i + block_size]).digest() for i in range(0, n, block_size))


def _chunks(fd: int, length: int, block_size: int, workers: int) -> Iterator[tuple[int, memoryview, bytes]]:
    """Yield (offset, bytes, digests) for each chunk in file order, hashing ahead on a pool.

    The bytes are a view of a reused buffer: valid only until the next item is
    requested. At most ``limit`` chunks are in flight plus the one lent out.
    """
    # Never larger than the file: a 1 GiB block size on a small file must not allocate 1 GiB.
    chunk = min(_chunk_size(block_size), max(1, length))
    src = PositionalFile(fd, detect())  # the pool's threads share the descriptor
    if length <= chunk:
        # One chunk: hash it here. A pool per small file would cost a thread start
        # per file, which dominates a collection of thousands of small files.
        if length:
            whole = memoryview(bytearray(length))
            n, digests = _hash_chunk(src, 0, whole, block_size)
            yield 0, whole[:n], digests
        return
    limit = max(1, min(2 * workers, MAX_IN_FLIGHT // chunk))
    free: list[bytearray] = []
    pending: deque[tuple[int, bytearray, Future[tuple[int, bytes]]]] = deque()
    # Imported here: a fetch checks its file this way only when it resumes one larger than a chunk.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
        try:
            offsets = iter(range(0, length, chunk))
            while True:
                for off in offsets:
                    buf = free.pop() if free else bytearray(chunk)
                    view = memoryview(buf)[: min(chunk, length - off)]
                    pending.append((off, buf, pool.submit(_hash_chunk, src, off, view, block_size)))
                    if len(pending) >= limit:
                        break
                if not pending:
                    return
                off, buf, fut = pending.popleft()
                n, digests = fut.result()
                yield off, memoryview(buf)[:n], digests
                free.append(buf)
        finally:
            for _, _, fut in pending:
                fut.cancel()


def _open(path: Path) -> int:
    """Open a regular file for reading; anything else is a :class:`DataError`.

    The type is checked before opening: on Linux ``open`` succeeds on a
    directory, and on a FIFO it would block until a writer appears.
    """
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise DataError(f"{path}: is a directory, not a data file")
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: not a regular file")
        return os.open(path, os.O_RDONLY | _O_BINARY)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such data file") from exc
    except OSError as exc:
        raise from_os_error(exc, path, "read") from exc


def create_metafile(
    path: str | os.PathLike[str],
    block_size: int,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
    fd: int | None = None,
) -> bytes:
    """Hash a data file and return the bytes of its ``.cascade`` file.

    With ``fd`` (a regular file open for reading, left open) the file is read
    from it and ``path`` only names it in messages. Raises :class:`UsageError`
    for a block size outside 1..MAX_BLOCK_SIZE and :class:`DataError` when the
    file cannot be read or changes size.
    """
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise UsageError(f"block size must be between 1 byte and {MAX_BLOCK_SIZE // (1 << 20)} MiB, not {block_size}")
    p = Path(path)
    owned = fd is None
    if fd is None:
        fd = _open(p)
    try:
        try:
            length = os.fstat(fd).st_size
            if length > MAX_DATA_LENGTH:
                raise DataError(f"{p}: {length} bytes exceed the limit of {MAX_DATA_LENGTH}")
            if block_count_for(length, block_size) > MAX_BLOCK_COUNT:
                raise DataError(
                    f"{p}: {length} bytes in blocks of {block_size} would need more than {MAX_BLOCK_COUNT} blocks;"
                    " use a larger block size"
                )
            whole = hashlib.sha256()
            hashes = bytearray()
            pool = workers or default_workers(main_thread_hashes=True)
            for _off, data, digests in _chunks(fd, length, block_size, pool):
                whole.update(data)
                hashes += digests
                if progress:
                    progress(len(data))
            if len(hashes) != block_count_for(length, block_size) * HASH_SIZE:
                raise DataError(f"{p}: the file changed size while it was being read")
        except OSError as exc:
            raise from_os_error(exc, p, "read") from exc
    finally:
        if owned:
            os.close(fd)
    return encode_cascade(length, block_size, whole.digest(), bytes(hashes))


@dataclass(frozen=True, slots=True)
class DataCheck:
    """What a data file holds of a ``.cascade``.

    ``valid`` has one byte per block, 1 where the block is present and valid.
    ``file_hash_ok`` is ``None`` when the whole-file hash was not computed.
    """

    valid: bytearray
    valid_count: int
    size: int
    file_hash_ok: bool | None

    @property
    def complete(self) -> bool:
        return self.valid_count == len(self.valid) and self.file_hash_ok is not False

    def missing(self) -> list[int]:
        return [i for i, v in enumerate(self.valid) if not v]


def check_data(
    path: str | os.PathLike[str],
    cf: CascadeFile,
    *,
    whole_file: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
    fd: int | None = None,
) -> DataCheck:
    """Check which blocks of ``cf`` the data file at ``path`` holds.

    A missing file holds no blocks. With ``whole_file`` the whole-file SHA-256
    is checked too (only when every block is valid and the size is exact).
    With ``fd`` (a regular file open for reading, left open) the file is read
    from it and ``path`` only names it in messages. Raises :class:`DataError`
    when the file exists but cannot be read.
    """
    p = Path(path)
    count = cf.block_count
    valid = bytearray(count)
    owned = fd is None
    if fd is None:
        if not p.exists():
            return DataCheck(valid, 0, 0, False if whole_file else None)
        fd = _open(p)
    try:
        try:
            size = os.fstat(fd).st_size
            readable = min(size, cf.data_length)
            whole = hashlib.sha256() if whole_file and size == cf.data_length else None
            expected = cf.block_hashes
            bs = cf.block_size
            pool = workers or default_workers(main_thread_hashes=whole is not None)
            for off, data, digests in _chunks(fd, readable, bs, pool):
                first = off // bs
                k = len(digests) // HASH_SIZE
                last = first + k - 1
                # Fast path, one comparison per chunk: every block of it matches. Only the
                # last block of a chunk can be short, so only its length needs checking.
                if (
                    k > 0
                    and last < count
                    and digests == expected[first * HASH_SIZE : (last + 1) * HASH_SIZE]
                    and len(data) - (k - 1) * bs == cf.block_length(last)
                ):
                    valid[first : last + 1] = b"\x01" * k
                else:
                    for j in range(k):
                        i = first + j
                        # A block cut short by the end of the file is not present.
                        if (
                            i < count
                            and digests[j * HASH_SIZE : (j + 1) * HASH_SIZE]
                            == expected[i * HASH_SIZE : (i + 1) * HASH_SIZE]
                            and min(len(data) - j * bs, bs) == cf.block_length(i)
                        ):
                            valid[i] = 1
                    whole = None  # a bad block already decides the whole-file check
                if whole is not None:
                    whole.update(data)
                if progress:
                    progress(len(data))
        except OSError as exc:
            raise from_os_error(exc, p, "read") from exc
    finally:
        if owned:
            os.close(fd)
    n = valid.count(1)
    file_ok: bool | None = None
    if whole_file:
        file_ok = whole is not None and n == count and whole.digest() == cf.file_hash
    return DataCheck(valid, n, size, file_ok)
