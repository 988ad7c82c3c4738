"""Local storage of one data file: which blocks are verified, and verified writes.

A :class:`BlockStore` is shared by the block server (which reads verified
blocks with ``sendfile``) and the downloader (which writes blocks only after
their SHA-256 matched). Unverified bytes never reach the data file, so after a
crash a rescan with :func:`peer.localdata.check_data` finds every block that
was ever written intact. A :class:`MemberStore` is a collection's member
seeded without a descriptor of its own: the block server opens it on demand
and checks that it is still the file that was verified.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cascade.errors import BlockHashMismatch, DataError, from_os_error
from cascade.metafile import HASH_SIZE, CascadeFile
from oscompat import Features, detect
from oscompat.fileio import PositionalFile, reserve
from peer.localdata import DataCheck, check_data

# Windows opens files in text mode unless told otherwise; 0 elsewhere.
O_BINARY: int = getattr(os, "O_BINARY", 0)


class VerifiedBlocks:
    """Which blocks of one ``.cascade`` are verified: what the block server and the data watcher share.

    ``valid`` holds one byte per block. Reads of single bytes are safe without
    the lock (the GIL makes them atomic); changes happen under ``_lock``. The
    data itself is in a :class:`BlockStore` (a file held open) or a
    :class:`MemberStore` (a collection's member, opened on demand).
    """

    # Slots: a collection has a store per member, and ``peer seed`` holds them all.
    __slots__ = ("_count", "_lock", "_path", "cascade_hash", "cf", "valid", "writable")

    def __init__(self, cf: CascadeFile, path: Path | None, valid: bytearray, writable: bool) -> None:
        self.cf = cf
        self.cascade_hash = cf.cascade_hash
        self._path = path
        self.valid = valid
        self.writable = writable
        self._count = valid.count(1)
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The data file, for messages and for reopening it."""
        assert self._path is not None  # given by every store that does not compute it
        return self._path

    def has(self, index: int) -> bool:
        return 0 <= index < len(self.valid) and self.valid[index] == 1

    @property
    def verified_count(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.cf.block_count

    def missing(self) -> list[int]:
        return [i for i, v in enumerate(self.valid) if not v]

    def disk_signature(self) -> DiskSignature | None:
        """What the data file's path looks like now: identity, size and times; ``None`` when it is gone."""
        raise NotImplementedError

    def reverify(self, seen: DiskSignature | None, progress: Callable[[int], None] | None = None) -> int:
        """Check the data file again and serve only the blocks that still match; returns the verified count.

        Raises :class:`DataError`, after marking every block absent, when the file is gone or unreadable.
        """
        raise NotImplementedError

    def as_verified(self) -> bool:
        """False when the data file can be seen not to be the one verified, though its path looks the same."""
        return True

    def suspend(self) -> None:
        """Mark every block absent (until :meth:`reverify` finds them again)."""
        self._forget_all()

    def _forget_all(self) -> None:
        with self._lock:
            self.valid[:] = bytes(len(self.valid))
            self._count = 0

    def close(self) -> None:
        """Close what the store holds open (nothing for a :class:`MemberStore`)."""


class BlockStore(VerifiedBlocks):
    """One ``.cascade``'s data file on disk, held open, with a map of its verified blocks."""

    def __init__(
        self,
        cf: CascadeFile,
        path: Path,
        fileobj: io.FileIO,
        valid: bytearray,
        writable: bool,
        features: Features | None = None,
    ) -> None:
        super().__init__(cf, path, valid, writable)
        self.file = fileobj
        self.fd = fileobj.fileno()
        # Positional reads and writes: pread/pwrite, or seek+read/write under its lock (oscompat.fileio).
        self.features = features or detect()
        self.pfile = PositionalFile(self.fd, self.features, writable)
        # For write_block, which runs once per block: no property calls on the hot path.
        self._hashes = cf.block_hashes
        self._block_size = cf.block_size
        self._block_count = cf.block_count
        self._data_length = cf.data_length

    # --- opening -----------------------------------------------------------

    @classmethod
    def open_for_seeding(
        cls, cf: CascadeFile, path: str | os.PathLike[str], check: DataCheck | None = None
    ) -> BlockStore:
        """Open an existing data file read-only, serving only blocks that verify.

        Raises :class:`DataError` when the file is missing or unreadable.
        """
        p = Path(path)
        if check is None:
            if not p.is_file():
                raise DataError(f"{p}: no such data file")
            check = check_data(p, cf, whole_file=False)
        try:
            f = open(p, "rb", buffering=0)  # noqa: SIM115 - owned by the store, closed in close()
        except OSError as exc:
            raise from_os_error(exc, p, "open the data file") from exc
        return cls(cf, p, f, check.valid, writable=False)

    @classmethod
    def open_for_fetching(cls, cf: CascadeFile, path: str | os.PathLike[str], check: DataCheck) -> BlockStore:
        """Open (or create) the data file for writing verified blocks.

        ``check`` is what the file already holds (see :func:`check_data`). The
        file is extended to its full length up front, so a full disk is found
        before the download starts, not in the middle of it.
        """
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        except OSError as exc:
            raise from_os_error(exc, p, "open the output file") from exc
        f = os.fdopen(fd, "r+b", buffering=0)
        features = detect()
        try:
            size = os.fstat(fd).st_size
            if size < cf.data_length:
                reserve(fd, p, cf.data_length, features)
        except OSError as exc:
            f.close()
            raise from_os_error(exc, p, "reserve space for the output file") from exc
        assert isinstance(f, io.FileIO)
        return cls(cf, p, f, bytearray(check.valid), writable=True, features=features)

    # --- writing -----------------------------------------------------------

    def write_block(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Verify ``data`` as block ``index`` and write it at its offset.

        Returns False when the block was already present (nothing written).
        Raises :class:`BlockHashMismatch` (nothing written) or :class:`DataError`.
        """
        if not 0 <= index < self._block_count:
            raise IndexError(f"block {index} out of range 0..{self._block_count - 1}")
        expected = min(self._block_size, self._data_length - index * self._block_size)
        size = len(data)
        if size != expected:
            raise BlockHashMismatch(f"block {index} is {size} bytes, expected {expected}")
        if self.valid[index]:
            return False
        return self.write_sized_block(index, data)

    def write_sized_block(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """:meth:`write_block` for a caller that checked the index and length and that the block is missing.

        The downloader's path: it checks those once, where the response header
        arrives. Returns False when another copy was marked verified meanwhile.
        Raises :class:`BlockHashMismatch` (nothing written) or :class:`DataError`.
        """
        self.check_block(index, data)
        return self.write_verified(index, data)

    def check_block(self, index: int, data: bytes | bytearray | memoryview) -> None:
        """Raise :class:`BlockHashMismatch` unless ``data`` is block ``index`` by its SHA-256."""
        start = index * HASH_SIZE
        if hashlib.sha256(data).digest() != self._hashes[start : start + HASH_SIZE]:
            raise BlockHashMismatch(f"block {index} does not match its SHA-256")

    def write_verified(self, index: int, data: bytes | bytearray | memoryview) -> bool:
        """Write block ``index``, already checked (:meth:`check_block`), and mark it verified once written.

        Returns False when another copy was marked verified meanwhile. Raises :class:`DataError`.
        """
        try:
            self.pfile.write_all(data, index * self._block_size)
        except OSError as exc:
            raise from_os_error(exc, self.path, f"write block {index}") from exc
        with self._lock:
            if self.valid[index]:
                return False
            self.valid[index] = 1
            self._count += 1
        return True

    def fix_length(self) -> None:
        """Make the data file exactly as long as the ``.cascade`` says (a reused file may be longer).

        Raises :class:`DataError`.
        """
        try:
            if os.fstat(self.fd).st_size != self._data_length:
                os.ftruncate(self.fd, self._data_length)
        except OSError as exc:
            raise from_os_error(exc, self.path, "finish the output file") from exc

    def move_to(self, dest: Path) -> None:
        """Rename the data file to ``dest`` (atomically, replacing it), keeping it open.

        The block server goes on serving from the same file descriptor: on
        POSIX an open file can be renamed. Where it cannot (Windows, and forced
        portable mode, which tests that path) the file is closed, renamed and
        reopened: requests in that instant fail and are retried by the client,
        and the block server must be given the store again
        (:meth:`BlockServer.add_store`) for its new descriptor. Raises :class:`DataError`.
        """
        if self.features.rename_open:
            try:
                os.replace(self.path, dest)
            except OSError as exc:
                raise from_os_error(exc, dest, f"rename {self.path.name} to {dest.name}") from exc
            self._path = dest
            return
        with self._lock:
            self.pfile.detach()
            self.file.close()
            try:
                os.replace(self.path, dest)
                self._path = dest
            except OSError as exc:
                error: OSError | None = exc
            else:
                error = None
            try:
                f = open(self.path, "r+b" if self.writable else "rb", buffering=0)  # noqa: SIM115 - owned, closed in close()
            except OSError as exc:
                raise from_os_error(exc, self.path, "reopen the data file") from exc
            self.file, self.fd = f, f.fileno()
            self.pfile = PositionalFile(self.fd, self.features, self.writable)
        if error is not None:
            raise from_os_error(error, dest, f"rename {self.path.name} to {dest.name}") from error

    def close(self) -> None:
        self.file.close()

    # --- noticing changes on disk (peer seed) --------------------------------

    def disk_signature(self) -> DiskSignature | None:
        """What the data file's path looks like now: identity, size and times; ``None`` when it is gone."""
        return disk_signature(self.path)

    def reverify(self, seen: DiskSignature | None, progress: Callable[[int], None] | None = None) -> int:
        """Check the data file again and serve only the blocks that still match; returns the verified count.

        ``seen`` is :meth:`disk_signature` taken before the call, so a change
        made while this runs is noticed on the next look. A file replaced by a
        new one (a rename over the path) is served from the new file from now
        on; the descriptor number stays the same (``dup2``), so a ``sendfile``
        already under way finishes on the old file. Raises :class:`DataError`,
        after marking every block absent, when the file is gone or unreadable.
        """
        if seen is None:
            self._forget_all()
            raise DataError(f"{self.path}: the data file is gone")
        replacement = -1
        try:
            try:
                current = os.fstat(self.fd)
                if (current.st_dev, current.st_ino) != seen[:2]:
                    # Open it before hashing, and check below that the path still names what we hashed.
                    replacement = os.open(self.path, os.O_RDONLY | O_BINARY)
                    opened = os.fstat(replacement)
                    if (opened.st_dev, opened.st_ino) != seen[:2]:
                        return self._count  # replaced again meanwhile: the next look sees it
            except OSError as exc:
                self._forget_all()
                raise from_os_error(exc, self.path, "read the data file") from exc
            try:
                check = check_data(self.path, self.cf, whole_file=False, progress=progress)
            except DataError:
                self._forget_all()
                raise
            if replacement >= 0 and (self.disk_signature() or (0, 0))[:2] != seen[:2]:
                return self._count
            with self._lock:
                if self.file.closed:  # closed meanwhile: its descriptor number may belong to another file now
                    return 0
                if replacement >= 0:
                    os.dup2(replacement, self.fd)
                self.valid[:] = check.valid
                self._count = check.valid_count
            return self._count
        finally:
            if replacement >= 0:
                os.close(replacement)


class NotAsVerified(DataError):
    """A member's file on disk is no longer the one that was verified (changed, replaced, gone, or a link now)."""


class MemberFolder(Protocol):
    """Where a :class:`MemberStore`'s file lives: a collection's folder, held open while it is seeded."""

    # The folder, as shown in messages.
    path: Path

    def open_member(self, path: str) -> int:
        """Open member ``path`` following no symlink; raises :class:`DataError` (a link, missing, unreadable)."""
        ...

    def look(self, path: str) -> DiskSignature | None:
        """Member ``path``'s signature now (its last component not followed); ``None`` when it is gone."""
        ...


class MemberStore(VerifiedBlocks):
    """A collection member served by ``peer seed`` without a descriptor of its own.

    A 10,000-file collection must not need 10,000 open files: the block server
    opens a member when a request needs it (:meth:`open`, through its bounded
    :class:`peer.openfiles.OpenFiles`) and closes it when others need the room.
    ``folder`` opens member ``member`` relative to the collection's folder, held
    open, following no symlink on the way (:func:`peer.collection_local.open_member`),
    and gives its path's :data:`DiskSignature` for the data watcher. Each
    opening is checked against ``verified``, the signature of the file as it
    was when hashed, so a file changed or replaced while it was closed is never
    served under the old hash: :meth:`open` refuses it and the watcher
    re-verifies it (:meth:`reverify`), which moves ``generation`` on so that
    descriptors opened before are not used again. A fetch of a collection serves the
    members it wrote the same way (``fetched``).
    """

    __slots__ = ("_folder", "_member", "generation", "verified")

    def __init__(
        self,
        cf: CascadeFile,
        valid: bytearray,
        folder: MemberFolder,
        member: str,
        verified: DiskSignature,
        fetched: bool = False,
    ) -> None:
        # A member a fetch wrote (``fetched``) is never super-seeded from, complete or not:
        # peer.server offers only from read-only files that ``peer seed`` serves.
        super().__init__(cf, None, valid, writable=fetched)
        self._folder = folder
        self._member = member
        self.verified = verified
        self.generation = 0

    @property
    def path(self) -> Path:
        """The member's path under its folder (made when a message needs it: not one Path per member)."""
        return self._folder.path / self._member

    def open(self) -> int:
        """Open the data file and check it is the one verified; returns a descriptor the caller closes.

        Raises :class:`NotAsVerified` when the file changed, was replaced, is
        gone or reached through a link, and :class:`DataError` for any other
        failure (out of descriptors, say), which says nothing about the file.
        """
        expected = self.verified
        try:
            fd = self._folder.open_member(self._member)
        except DataError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno not in _GONE_ERRNOS:
                raise  # EMFILE, EIO, ...: nothing is known about the file itself
            raise NotAsVerified(str(exc)) from exc
        try:
            now = signature_of(os.fstat(fd))
        except OSError as exc:
            os.close(fd)
            raise from_os_error(exc, self.path, "read the data file") from exc
        if now != expected:
            os.close(fd)
            raise NotAsVerified(f"{self.path}: changed since it was verified")
        return fd

    def placed(self, seen: DiskSignature) -> None:
        """The member was just written whole and verified, and ``seen`` is its file's signature: serve it all.

        For a member a fetch registered before downloading it (no block, no signature yet).
        """
        with self._lock:
            self.verified = seen  # before any block shows: open() checks against it
            self.valid[:] = b"\x01" * len(self.valid)
            self._count = len(self.valid)

    def as_verified(self) -> bool:
        """False when :meth:`open` refuses the file as not the one verified."""
        try:
            os.close(self.open())
        except NotAsVerified:
            return False
        except DataError:
            return True  # out of descriptors, say: nothing known against the file
        return True

    def disk_signature(self) -> DiskSignature | None:
        """What the member's path looks like now (no symlink followed at its end); ``None`` when it is gone."""
        return self._folder.look(self._member)

    def reverify(self, seen: DiskSignature | None, progress: Callable[[int], None] | None = None) -> int:
        """Check the member again, through a descriptor its opener gives; returns the verified count.

        ``seen`` is :meth:`disk_signature` taken before the call. What is hashed
        becomes what :meth:`open` accepts from now on. Raises :class:`DataError`,
        after marking every block absent, when the file is gone, a link or unreadable.
        """
        if seen is None:
            self._forget_all()
            raise DataError(f"{self.path}: the data file is gone")
        try:
            fd = self._folder.open_member(self._member)
        except DataError:
            self._forget_all()
            raise
        try:
            try:
                now = signature_of(os.fstat(fd))
            except OSError as exc:
                self._forget_all()
                raise from_os_error(exc, self.path, "read the data file") from exc
            if now[:2] != seen[:2]:
                return self._count  # replaced again meanwhile: the next look sees it
            try:
                check = check_data(self.path, self.cf, whole_file=False, progress=progress, fd=fd)
            except DataError:
                self._forget_all()
                raise
            with self._lock:
                # The signature taken before hashing: a change made while hashing makes open() refuse.
                self.verified = now
                self.generation += 1
                self.valid[:] = check.valid
                self._count = check.valid_count
            return self._count
        finally:
            os.close(fd)


class PartFolder:
    """The folder of a collection fetch's ``.part`` files, held open by the fetch: a :class:`MemberFolder` for them."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def open_member(self, path: str) -> int:
        """Open the ``.part`` named ``path`` in the folder for reading, never through a symlink.

        Raises :class:`DataError` (a link, missing, not a regular file, unreadable).
        """
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            raise from_os_error(exc, self.path / path, "open the partial file") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DataError(f"{self.path / path}: not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def look(self, path: str) -> DiskSignature | None:
        """The ``.part``'s signature (not followed); ``None`` when it is gone."""
        return signature_at(self.fd, path)


class PartStore(MemberStore):
    """A collection member still being downloaded, served from its ``.part`` as its blocks verify.

    ``valid`` follows the downloader (:meth:`mark`, called once a block's bytes
    are written and its SHA-256 matched), so only verified blocks are served,
    as a single file's ``.part`` is. Opened on demand like any member (the
    server's :class:`peer.openfiles.OpenFiles`), without the check against a
    verified signature: the ``.part`` changes as blocks are written. When the
    member is whole it is hard-linked to its final name and the ``.part`` is
    unlinked: a descriptor a send holds stays valid (same inode), and the
    fetcher replaces this store with the final name's :class:`MemberStore`.
    """

    __slots__ = ()

    def __init__(self, cf: CascadeFile, valid: bytearray, folder: PartFolder, name: str) -> None:
        super().__init__(cf, valid, folder, name, verified=UNSEEN, fetched=True)  # being written

    def open(self) -> int:
        """Open the ``.part``; returns a descriptor the caller closes.

        Raises :class:`NotAsVerified` when it is gone (the member got its name
        meanwhile) or a link now, :class:`DataError` for any other failure.
        """
        try:
            return self._folder.open_member(self._member)
        except DataError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno not in _GONE_ERRNOS:
                raise
            raise NotAsVerified(str(exc)) from exc

    def mark(self, index: int) -> None:
        """Block ``index`` is written and verified: serve it from now on."""
        with self._lock:
            if not self.valid[index]:
                self.valid[index] = 1
                self._count += 1

    def reverify(self, seen: DiskSignature | None, progress: Callable[[int], None] | None = None) -> int:
        """Not watched: the downloader alone decides which blocks are verified; returns the verified count."""
        return self._count


_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)  # a FIFO put in its place must not block the opener
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)


# Errors of the opener that mean the member's path no longer leads to the verified
# file: gone, a link on the way, a folder where a file was or the reverse.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.EISDIR})


# (device, inode, size, mtime, ctime) of a data file's path: a changed inode is
# a replaced file, a changed size or time an edit; ctime also moves on chmod.
DiskSignature = tuple[int, int, int, int, int]
# The signature of a file not written yet (no file has it): a store verified against it
# serves nothing until it is given the real one.
UNSEEN: DiskSignature = (0, 0, 0, 0, 0)


def disk_signature(path: Path, follow_symlinks: bool = True) -> DiskSignature | None:
    """The :data:`DiskSignature` of the file at ``path`` now; ``None`` when it cannot be seen."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError:
        return None
    return signature_of(st)


def signature_of(st: os.stat_result) -> DiskSignature:
    """The :data:`DiskSignature` of a ``stat`` or ``fstat`` result."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def signature_at(dir_fd: int, name: str) -> DiskSignature | None:
    """The signature of ``name`` relative to folder ``dir_fd``, its last component not followed; ``None`` when gone."""
    try:
        return signature_of(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
    except OSError:
        return None
