"""The ``.cascade`` metadata format (PROTOCOL.md section 1), as values.

Pure code: bytes in, a :class:`CascadeFile` out, and back. The only file I/O
is :func:`read_cascade`, which reads a ``.cascade`` into bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cascade.errors import MetafileError
from cascade.wire import HASH_SIZE as HASH_SIZE  # defined once, for every hash of PROTOCOL.md; re-exported

MAGIC = b"CASCADE1"
HEADER_SIZE = 64
SUFFIX = ".cascade"
_HEADER = struct.Struct(">8s8sQQ32s")

# Limits that reject absurd files before we allocate for them. They are far
# above any real use: a 1 GiB block must be held in memory to be verified, and
# 2**24 blocks make a 512 MiB .cascade file.
MAX_BLOCK_SIZE = 1 << 30
MAX_BLOCK_COUNT = 1 << 24
MAX_DATA_LENGTH = 1 << 50
MAX_METAFILE_SIZE = HEADER_SIZE + HASH_SIZE * MAX_BLOCK_COUNT

# A collection file (cascade.collection, docs/collection-format.md) starts with this magic
# and is at most this large. Both live here so that a reader tells the two kinds of metafile
# apart without importing the collection code: every fetcher of a swarm pays for its imports
# at start-up, all at once on a small machine (BENCHMARKS.md).
COLLECTION_MAGIC = b"CASCCOLL"
MAX_COLLECTION_SIZE = 1 << 30


def looks_like_collection(head: bytes) -> bool:
    """Whether bytes starting a file are a collection's (else perhaps a ``.cascade``). Raises nothing."""
    return head[: len(COLLECTION_MAGIC)] == COLLECTION_MAGIC


def block_count_for(data_length: int, block_size: int) -> int:
    """Number of blocks ``ceil(data_length / block_size)``; 0 for an empty file."""
    return -(-data_length // block_size)


@dataclass(frozen=True, slots=True)
class CascadeFile:
    """A parsed ``.cascade`` file.

    ``block_hashes`` is the raw concatenation of the 32-byte block hashes, kept
    as one ``bytes`` so a million-block file costs one object, not a million.
    ``raw`` is the file's exact bytes; the cascade hash is their SHA-256,
    computed once here because servers look it up on every request.
    """

    data_length: int
    block_size: int
    file_hash: bytes
    block_hashes: bytes
    raw: bytes
    _cascade_hash: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cascade_hash", hashlib.sha256(self.raw).digest())

    @property
    def block_count(self) -> int:
        return len(self.block_hashes) // HASH_SIZE

    @property
    def cascade_hash(self) -> bytes:
        """SHA-256 of the ``.cascade`` file's bytes: the name of the file on the wire."""
        return self._cascade_hash

    @property
    def last_block_length(self) -> int:
        if self.block_count == 0:
            return 0
        return self.data_length - (self.block_count - 1) * self.block_size

    def block_hash(self, index: int) -> bytes:
        """The expected SHA-256 of block ``index``; raises ``IndexError`` past the end."""
        if not 0 <= index < self.block_count:
            raise IndexError(f"block {index} out of range 0..{self.block_count - 1}")
        start = index * HASH_SIZE
        return self.block_hashes[start : start + HASH_SIZE]

    def block_offset(self, index: int) -> int:
        return index * self.block_size

    def block_length(self, index: int) -> int:
        """Length in bytes of block ``index``; raises ``IndexError`` past the end."""
        if not 0 <= index < self.block_count:
            raise IndexError(f"block {index} out of range 0..{self.block_count - 1}")
        return min(self.block_size, self.data_length - index * self.block_size)


def parse_cascade(data: bytes, source: str | Callable[[], str] = "<bytes>") -> CascadeFile:
    """Parse and validate the bytes of a ``.cascade`` file.

    ``source`` names the file in messages, or makes the name when one is needed
    (a collection parses thousands of members, and a name each costs).
    Raises :class:`MetafileError` naming ``source`` and what is wrong.
    """
    fields = _header_fields(data)
    if isinstance(fields, str):
        raise MetafileError(f"{source if isinstance(source, str) else source()}: {fields}")
    length, block_size, file_hash = fields
    return CascadeFile(
        data_length=length,
        block_size=block_size,
        file_hash=file_hash,
        block_hashes=bytes(data[HEADER_SIZE:]),
        raw=bytes(data),
    )


def _header_fields(data: bytes) -> tuple[int, int, bytes] | str:
    """(data length, block size, whole-file hash) of a valid ``.cascade``, else what is wrong with it."""
    if len(data) < HEADER_SIZE:
        return f"too short to be a .cascade file ({len(data)} bytes, the header alone is {HEADER_SIZE})"
    magic, _reserved, length, block_size, file_hash = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return f"not a .cascade file (magic is {magic!r}, expected {MAGIC!r})"
    if block_size == 0:
        return "block size is 0"
    if block_size > MAX_BLOCK_SIZE:
        return f"block size {block_size} exceeds the limit of {MAX_BLOCK_SIZE} bytes"
    if length > MAX_DATA_LENGTH:
        return f"data length {length} exceeds the limit of {MAX_DATA_LENGTH} bytes"
    count = block_count_for(length, block_size)
    if count > MAX_BLOCK_COUNT:
        return f"{count} blocks exceed the limit of {MAX_BLOCK_COUNT}"
    hash_bytes = len(data) - HEADER_SIZE
    if hash_bytes != count * HASH_SIZE:
        have = f"{hash_bytes // HASH_SIZE} hashes" if hash_bytes % HASH_SIZE == 0 else f"{hash_bytes} bytes of hashes"
        return f"expected {count} block hashes for {length} bytes in blocks of {block_size}, found {have}"
    return length, block_size, file_hash


def encode_cascade(data_length: int, block_size: int, file_hash: bytes, block_hashes: bytes) -> bytes:
    """The bytes of a ``.cascade`` file; raises :class:`MetafileError` on inconsistent values."""
    if block_size <= 0 or block_size > MAX_BLOCK_SIZE:
        raise MetafileError(f"block size must be between 1 and {MAX_BLOCK_SIZE}, not {block_size}")
    if not 0 <= data_length <= MAX_DATA_LENGTH:
        raise MetafileError(f"data length must be between 0 and {MAX_DATA_LENGTH}, not {data_length}")
    if len(file_hash) != HASH_SIZE:
        raise MetafileError(f"whole-file hash must be {HASH_SIZE} bytes, not {len(file_hash)}")
    count = block_count_for(data_length, block_size)
    if len(block_hashes) != count * HASH_SIZE:
        raise MetafileError(f"expected {count} block hashes, got {len(block_hashes) / HASH_SIZE:g}")
    return _HEADER.pack(MAGIC, bytes(8), data_length, block_size, file_hash) + block_hashes


_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)
_O_BINARY: int = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


def read_metafile_bytes(path: str | os.PathLike[str], limit: Callable[[bytes], int], kinds: str) -> bytes:
    """The whole of a small metafile, refused before it is read when larger than ``limit(first 8 bytes)``.

    ``kinds`` names what it may be in the refusal (".cascade", ".cascade or collection").
    Every failure is a :class:`MetafileError`, one line.
    """
    p = Path(path)
    try:
        # O_NONBLOCK: a FIFO given as the file must not wait forever for a writer (and
        # keep SIGTERM from ending the wait); it is refused just after, as not regular.
        fd = os.open(p, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC | _O_BINARY)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise MetafileError(f"{p}: not a regular file")
            head = f.read(8)
            most = limit(head)
            # Checked before reading on, so a huge file is refused without allocating for it
            # (and again after: it may have grown meanwhile).
            if st.st_size > most:
                raise MetafileError(f"{p}: larger than any valid {kinds} file ({most} bytes)")
            data = head + f.read(most + 1 - len(head))
    except FileNotFoundError as exc:
        raise MetafileError(f"{p}: no such file") from exc
    except IsADirectoryError as exc:
        raise MetafileError(f"{p}: is a directory, not a .cascade file") from exc
    except OSError as exc:
        raise MetafileError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > most:
        raise MetafileError(f"{p}: larger than any valid {kinds} file ({most} bytes)")
    return data


def read_cascade(path: str | os.PathLike[str]) -> CascadeFile:
    """Read and parse a ``.cascade`` file; every failure is a :class:`MetafileError`."""
    return parse_cascade(read_metafile_bytes(path, lambda head: MAX_METAFILE_SIZE, ".cascade"), os.fspath(path))


def default_data_path(cascade_path: str | os.PathLike[str]) -> Path:
    """The conventional data path: ``NAME`` beside ``NAME.cascade``; ``FILE.data`` for any other name.

    A file named ``..cascade`` or ``...cascade`` (a stranger's choice) would make
    ``NAME`` the folder itself or its parent, where a fetch would write: such a
    ``NAME`` is not taken. Raises nothing.
    """
    p = Path(cascade_path)
    name = p.name[: -len(SUFFIX)] if has_cascade_suffix(p.name) else ""
    return p.with_name(name if name not in ("", ".", "..") else p.name + ".data")


# Windows and macOS (by default) compare file names without regard to case, so
# there ``NAME.CASCADE`` is as much a .cascade file as ``NAME.cascade``.
_CASELESS_NAMES = sys.platform in ("win32", "darwin")


def has_cascade_suffix(name: str, caseless: bool = _CASELESS_NAMES) -> bool:
    """Whether the file name ``name`` ends in ``.cascade``, compared as this OS compares names."""
    return (name.lower() if caseless else name).endswith(SUFFIX)


def default_cascade_path(data_path: str | os.PathLike[str]) -> Path:
    """The conventional ``.cascade`` path for a data file: ``NAME.cascade``."""
    p = Path(data_path)
    return p.with_name(p.name + SUFFIX)
