"""Uploaded ``.cascade`` files, kept on disk under their cascade hash.

A collection (docs/collection-format.md) is stored the same way, under its
collection hash (the SHA-256 of its bytes, as for a ``.cascade``).

Layout of the storage folder (nothing else is ever written, and every path
is built from a hash in hex, never from a client's text)::

    <folder>/<64 hex>.cascade   the file's exact bytes
    <folder>/<64 hex>.name      the data file's name, UTF-8, when the uploader gave one

With ``tracker run --state PATH`` the folder is ``PATH.cascades`` and survives
a restart; without it a temporary folder is used and removed by :meth:`close`.
Writes go to a temporary file in the same folder and are renamed into place,
so a crash never leaves half a file under a real name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cascade.collection import looks_like_collection, parse_collection
from cascade.errors import BadRequest, MetafileError, ProtocolError
from cascade.errors import StoreFull as StoreFull  # its old home; the class lives in the tree
from cascade.metafile import block_count_for, parse_cascade
from cascade.wire import parse_hex_hash

log = logging.getLogger(__name__)

# Arbitrary: 16 MiB holds 500,000 block hashes (500 GB in 1 MiB blocks). A
# request body is held in memory while it is checked, so this bounds memory too.
DEFAULT_MAX_FILE_SIZE = 16 << 20
# Arbitrary: what all stored files may take on disk together.
DEFAULT_MAX_TOTAL_SIZE = 1 << 30
MAX_NAME_BYTES = 255  # the usual file-name limit of Linux file systems
_SUFFIX = ".cascade"
_NAME_SUFFIX = ".name"


@dataclass(frozen=True, slots=True)
class StoredCascade:
    """What the store knows about one file (its bytes stay on disk)."""

    cascade_hash: bytes
    name: str | None  # the data file's name, if an uploader gave one
    size: int  # bytes of the .cascade file
    data_length: int
    block_size: int
    block_count: int
    stored_at: float  # UNIX seconds
    # A collection (docs/collection-format.md): how many members; 0 for a plain .cascade.
    # A collection's block_size is 0 (each member has its own) and block_count their sum.
    members: int = 0


@dataclass(frozen=True, slots=True)
class Upload:
    """What an uploaded file describes: a ``.cascade``, or a collection named by its collection hash."""

    cascade_hash: bytes
    data_length: int
    block_size: int
    block_count: int
    member_hashes: tuple[bytes, ...]  # a collection's members' cascade hashes; () for a .cascade

    def entry(self, name: str | None, size: int, stored_at: float) -> StoredCascade:
        return StoredCascade(
            self.cascade_hash,
            name,
            size,
            self.data_length,
            self.block_size,
            self.block_count,
            stored_at,
            len(self.member_hashes),
        )


def parse_upload(data: bytes, source: str = "upload") -> Upload:
    """Parse a ``.cascade`` or a collection (told apart by the magic). Raises :class:`MetafileError`."""
    if looks_like_collection(data):
        coll = parse_collection(data, source)
        blocks = sum(block_count_for(m.data_length, m.block_size) for m in coll.members)
        hashes = tuple(m.cascade_hash for m in coll.members)
        return Upload(coll.collection_hash, coll.total_length, 0, blocks, hashes)
    cf = parse_cascade(data, source)
    return Upload(cf.cascade_hash, cf.data_length, cf.block_size, cf.block_count, ())


def check_name(name: str) -> str:
    """A data file name as given on upload; raises :class:`BadRequest` for one that could be a path."""
    if not name or name in (".", ".."):
        raise BadRequest("name must not be empty, '.' or '..'")
    if "/" in name or "\\" in name:
        raise BadRequest("name must be a file name, without '/' or '\\'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise BadRequest("name must not contain control characters")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise BadRequest(f"name is longer than {MAX_NAME_BYTES} bytes")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("name is not valid UTF-8") from None
    return name


class CascadeStore:
    """The stored ``.cascade`` files, behind one lock.

    ``folder=None`` makes a temporary folder, removed by :meth:`close`.
    Raises :class:`OSError` when the folder cannot be created.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] | None = None,
        *,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        max_total_size: int = DEFAULT_MAX_TOTAL_SIZE,
    ) -> None:
        self.max_file_size = max_file_size
        self.max_total_size = max_total_size
        self._temporary = folder is None
        if folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="cascade-tracker-files-"))
        else:
            self.folder = Path(folder)
            self.folder.mkdir(mode=0o755, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[bytes, StoredCascade] = {}
        self._total = 0
        self._load()

    def _load(self) -> None:
        """Index what an earlier run stored; skip (and log) anything that does not check out."""
        for path in sorted(self.folder.glob("*" + _SUFFIX)):
            stem = path.name[: -len(_SUFFIX)]
            try:
                cascade_hash = parse_hex_hash(stem)
                with path.open("rb") as f:
                    data = f.read(self.max_file_size + 1)
                if len(data) > self.max_file_size:
                    raise MetafileError("larger than the size cap")
                up = parse_upload(data, path.name)
                if up.cascade_hash != cascade_hash:
                    raise MetafileError("its bytes do not hash to its name")
            except (ProtocolError, OSError, MetafileError) as exc:
                log.warning("skipping stored file %s: %s", path.name, exc)
                continue
            name = self._read_name(cascade_hash)
            entry = up.entry(name, len(data), path.stat().st_mtime)
            self._entries[cascade_hash] = entry
            self._total += entry.size

    def _read_name(self, cascade_hash: bytes) -> str | None:
        try:
            raw = self._path(cascade_hash, _NAME_SUFFIX).read_bytes()[: MAX_NAME_BYTES + 1]
            return check_name(raw.decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, BadRequest) as exc:
            log.warning("ignoring the stored name of %s: %s", cascade_hash.hex()[:16], exc)
            return None

    def _path(self, cascade_hash: bytes, suffix: str) -> Path:
        return self.folder / (cascade_hash.hex() + suffix)

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # --- the interface ------------------------------------------------------

    def put(self, data: bytes, name: str | None = None) -> tuple[StoredCascade, bool]:
        """Validate and store one ``.cascade`` or collection; returns (its entry, True if it is new).

        A name is recorded when the file has none yet (the first name given
        stays). Raises :class:`MetafileError` for a malformed file,
        :class:`BadRequest` for a bad name or an oversized file,
        :class:`StoreFull` and :class:`OSError`.
        """
        if len(data) > self.max_file_size:
            raise BadRequest(f".cascade file is {len(data)} bytes, the limit is {self.max_file_size}")
        if name is not None:
            check_name(name)
        up = parse_upload(data, "upload")
        h = up.cascade_hash
        with self._lock:
            old = self._entries.get(h)
            if old is not None:
                if name is None or old.name is not None:
                    return old, False
                self._write(self._path(h, _NAME_SUFFIX), name.encode("utf-8"))
                entry = dataclasses.replace(old, name=name)
                self._entries[h] = entry
                return entry, False
            if self._total + len(data) > self.max_total_size:
                raise StoreFull(f"storage full ({self._total} of {self.max_total_size} bytes used)")
            if name is not None:
                self._write(self._path(h, _NAME_SUFFIX), name.encode("utf-8"))
            self._write(self._path(h, _SUFFIX), data)
            entry = up.entry(name, len(data), time.time())
            self._entries[h] = entry
            self._total += entry.size
            return entry, True

    def get(self, cascade_hash: bytes) -> StoredCascade | None:
        with self._lock:
            return self._entries.get(cascade_hash)

    def read(self, cascade_hash: bytes) -> bytes | None:
        """The stored bytes, or ``None`` for an unknown hash. Raises :class:`OSError`."""
        with self._lock:
            if cascade_hash not in self._entries:
                return None
        try:
            return self._path(cascade_hash, _SUFFIX).read_bytes()
        except FileNotFoundError:
            return None

    def name_of(self, cascade_hash: bytes) -> str | None:
        with self._lock:
            entry = self._entries.get(cascade_hash)
            return entry.name if entry else None

    def entries(self) -> list[StoredCascade]:
        """Every stored file, newest first."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.stored_at, reverse=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Remove a temporary folder (a ``--state`` folder stays)."""
        if self._temporary:
            shutil.rmtree(self.folder, ignore_errors=True)
