"""``peer fetch DIR.cascade``: download every member of a collection into ``--out``, safely.

One downloader for the whole set (:class:`CollectionFetcher`, the single-file
:class:`peer.fetcher.Fetcher` over a :class:`MemberSet`): the members' blocks
form one block space (:class:`peer.planner.Spans`), so one planner decides
peers and blocks for every member at once and one connection per peer carries
requests for any member (a request names its member's cascade hash). Memory
and descriptors follow the connections, not the number of files: no thread,
socket or open file per member, and at most ``PART_FDS`` ``.part`` files
open (an LRU). A member whose blocks are all verified is checked whole (its
hash follows its verified prefix on one finisher thread) and given its name.

Writing is where a hostile collection could hurt, so everything is written
relative to a descriptor of ``--out``:

- folders are created one component at a time (``mkdir`` then ``open`` with
  ``O_DIRECTORY | O_NOFOLLOW``, relative to the parent's descriptor); a
  component that exists as a symlink or as a file refuses that member;
- a member is downloaded into ``OUT/.cascade-partial/INDEX-HASH.part``
  (opened with ``O_NOFOLLOW | O_CREAT``) and, once its whole-file hash
  matched, hard-linked to its final name, which fails if anything is there
  (so no file is ever overwritten), then the ``.part`` is unlinked;
- a member of one block (verified in memory as it arrives) is written instead as
  a nameless file in its folder (Linux ``O_TMPFILE``) and given its name by
  ``linkat``, which fails the same way; where that is not possible, it goes the
  ``.part`` way;
- a final name that already holds a file is only accepted when it is already
  complete and verified; anything else there is left alone and that member fails.

A ``.part`` survives a SIGKILL with its verified blocks; a rerun resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import hashlib
import logging
import os
import queue
import stat
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascade.addresses import TrackerAddress
from cascade.collection import Collection, Member, fold_name
from cascade.command import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from cascade.errors import BlockHashMismatch, CascadeError, DataError, from_os_error
from cascade.metafile import HASH_SIZE, CascadeFile
from cascade.units import format_size
from cascade.wire import pack_block_request
from oscompat import detect
from oscompat.fileio import reserve
from peer.announcer import Announcer
from peer.clock import REAL_CLOCK, Clock
from peer.collection_local import (
    O_DIRECTORY,
    O_NOFOLLOW,
    PARTIAL_DIR_FOLDED,
    HeldFolder,
    MemberMissing,
    open_member,
    raise_file_limit,
    require_safe_tree_io,
)
from peer.collection_local import (
    PARTIAL_DIR as PARTIAL_DIR,  # re-exported: where a fetch keeps its parts
)
from peer.connection import Connection
from peer.fetcher import (
    WRITE_BEHIND_MIN_BLOCK,
    Fetcher,
    FetchPolicy,
    FetchResult,
    PeerInfo,
    Progress,
    write_behind,
)
from peer.localdata import DataCheck, check_data
from peer.planner import Session, Spans
from peer.server import BlockServer
from peer.storage import (
    UNSEEN,
    DiskSignature,
    MemberFolder,
    MemberStore,
    PartFolder,
    PartStore,
    signature_at,
    signature_of,
)
from peer.trackers import TrackerSet, peer_infos
from peer.writebehind import Lender

log = logging.getLogger("peer.fetch")

# PARTIAL_DIR (peer.collection_local) is the folder under --out that holds the incomplete members.
LIST_TIMEOUT = 5.0

O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)  # opening a FIFO must not wait for a writer
# Linux: a file with no name in a folder, given one by linkat (see MemberSet._write_direct); 0 elsewhere.
O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)
# The folder linkat finds a nameless file in, by its descriptor (procfs): the only way
# without CAP_DAC_READ_SEARCH.
_FD_FOLDER = "/proc/self/fd"
# What open(O_TMPFILE) answers where the kernel or the file system cannot make one: the
# .part way is used from then on.
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP})
# What link() says on a file system without hard links: EPERM (Linux vfat, exFAT), ENOSYS
# (a FUSE file system without a link operation), EOPNOTSUPP/ENOTSUP, EMLINK (a link limit of 1).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})
_DIR_FLAGS = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class MemberRefused(DataError):
    """This member cannot be written where the collection says (a symlink, a foreign file on its way)."""


class _Listings:
    """What the folders under ``--out`` held when first looked at: to skip opening names that are not there.

    Before a fetch, every member's final name and ``.part`` is looked for; on a
    fresh ``--out`` none is there, and an ``open`` that fails costs as much as one
    that works (10,000 members: 20,000 failed opens, 0.6 s). One listing per folder
    answers "not there" for all of them. It only ever answers that: a name a listing
    shows (a file, a folder, a symlink, anything) is opened as before, with every
    check, and a name that appears after its folder was listed is caught where it
    matters, by the hard link that gives a member its name (it never replaces one).
    Names are compared as :func:`cascade.collection.fold_name` folds them (the
    collection's own clash check), so a folder that ignores case or normalises
    names (macOS, Windows) never hides a file behind another spelling: such a
    near match is opened and looked at too.
    """

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        # Folder path ('' for --out itself) -> the names it held; None: it could not be listed.
        self._names: dict[str, frozenset[str] | None] = {}

    def names(self, folder: str) -> frozenset[str] | None:
        """The names (folded) folder ``folder`` ('' for the root) held when first listed; None: it could not be."""
        if folder in self._names:
            return self._names[folder]
        names: frozenset[str] | None = None
        fd = -1
        try:
            if os.listdir in os.supports_fd:
                fd = os.open(folder, _DIR_FLAGS, dir_fd=self._root) if folder else os.dup(self._root)
                names = frozenset(fold_name(n) for n in os.listdir(fd))
        except OSError:
            names = None  # not there, a symlink, unreadable: the caller's open finds out which
        finally:
            if fd >= 0:
                os.close(fd)
        self._names[folder] = names
        return names

    def absent(self, path: str) -> bool:
        """True when ``path`` ('/'-separated) is surely not there: a listing on its way lacks a component."""
        parts = path.split("/")
        for i, comp in enumerate(parts):
            names = self.names("/".join(parts[:i]))
            if names is None:
                return False
            if fold_name(comp) not in names:
                return True
        return False


class OutFolder:
    """``--out``, held open; every member is written relative to it, never by a joined path."""

    def __init__(self, out: Path) -> None:
        self.path = out
        try:
            require_safe_tree_io()
            out.mkdir(mode=0o755, exist_ok=True)
            self.fd = os.open(out, os.O_RDONLY | O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except (FileExistsError, NotADirectoryError) as exc:
            raise DataError(f"{out}: exists and is not a folder; give --out a folder for a collection") from exc
        except OSError as exc:
            raise from_os_error(exc, out, "create the output folder") from exc
        self._lock = threading.Lock()  # folder creation by several members at once
        # Listed before anything is written (see _Listings); the .cascade-partial folder, as made or found.
        self.listings = _Listings(self.fd)
        self.partial_fd = self._locked_partial()
        self.partial_names = _Listings(self.partial_fd)
        # The folders members were last placed in (relative path -> descriptor), at most
        # _DIR_FDS: the members of one folder come one after another, and walking the path
        # again for each costs an open and a close per component.
        self._dirs: OrderedDict[str, int] = OrderedDict()

    def _locked_partial(self) -> int:
        """``.cascade-partial``, opened (made if needed) and locked for this fetch alone.

        Two fetches into one folder would each take the other's members for foreign
        files and fail on half of them; the second is refused at once instead. The lock
        (``flock``, released when the descriptor is closed, so also by a SIGKILL) is taken
        on the folder itself; a folder removed by a fetch that just completed, between
        our open and our lock, is opened again (bounded: a few tries). Raises
        :class:`DataError` (closing ``self.fd``).
        """
        import fcntl  # not on Windows, refused before this by require_safe_tree_io

        shown = self.path / PARTIAL_DIR
        try:
            for _ in range(3):
                fd = self._folder(self.fd, PARTIAL_DIR, lambda: shown)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    os.close(fd)
                    raise DataError(
                        f"{self.path}: another peer fetch is writing into it; let it finish, or give another --out"
                    ) from exc
                except OSError:
                    return fd  # a file system without locks (some FUSE, old NFS): a guard, not a need
                try:
                    now = os.stat(PARTIAL_DIR, dir_fd=self.fd, follow_symlinks=False)
                    held = os.fstat(fd)
                    if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                        return fd
                except FileNotFoundError:
                    pass  # removed by a fetch that completed: made again
                except OSError as exc:
                    os.close(fd)
                    raise from_os_error(exc, shown, "look at the folder") from exc
                os.close(fd)
            raise DataError(f"{shown}: removed again and again while it was opened; try again")
        except BaseException:
            os.close(self.fd)
            raise

    def _folder(self, parent: int, name: str, shown: Callable[[], Path]) -> int:
        """Open (creating if needed) folder ``name`` under ``parent``; never through a symlink.

        ``shown`` names it in messages (made only for one: a path per member costs).
        """
        with self._lock:
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _refusal(exc, shown()) from exc
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass  # made meanwhile; opened below like any other
            except OSError as exc:
                raise from_os_error(exc, shown(), "create the folder") from exc
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                raise _refusal(exc, shown()) from exc

    def _shown(self, dirs: list[str]) -> Path:
        return self.path / "/".join(dirs)

    def fresh(self) -> bool:
        """``--out`` held nothing but (maybe) an empty ``.cascade-partial``: no member or ``.part`` to look for.

        As the listings say (taken now if not yet): True only when that is sure.
        """
        names = self.listings.names("")
        return names is not None and names <= {PARTIAL_DIR_FOLDED} and self.partial_names.names("") == frozenset()

    def parent_of(self, path: str) -> tuple[int, str]:
        """A descriptor of member ``path``'s folder (created as needed; the caller closes it) and its last component."""
        *dirs, name = path.split("/")
        key = "/".join(dirs)
        with self._lock:
            held = self._dirs.get(key)
            if held is not None:
                self._dirs.move_to_end(key)
                return os.dup(held), name
        fd = os.dup(self.fd)
        try:
            for i, comp in enumerate(dirs):
                nfd = self._folder(fd, comp, functools.partial(self._shown, dirs[: i + 1]))
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        with self._lock, contextlib.suppress(OSError):  # no descriptor to spare: walked again next time
            if key not in self._dirs:
                self._dirs[key] = os.dup(fd)
                if len(self._dirs) > _DIR_FDS:
                    os.close(self._dirs.popitem(last=False)[1])
        return fd, name

    def close_folders(self) -> None:
        """Close the member folders kept open (the fetch placed its last member)."""
        with self._lock:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()


def _refusal(exc: OSError, shown: Path) -> CascadeError:
    if exc.errno in (errno.ELOOP, errno.EMLINK) or (exc.errno == errno.ENOTDIR and shown.is_symlink()):
        return MemberRefused(f"{shown}: is a symbolic link; Cascade writes nothing through it")
    if exc.errno == errno.ENOTDIR:
        return MemberRefused(f"{shown}: exists and is not a folder; not touching it")
    return from_os_error(exc, shown, "open the folder")


@dataclass(slots=True)
class _Job:
    index: int
    member: Member
    cf: CascadeFile
    result: FetchResult | None = None
    error: str | None = None
    already: bool = False  # complete before this run
    # Its place in the block space of the members to fetch (-1: not fetched, see fetch_collection).
    slot: int = -1
    part: str = ""  # the name of its .part, once made (see _part_name)


def _part_name(job: _Job) -> str:
    if not job.part:
        job.part = f"{job.index}-{job.cf.cascade_hash.hex()[:16]}.part"
    return job.part


def _final_state(out: OutFolder, job: _Job) -> DiskSignature | None:
    """The member at its final name, complete: its signature as verified (to serve it); ``None`` when the name is free.

    Raises :class:`MemberRefused` when something else is there (never overwritten).
    """
    if out.listings.absent(job.member.path):
        return None
    shown = out.path / job.member.path
    try:
        fd = open_member(out.fd, job.member.path, shown)
    except MemberMissing:
        return None
    except DataError as exc:
        raise MemberRefused(f"{exc}; not touching it") from exc
    try:
        seen = signature_of(os.fstat(fd))  # before hashing: a change meanwhile is then not served
        check = check_data(shown, job.cf, whole_file=True, fd=fd, workers=1)
    except OSError as exc:
        raise from_os_error(exc, shown, "read the file") from exc
    finally:
        os.close(fd)
    if check.complete:
        return seen
    raise MemberRefused(f"{shown}: exists and is not this file; not touching it")


def _check_part(out: OutFolder, job: _Job) -> DataCheck | None:
    """The verified blocks of the ``.part`` a killed run left for this member; ``None`` when there is none.

    Raises :class:`MemberRefused` for a symlink or a special file there, :class:`DataError` when unreadable.
    """
    name = _part_name(job)
    if out.partial_names.absent(name):
        return None
    try:
        fd = os.open(name, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), dir_fd=out.partial_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        shown = out.path / PARTIAL_DIR / name
        raise (
            _refusal(exc, shown)
            if exc.errno in (errno.ELOOP, errno.EMLINK)
            else from_os_error(exc, shown, "open the partial file")
        ) from exc
    shown = out.path / PARTIAL_DIR / name
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MemberRefused(f"{shown}: not a regular file; not touching it")
        return check_data(shown, job.cf, whole_file=False, fd=fd, workers=1)
    except OSError as exc:
        raise from_os_error(exc, shown, "read the partial file") from exc
    finally:
        os.close(fd)


def _place(out: OutFolder, job: _Job) -> DiskSignature | None:
    """Give a complete ``.part`` its final name: a hard link that fails if the name is taken, then unlink.

    Where the file system has no hard links, a rename once the name is seen free.

    Returns the placed file's signature as it is now (``None`` if it could not be read), to serve it under.
    """
    parent, name = out.parent_of(job.member.path)
    appeared = f"{out.path / job.member.path}: appeared while it downloaded; not touching it"
    try:
        try:
            os.link(_part_name(job), name, src_dir_fd=out.partial_fd, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError as exc:
            raise MemberRefused(appeared) from exc
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise from_os_error(exc, out.path / job.member.path, "give the downloaded file its name") from exc
            # No hard links here (exFAT, FAT, some FUSE and SMB mounts): rename, once the name
            # is seen free. A name made in between would be replaced, never followed (rename
            # replaces a symlink itself); the fetch's lock keeps other fetches out meanwhile.
            try:
                os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            except OSError as exc2:
                raise from_os_error(exc2, out.path / job.member.path, "look at") from exc2
            else:
                raise MemberRefused(appeared) from exc
            try:
                os.rename(_part_name(job), name, src_dir_fd=out.partial_fd, dst_dir_fd=parent)
            except OSError as exc2:
                raise from_os_error(exc2, out.path / job.member.path, "give the downloaded file its name") from exc2
            return signature_at(parent, name)
        os.unlink(_part_name(job), dir_fd=out.partial_fd)
        return signature_at(parent, name)  # after the unlink: a link count that changes moves the ctime
    finally:
        os.close(parent)


def _drop_part(out: OutFolder, job: _Job) -> None:
    """Remove the ``.part`` of a member found complete at its final name: a run killed between
    :func:`_place`'s link and unlink, or a second fetch into the same folder, left it.

    Otherwise it would stay (and ``.cascade-partial`` with it) however often the fetch completes.
    Only a file of its own name in ``.cascade-partial`` is removed (a symlink itself, never
    its target); anything else there is left as it is. Raises nothing.
    """
    name = _part_name(job)
    if out.partial_names.absent(name):
        return
    with contextlib.suppress(OSError):  # gone meanwhile, or a folder of that name: left alone
        os.unlink(name, dir_fd=out.partial_fd)


def _empty(out: OutFolder, job: _Job) -> None:
    """An empty member: created exclusively (no peer needed), never through a symlink."""
    parent, name = out.parent_of(job.member.path)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o644, dir_fd=parent)
        os.close(fd)
    except OSError as exc:
        raise from_os_error(exc, out.path / job.member.path, "create the empty file") from exc
    finally:
        os.close(parent)


# Member folders kept open while members are placed (arbitrary: a tree's members come
# folder by folder, so a few suffice; each is one descriptor).
_DIR_FDS = 16

# .part files open for writing at once (arbitrary: a few more than the members a swarm
# window spans; the least recently written is closed first, and reopened when needed).
PART_FDS = 64


def _fd_folder() -> int:
    """A descriptor of ``/proc/self/fd`` (held to name nameless files, see MemberSet._write_direct); -1 without."""
    try:
        return os.open(_FD_FOLDER, _DIR_FLAGS)
    except OSError:
        return -1


def _one_block(cf: CascadeFile) -> bool:
    """A file of one block, whose block hash is its whole-file hash (so checked once, on arrival)."""
    return cf.block_hashes == cf.file_hash  # 32 bytes of block hashes: one block


# The whole-file hash of a member is fed in reads of up to this many bytes
# (arbitrary, the same as peer.hasher's: syscalls vanish, memory stays small).
HASH_CHUNK = 4 << 20


class _Prefix:
    """The whole-file SHA-256 of a member, fed with its blocks ``0..next-1``."""

    __slots__ = ("next", "sha")

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.next = 0


@dataclass(slots=True)  # not frozen: made once per member, and a frozen init costs twice as much
class _Placed:
    """A member written and named at once (MemberSet._write_direct): its signature as placed, or why it failed."""

    seen: DiskSignature | None
    error: str | None = None


class _Part:
    """An open ``.part``: its descriptor and the writes under way on it (it is closed only without any)."""

    __slots__ = ("closing", "fd", "pins")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pins = 0
        self.closing = False


class MemberSet:
    """The members left to fetch as one block space (:class:`peer.planner.Spans`): verified writes to their ``.part``.

    Block ``i`` of the space is block ``j`` of member ``m`` (``spans.locate``); a
    request names that member's cascade hash and ``j``. A block is written only once
    its SHA-256 matched, to its member's ``.part`` through a descriptor from a small
    LRU (``PART_FDS``): members not being written hold no descriptor. A member whose
    blocks are all verified goes to the finisher thread, which checks its whole-file
    hash (not again for a member of one block: that block's hash is the file's) and
    gives it its final name (:func:`_place`). A member of one block with no ``.part``
    from an earlier run is instead written nameless into its folder and linked to its
    name at once (:meth:`_write_direct`), where the system allows it and ``nameless``
    (the ``.part`` way is for other systems, and for tests). Thread-safe.
    """

    def __init__(
        self,
        out: OutFolder,
        jobs: list[_Job],
        started: float,
        on_placed: Callable[[_Job, DiskSignature], None] | None = None,
        *,
        nameless: bool = True,
    ) -> None:
        self.out = out
        # Called (from a connection's thread or the finisher) once a member has its final name.
        self.on_placed = on_placed
        self.jobs = jobs
        self.started = started
        # One pass over the members (a collection has up to a million).
        n = len(jobs)
        counts, single, batch = [0] * n, bytearray(n), array("I", bytes(4 * n))
        total, longest = 0, 1
        for slot, job in enumerate(jobs):
            job.slot = slot
            cf = job.cf
            counts[slot] = cf.block_count
            single[slot] = _one_block(cf)
            # _batch: see _since below.
            batch[slot] = max(1, HASH_CHUNK // max(1, cf.block_size))
            total += cf.data_length
            longest = max(longest, min(cf.block_size, cf.data_length))
        self.spans = Spans(counts)
        self.valid = bytearray(self.spans.block_count)
        self.total_bytes = total
        # The longest block (not the block size: a small file's one block is as long as the file).
        self.max_block_size = longest
        # The planner's depth and timeouts follow the mean block length.
        self.block_size = max(1, self.total_bytes // max(1, self.spans.block_count))
        self.verified = 0
        self.verified_bytes = 0
        self._left = array("Q", counts)
        self._single = bytes(single)
        # The members of one block written straight into their folder, nameless, and given their
        # name once written (_write_direct): those with no .part from an earlier run, where the
        # system makes nameless files. The others, and all after a refusal, go the .part way.
        self._fds = _fd_folder() if nameless and O_TMPFILE and any(self._single) else -1
        self._direct = bytearray(self._single if self._fds >= 0 else n)
        # Members handed to _finish or being placed directly (later notes and copies of them are
        # dropped), and the whole-file hashes of the members being written, as far as their
        # verified prefix goes.
        self._finished = bytearray(n)
        self._prefix: dict[int, _Prefix] = {}
        # Blocks verified per member since the finisher was last told; it is told every
        # _batch blocks (about HASH_CHUNK), not per block: a hand-off per block costs more than it hashes.
        self._since = array("I", bytes(4 * n))
        self._batch = batch
        self._features = detect()
        # Per member, what this run downloaded: blocks, bytes and from whom (for --json).
        self.got_blocks = array("Q", bytes(8 * n))
        self.got_bytes = array("Q", bytes(8 * n))
        self.resumed = array("Q", bytes(8 * n))
        self.sources: dict[int, dict[str, int]] = {}
        self.done_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._parts: OrderedDict[int, _Part] = OrderedDict()
        self._finish_q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._finisher: threading.Thread | None = None
        # Blocks handed to the write-behind thread: from whom (see coming_from).
        self._sources_behind: dict[int, str] = {}
        # Where next_to_list goes on from: among all the members left, and among those under way,
        # which are these (some blocks verified, some missing: a few at a time, so not found by
        # looking at every member).
        self._busy: set[int] = set()
        self._list_next = 0
        self._list_busy = 0
        self._list_busy_turn = False
        # Per member, the store that serves its .part's verified blocks, or its final name once
        # it has it (see serve_parts).
        self.stores: list[MemberStore | None] = [None] * n

    # --- the connection's view (peer.connection.Members) -----------------------------

    def block_length(self, i: int) -> int:
        m, j = self.spans.locate(i)
        cf = self.jobs[m].cf
        return min(cf.block_size, cf.data_length - j * cf.block_size)

    def request(self, i: int, keep_open: bool) -> bytes:
        m, j = self.spans.locate(i)
        return pack_block_request(j, self.jobs[m].cf.cascade_hash, keep_open=keep_open)

    # --- state -------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.verified == self.spans.block_count

    def next_to_list(self) -> _Job | None:
        """The member whose peers the tracker is asked for next; ``None`` once every member is whole.

        Every other time a member under way (some blocks verified, some missing), round
        robin: listing a member enrols this peer in its swarm (PROTOCOL.md), which the
        tracker forgets after its TTL, so the members it already serves a part of stay
        listed and it stays findable for them however many members there are. The other
        times, and when none is under way, the next member with blocks missing, round
        robin, to find peers for those too.
        """
        self._list_busy_turn = not self._list_busy_turn
        if self._list_busy_turn:
            with self._lock:
                busy = self._busy
                later = [m for m in busy if m >= self._list_busy] or busy
                m = min(later) if later else -1
            if m >= 0:
                self._list_busy = m + 1
                return self.jobs[m]
        m = self._next(self._list_next, lambda m: self._left[m] > 0)
        if m < 0:
            return None
        self._list_next = m + 1
        return self.jobs[m]

    def _next(self, start: int, wanted: Callable[[int], bool]) -> int:
        """The first member from ``start`` on (wrapping around) that is ``wanted``; -1 when none is."""
        n = len(self.jobs)
        for k in range(n):
            m = (start + k) % n
            if wanted(m):
                return m
        return -1

    # --- resuming ------------------------------------------------------------------------

    def resume(self, checks: dict[int, DataCheck]) -> None:
        """Take the verified blocks of the ``.part`` files a killed run left (``checks``, by member slot).

        Members found whole go to the finisher first.
        """
        for m, check in checks.items():
            job = self.jobs[m]
            base, cf = self.spans.starts[m], job.cf
            for j, v in enumerate(check.valid):
                if v:
                    self.valid[base + j] = 1
                    self.verified += 1
                    self.verified_bytes += cf.block_length(j)
            self.resumed[m] = check.valid_count
            self._left[m] = cf.block_count - check.valid_count
            if 0 < self._left[m] < cf.block_count:
                self._busy.add(m)
            self._direct[m] = 0  # its .part is finished (or removed) as any
            if not self._left[m]:
                self._finish_q.put(m)

    def serve_parts(self, add: Callable[[MemberStore], None], final: MemberFolder | None = None) -> None:
        """Give every member left a :class:`PartStore` over its ``.part`` (its verified blocks so far) to ``add``.

        Called once, before the download starts: from then on a block is served as soon as
        it is written and verified. A member not started yet is answered "not present"
        (status 2, the connection stays open) rather than "unknown hash" (status 1, closed),
        as a single file's ``.part`` is; and the server holds no more stores than it will
        once every member has its name. A member to be written nameless (it never has a
        ``.part``) gets, with ``final`` (``--out``), the :class:`MemberStore` of its final
        name instead, with no block until :meth:`MemberStore.placed` (not a new store then).
        """
        folder = PartFolder(self.out.partial_fd, self.out.path / PARTIAL_DIR)
        starts, valid, direct, stores = self.spans.starts, self.valid, self._direct, self.stores
        for m, job in enumerate(self.jobs):
            cf = job.cf
            store: MemberStore
            if direct[m] and final is not None:
                store = MemberStore(cf, bytearray(cf.block_count), final, job.member.path, UNSEEN, fetched=True)
            else:
                base = starts[m]
                store = PartStore(cf, bytearray(valid[base : base + cf.block_count]), folder, _part_name(job))
            stores[m] = store
            add(store)

    # --- writing -------------------------------------------------------------------------

    def write(self, i: int, body: memoryview, source: str) -> bool:
        """Verify block ``i`` and write it to its member's ``.part``; False when a copy was verified first.

        A member of one block is given its final name here and now (its block's hash is
        the file's); a larger one goes to the finisher. Raises :class:`BlockHashMismatch`
        (nothing written) and :class:`DataError`.
        """
        if self.valid[i]:
            return False  # another copy won (the endgame)
        m, j = self.check(i, body)
        job = self.jobs[m]
        if self._single[m]:
            # Its one block is written once: a copy that comes meanwhile is a duplicate, whichever
            # way each would go (the nameless way can be given up for all while a copy is on it).
            with self._lock:
                if self._finished[m]:
                    return False  # another copy is being placed, or was
                self._finished[m] = 1
            if self._direct[m]:
                placed = self._write_direct(job, body)
                if placed is not None:
                    return self._written(m, i, j, len(body), source, placed)
        return self._write_part(m, i, j, body, source)

    def check(self, i: int, body: memoryview) -> tuple[int, int]:
        """(member, its block) of block ``i``, once ``body`` matched that block's SHA-256; raises BlockHashMismatch."""
        m, j = self.spans.locate(i)
        cf = self.jobs[m].cf
        start = j * HASH_SIZE
        if hashlib.sha256(body).digest() != cf.block_hashes[start : start + HASH_SIZE]:
            raise BlockHashMismatch(f"block {j} of {self.jobs[m].member.path} does not match its SHA-256")
        return m, j

    def may_write_behind(self, i: int) -> bool:
        """Whether block ``i`` may be written behind the connection (peer.writebehind, see write_verified).

        Yes for a block of a member of several (its name comes from the finisher); a member
        of one block gets its name as it is written.
        """
        return not self._single[self.spans.member(i)]

    def coming_from(self, i: int, source: str) -> None:
        """Block ``i``, checked, goes to the write-behind thread: from ``source`` (the first copy's, if two come)."""
        self._sources_behind.setdefault(i, source)

    def write_verified(self, i: int, data: memoryview) -> bool:
        """Write block ``i``, checked and handed over (see may_write_behind), on the write-behind thread."""
        m, j = self.spans.locate(i)
        return self._write_part(m, i, j, data, self._sources_behind.pop(i, ""))

    def _write_part(self, m: int, i: int, j: int, body: memoryview, source: str) -> bool:
        """Write verified block ``i`` (block ``j`` of member ``m``, from ``source``) to the member's ``.part``."""
        part = self._pin(m)
        if part is None:
            return False  # the member is whole already (a late copy)
        job = self.jobs[m]
        try:
            offset, view = j * job.cf.block_size, body
            while view:
                n = os.pwrite(part.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise from_os_error(exc, self._shown(job), f"write block {j}") from exc
        finally:
            self._unpin(part)
        return self._written(m, i, j, len(body), source, None)

    def _written(self, m: int, i: int, j: int, n: int, source: str, placed: _Placed | None) -> bool:
        """Block ``i`` (block ``j`` of member ``m``, ``n`` bytes from ``source``) is verified and written: count it.

        ``placed``: the member got its name already (see _write_direct). False when a copy was counted first.
        """
        with self._lock:
            if self.valid[i]:
                return False
            self.valid[i] = 1
            if placed is None:
                store = self.stores[m]
                if isinstance(store, PartStore):
                    store.mark(j)  # its bytes are written and hash-checked: served from now on
            self.verified += 1
            self.verified_bytes += n
            self.got_blocks[m] += 1
            self.got_bytes[m] += n
            by = self.sources.get(m)
            if by is None:
                self.sources[m] = {source: 1}
            else:
                by[source] = by.get(source, 0) + 1
            self._left[m] -= 1
            whole = not self._left[m]
            if whole:
                self._busy.discard(m)
            else:
                self._busy.add(m)
            note = False
            if not whole:
                self._since[m] += 1
                if self._since[m] >= self._batch[m]:
                    self._since[m] = 0
                    note = True
        if placed is not None:
            self._placed(m, placed)
        elif note:
            self._finish_q.put(m)
        elif whole:
            if self._single[m]:
                # On this thread: a hand-off per small file costs more than the link itself.
                self._finish(m)
            else:
                self._finish_q.put(m)
        return True

    def _write_direct(self, job: _Job, body: memoryview) -> _Placed | None:
        """Write a verified one-block member as a nameless file in its folder and give it its name.

        The file is made with ``O_TMPFILE`` in the member's folder (opened as by
        :func:`_place`, no symlink followed) and named with ``linkat`` from
        ``/proc/self/fd``, which fails if anything has the name (it is never
        replaced). A SIGKILL before the link leaves nothing behind, no name holds
        an unverified or partial byte, and the ``.part`` way's create, link and
        unlink become one create and one link. ``None``: the system cannot make
        or name such a file here (then no member goes this way again) or this
        one could not be made: the caller takes the ``.part`` way. Raises
        :class:`DataError` when the write fails (a full disk), as that way does.
        """
        out, path = self.out, job.member.path
        try:
            parent, name = out.parent_of(path)
        except CascadeError as exc:
            return _Placed(None, str(exc))
        try:
            try:
                fd = os.open(".", O_TMPFILE | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=parent)
            except OSError as exc:
                if exc.errno in _NO_TMPFILE:
                    log.debug("%s: no nameless files here (%s): members go through .part files", out.path, exc)
                    self._no_nameless()
                return None
            try:
                try:
                    offset = os.pwrite(fd, body, 0)  # one block: all of it, but for a short write
                    while offset < len(body):
                        offset += os.pwrite(fd, body[offset:], offset)
                except OSError as exc:
                    raise from_os_error(exc, out.path / path, "write the downloaded file") from exc
                try:
                    os.link(str(fd), name, src_dir_fd=self._fds, dst_dir_fd=parent, follow_symlinks=True)
                except FileExistsError:
                    return _Placed(None, f"{out.path / path}: appeared while it downloaded; not touching it")
                except OSError as exc:
                    # No way to name it here (a sandbox without procfs links, say): the .part
                    # way's own link says what is wrong, if anything is.
                    log.debug("%s: cannot name a nameless file (%s): members go through .part files", out.path, exc)
                    self._no_nameless()
                    return None
                try:
                    return _Placed(signature_of(os.fstat(fd)))  # linked: its ctime moved already
                except OSError:
                    return _Placed(None)
            finally:
                os.close(fd)
        finally:
            os.close(parent)

    def _no_nameless(self) -> None:
        """From now on every member goes the ``.part`` way (no nameless file can be made or named)."""
        self._direct[:] = bytes(len(self._direct))

    def _placed(self, m: int, placed: _Placed) -> None:
        """Member ``m`` went the direct way: it has its name (or its job an error)."""
        job = self.jobs[m]
        if placed.error is not None:
            job.error = placed.error
            return
        self.done_at[m] = time.monotonic()
        if self.on_placed is not None and placed.seen is not None:
            self.on_placed(job, placed.seen)

    def _shown(self, job: _Job) -> Path:
        """The ``.part`` of ``job`` as shown in messages."""
        return self.out.path / PARTIAL_DIR / _part_name(job)

    def _pin(self, m: int) -> _Part | None:
        """The open ``.part`` of member ``m`` (opened, or created, as needed), pinned; None once it is whole.

        Opened under the lock and only while blocks are missing: a late copy never
        creates a ``.part`` again after the member got its name.
        """
        with self._lock:
            if not self._left[m]:
                return None
            part = self._parts.get(m)
            if part is None:
                part = self._parts[m] = _Part(self._open(self.jobs[m]))
                if len(self._parts) > PART_FDS:
                    # The least recently written members with no write under way lose their descriptor.
                    idle = [k for k, p in self._parts.items() if not p.pins][: len(self._parts) - PART_FDS]
                    for k in idle:
                        os.close(self._parts.pop(k).fd)
            else:
                self._parts.move_to_end(m)
            part.pins += 1
            return part

    def _unpin(self, part: _Part) -> None:
        with self._lock:
            part.pins -= 1
            if part.closing and not part.pins:
                os.close(part.fd)

    def _close(self, m: int) -> None:
        """Member ``m`` is written: its descriptor is closed (once the writes under way on it ended)."""
        with self._lock:
            part = self._parts.pop(m, None)
            if part is None:
                return
            if part.pins:
                part.closing = True  # a late duplicate is being written: its writer closes it
            else:
                os.close(part.fd)

    def close(self) -> None:
        """Close every ``.part`` still open (the fetch ended); one being written is closed by its writer."""
        with self._lock:
            if self._fds >= 0:
                os.close(self._fds)
                self._fds = -1
                self._no_nameless()
            for part in self._parts.values():
                if part.pins:
                    part.closing = True
                else:
                    os.close(part.fd)
            self._parts.clear()

    def _open(self, job: _Job) -> int:
        """Open (or create, at its full length) the member's ``.part``; never through a symlink. Raises DataError."""
        name = _part_name(job)
        flags = os.O_RDWR | os.O_CREAT | O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        cf = job.cf
        try:
            try:
                fd = os.open(name, flags | os.O_EXCL, 0o644, dir_fd=self.out.partial_fd)
                size = 0  # new, so a regular file (removed again if its space cannot be had)
            except FileExistsError:
                fd = os.open(name, flags | O_NONBLOCK, 0o644, dir_fd=self.out.partial_fd)
                size = -1
        except OSError as exc:
            shown = self._shown(job)
            raise (
                _refusal(exc, shown)
                if exc.errno in (errno.ELOOP, errno.EMLINK)
                else from_os_error(exc, shown, "open the partial file")
            ) from exc
        try:
            if size < 0:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise DataError(f"{self._shown(job)}: not a regular file")
                size = st.st_size
            # Its full length up front, allocated (a full disk shows now), except for one block:
            # its write does it.
            if size < cf.data_length and not self._single[job.slot]:
                reserve(fd, self._shown(job), cf.data_length, self._features)
        except OSError as exc:
            os.close(fd)
            if size == 0:  # made just now and holding nothing: not left behind for a rerun to find
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.out.partial_fd)
            # Named by the member (the .part's name means nothing to the user): "OUT/a/big.bin:
            # disk full: cannot reserve its 400.0 MiB (in OUT/.cascade-partial)".
            doing = f"reserve its {format_size(cf.data_length)} (in {self.out.path / PARTIAL_DIR})"
            raise from_os_error(exc, self.out.path / job.member.path, doing) from exc
        except BaseException:
            os.close(fd)
            raise
        return fd

    # --- finishing members -------------------------------------------------------------------

    def start(self) -> None:
        """Start the finisher thread (members complete before the first block arrives go first)."""
        if self._finisher is None:
            self._finisher = threading.Thread(target=self._finish_loop, name="member-finish", daemon=True)
            self._finisher.start()

    def drain(self) -> None:
        """Wait until every member queued so far is finished (placed, or failed with an error line)."""
        self.start()
        self._finish_q.put(None)
        assert self._finisher is not None
        self._finisher.join()
        self._finisher = None

    def _finish_loop(self) -> None:
        buf = memoryview(bytearray(HASH_CHUNK))
        while True:
            m = self._finish_q.get()
            if m is None:
                return
            if self._finished[m]:
                continue  # a progress note behind its end
            if self._left[m]:
                self._advance(m, buf)
            else:
                self._finish(m, buf)

    def _advance(self, m: int, buf: memoryview) -> None:
        """Hash member ``m``'s verified prefix so far (read back from the page cache), while it downloads.

        The whole-file SHA-256 is sequential: done as blocks arrive, only the part after
        the last gap is left once the member is whole (as peer.hasher does for one file).
        """
        part = self._pin(m)
        if part is None:
            return  # whole meanwhile: _finish hashes the rest
        try:
            self._hash_prefix(m, part.fd, buf)
        except OSError as exc:
            log.debug("%s: hashing put off: %s", self._shown(self.jobs[m]), exc)  # _finish reads it again
            self._prefix.pop(m, None)
        finally:
            self._unpin(part)

    def _hash_prefix(self, m: int, fd: int, buf: memoryview) -> None:
        """Feed the blocks verified from where member ``m``'s hash stopped into it; raises ``OSError``."""
        cf = self.jobs[m].cf
        state = self._prefix.get(m)
        if state is None:
            state = self._prefix[m] = _Prefix()
        valid, base, count, bs = self.valid, self.spans.starts[m], cf.block_count, cf.block_size
        while state.next < count and valid[base + state.next]:
            end = state.next + 1
            while end < count and (end - state.next) * bs < len(buf) and valid[base + end]:
                end += 1
            offset, stop = state.next * bs, min(end * bs, cf.data_length)
            while offset < stop:  # blocks larger than the buffer are read in pieces
                view = buf[: min(len(buf), stop - offset)]
                n = os.preadv(fd, [view], offset)
                if n <= 0:
                    raise OSError(errno.EIO, "the partial file is shorter than expected")
                state.sha.update(view[:n])
                offset += n
            state.next = end

    def _finish(self, m: int, buf: memoryview | None = None) -> None:
        """Member ``m`` is whole: close it, check its whole-file hash, give it its name (or its job an error)."""
        job = self.jobs[m]
        self._finished[m] = 1
        try:
            self._close(m)
            if not self._single[m]:
                self._check_whole(m, buf if buf is not None else memoryview(bytearray(HASH_CHUNK)))
            seen = _place(self.out, job)
        except CascadeError as exc:
            job.error = str(exc)
            return
        finally:
            self._prefix.pop(m, None)
        self.done_at[m] = time.monotonic()
        if self.on_placed is not None and seen is not None:
            self.on_placed(job, seen)

    def _check_whole(self, m: int, buf: memoryview) -> None:
        """The whole-file SHA-256 of member ``m``, whose blocks are all verified; raises DataError on a mismatch."""
        job = self.jobs[m]
        cf = job.cf
        try:
            flags = os.O_RDWR | O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(_part_name(job), flags, dir_fd=self.out.partial_fd)
        except OSError as exc:
            raise from_os_error(exc, self._shown(job), "open the partial file") from exc
        try:
            if os.fstat(fd).st_size != cf.data_length:  # a .part left longer by an older run
                os.ftruncate(fd, cf.data_length)
            self._hash_prefix(m, fd, buf)
        except OSError as exc:
            raise from_os_error(exc, self._shown(job), "check the downloaded file") from exc
        finally:
            os.close(fd)
        if self._prefix[m].sha.digest() != cf.file_hash:
            raise DataError(
                f"{self.out.path / job.member.path}: every block verified but the whole-file SHA-256 "
                "does not match the .cascade file"
            )

    # --- results -----------------------------------------------------------------------------

    def result(self, m: int) -> FetchResult:
        """What this run did for member ``m`` (``complete`` once it has its final name)."""
        job = self.jobs[m]
        done = self.done_at.get(m)
        return FetchResult(
            complete=done is not None and job.error is None,
            bytes_downloaded=self.got_bytes[m],
            blocks_downloaded=self.got_blocks[m],
            blocks_total=job.cf.block_count,
            blocks_resumed=self.resumed[m],
            seconds=(done if done is not None else time.monotonic()) - self.started,
            sources=dict(self.sources.get(m, {})),
            banned=[],
        )


class CollectionFetcher(Fetcher):
    """The downloader (:class:`peer.fetcher.Fetcher`) over every member of a :class:`MemberSet` at once.

    One planner for all the members' blocks, so one connection per peer carries
    requests for any member, the block order and the peers are decided once for
    the whole set, and ``max_peers`` bounds the connections whatever the number of files.
    """

    def __init__(
        self,
        members: MemberSet,
        list_peers: Callable[[], Iterable[PeerInfo]],
        *,
        policy: FetchPolicy | None = None,
        my_port: int | None = None,
        clock: Clock = REAL_CLOCK,
    ) -> None:
        self.members = members
        self._setup(
            members.valid,
            members.block_size,
            members.max_block_size,
            list_peers,
            policy,
            my_port,
            clock,
            None,
            spans=members.spans,
        )
        # For the connections' sake only: a collection's requests name each member (MemberSet.request).
        self.cf = members.jobs[0].cf
        if members.complete:
            self._complete.set()

    def _verified_count(self) -> int:
        return self.members.verified

    def _all_verified(self) -> bool:
        return self.members.complete

    def _begin(self) -> None:
        members = self.members
        members.start()
        # Large blocks are written behind the connection, as for one file.
        self._behind = write_behind(members, lambda: None, members.max_block_size, members.complete)

    def _abandon(self) -> None:
        pass  # the members already whole are still given their names (drain, by the caller)

    def _write(self, session: Session, i: int, body: memoryview, lender: Lender | None) -> bool:
        members, behind = self.members, self._behind
        if behind is None or len(body) < WRITE_BEHIND_MIN_BLOCK or not members.may_write_behind(i):
            return members.write(i, body, session.peer.name)
        if members.valid[i]:
            return False  # another copy won (the endgame)
        members.check(i, body)
        members.coming_from(i, session.peer.name)
        return behind.put(i, body, lender)

    def _connection(self, session: Session) -> Connection:
        return Connection(self, session, self.cf, self.policy.connect_timeout, members=self.members)

    def _progress(self) -> Progress:
        with self._lock:
            peers = len({s.peer for s in self.planner.sessions})
        if peers or not self._stop.is_set():
            self._last_peers = peers
        return Progress(self.members.verified_bytes, self.members.total_bytes, self._last_peers)

    def _finish(self, start: float, resumed: int) -> FetchResult:
        self.members.drain()
        peers = self.planner.peers.values()
        return FetchResult(
            complete=True,
            bytes_downloaded=sum(p.bytes for p in peers) + sum(s.bytes for s in self.planner.sessions),
            blocks_downloaded=self.members.verified - resumed,
            blocks_total=self.members.spans.block_count,
            blocks_resumed=resumed,
            seconds=self._clock.now() - start,
            sources={},
            banned=sorted(p.name for p in peers if p.banned),
        )


def fetch_collection(
    args: argparse.Namespace,
    coll: Collection,
    out_path: Path,
    trackers: TrackerSet,
    server: BlockServer,
    my_ip: str,
    policy: FetchPolicy,
    stop_event: threading.Event,
    cleanup: contextlib.ExitStack,
    ready: Callable[[], None] = lambda: None,
) -> tuple[list[_Job], float, str | None]:
    """Fetch every member of ``coll`` into ``out_path``: the jobs (each with its result or error), the seconds.

    And the error line of the whole download, if it failed as a whole (no peer, a stall).
    A member being downloaded is served from its ``.part`` as its blocks verify
    (:class:`peer.storage.PartStore`), and once complete from its final name, opened
    on demand (:class:`peer.storage.MemberStore`): what they need closed once the server
    stopped goes on ``cleanup``. As for one file, nothing is created before a tracker
    answered a first listing (when blocks are missing); ``ready`` is called once the
    output is open and that listing answered. Raises :class:`DataError` when ``out_path``
    cannot be used at all (or a disk write failed), :class:`CascadeError` when no tracker
    answers that first listing; a member's failure is in its job.
    """
    for m in coll.members:
        if fold_name(m.path.split("/", 1)[0]) == PARTIAL_DIR_FOLDED:
            raise DataError(f"the collection holds {m.path!r}, a name Cascade keeps for partial downloads")
    # Members are served opened on demand, at most max_open_files at once, as by peer seed.
    raise_file_limit(server.config.max_open_files)
    port = server.address[1]
    first: list[PeerInfo] | None = None
    if not os.path.lexists(out_path):
        # Nothing there yet, so every member with a block is missing: a tracker must answer
        # before --out is created, so that a rerun after an unreachable tracker finds nothing.
        with_blocks = next((m for m in coll.members if m.data_length), None)
        if with_blocks is not None:
            first = _listing(trackers, with_blocks.cascade_hash, my_ip, port)
    out = OutFolder(out_path)
    try:
        held = HeldFolder(out_path)
    except BaseException:
        os.close(out.partial_fd)
        os.close(out.fd)
        raise
    cleanup.callback(held.close)  # after the server stopped: it opens the members relative to it

    def serve(job: _Job, seen: DiskSignature | None = None) -> None:
        """Serve a member that has its final name, in place of its ``.part``."""
        path = job.member.path
        seen = seen if seen is not None else held.look(path)
        if seen is None:
            return
        part = members.stores[job.slot] if members is not None and job.slot >= 0 else None
        if part is not None and not isinstance(part, PartStore):
            part.placed(seen)  # served under its final name already, with no block until now
            return
        full = bytearray(b"\x01") * job.cf.block_count
        server.add_store(MemberStore(job.cf, full, held, path, verified=seen, fetched=True))
        if part is not None:  # replaced: its descriptor (the same inode) is not kept for it
            server.open_files.forget(part)

    started = time.monotonic()
    jobs = [_Job(i, m, m.cascade_file()) for i, m in enumerate(coll.members)]
    bar = _Bar(coll.total_length, out_path.name, args.progress_lines)
    error: str | None = None
    members: MemberSet | None = None
    try:
        todo: list[_Job] = []
        empties: list[_Job] = []
        parts: list[DataCheck | None] = []
        fresh = out.fresh()
        for job in jobs:
            try:
                seen = None if fresh else _final_state(out, job)
                if seen is not None:
                    job.already = True
                    bar.add(job.cf.data_length)
                    _drop_part(out, job)
                    serve(job, seen)
                elif job.cf.block_count == 0:
                    empties.append(job)
                else:
                    parts.append(None if fresh else _check_part(out, job))
                    todo.append(job)
            except CascadeError as exc:
                job.error = str(exc)
        if first is None and todo and not all(c is not None and c.complete for c in parts):
            first = _listing(trackers, todo[0].cf.cascade_hash, my_ip, port)
        for job in empties:  # created only now: no peer is needed for them, but a tracker answered
            try:
                _empty(out, job)
                serve(job)
            except CascadeError as exc:
                job.error = str(exc)
        ready()
        members = MemberSet(out, todo, started, on_placed=serve)
        members.resume({m: check for m, check in enumerate(parts) if check is not None})
        members.serve_parts(server.add_store, held)
        if todo and not stop_event.is_set():
            error = _download(members, trackers, my_ip, port, policy, stop_event, bar, first or [])
        members.drain()
        for job in todo:
            job.result = members.result(job.slot)
            if error is not None and not stop_event.is_set() and not job.result.complete and job.error is None:
                job.error = f"{out_path / job.member.path}: incomplete"
    finally:
        if members is not None:  # nothing may use the folder's descriptors once they are closed
            members.drain()
            members.close()
        bar.close()
        seconds = time.monotonic() - started
        with contextlib.suppress(OSError):  # ENOTEMPTY: a partial member keeps it for the rerun
            os.rmdir(PARTIAL_DIR, dir_fd=out.fd)
        out.close_folders()
        os.close(out.fd)
        # The .part files of members left incomplete are still served (PartStore): their
        # folder is let go once the server stopped.
        cleanup.callback(os.close, out.partial_fd)
    return jobs, seconds, error


def _listing(trackers: TrackerSet, cascade_hash: bytes, my_ip: str, port: int) -> list[PeerInfo]:
    """The peers of one member (the first listing is asked before anything is written).

    Raises :class:`CascadeError` when no tracker answers.
    """
    return peer_infos(trackers.list_peers(cascade_hash, my_ip, port, LIST_TIMEOUT))


def _download(
    members: MemberSet,
    trackers: TrackerSet,
    my_ip: str,
    port: int,
    policy: FetchPolicy,
    stop_event: threading.Event,
    bar: _Bar,
    first: list[PeerInfo],
) -> str | None:
    """Run one :class:`CollectionFetcher` over the members; the error line when it failed as a whole.

    ``first``: the peers a first listing gave. Raises :class:`DataError` (a full disk,
    a ``.part`` that became a symlink).
    """

    def list_peers() -> list[PeerInfo]:
        # The tracker is asked for one member at a time, in turn: the peers of one member
        # likely hold the others too, and are asked for any of them over the same connection.
        job = members.next_to_list()
        return [] if job is None else _listing(trackers, job.cf.cascade_hash, my_ip, port)

    fetcher = CollectionFetcher(members, list_peers, policy=policy, my_port=port)
    fetcher.add_peers(first)
    shown = members.verified_bytes
    bar.add(shown)

    def tick(p: Progress) -> None:
        nonlocal shown
        if stop_event.is_set():
            fetcher.stop()
        bar.add(p.verified_bytes - shown)
        shown = p.verified_bytes

    try:
        fetcher.run(on_tick=tick)
    except DataError:
        raise
    except CascadeError as exc:
        return str(exc)
    return None


class _Bar:
    """One progress bar for the whole set (bytes verified over all members), on a terminal."""

    def __init__(self, total: int, name: str, lines: bool) -> None:
        self.total = total
        self.done = 0
        self.lines = lines
        self.last = 0.0
        self._lock = threading.Lock()
        self.bar: Any = None
        if sys.stderr.isatty() and not lines:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="iB", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc=name, leave=False
            )

    def add(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif self.lines:
                now = time.monotonic()
                if now - self.last >= 0.1 or self.done >= self.total:
                    self.last = now
                    print(f"progress {self.done} {self.total} 0", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_collection(
    args: argparse.Namespace,
    coll: Collection,
    out_path: Path,
    trackers: TrackerSet,
    tracker_addrs: list[TrackerAddress],
    server: BlockServer,
    my_ip: str,
    policy: FetchPolicy,
    stop_event: threading.Event,
    stop_wait: Any,
    cleanup: contextlib.ExitStack,
    ready: Callable[[], None] = lambda: None,
) -> int:
    """Fetch, report (one line per failed member, one for the whole; ``--json`` per file and overall), seed.

    ``cleanup`` is closed by the caller once ``server`` stopped; ``ready`` is called
    once the output is open (see :func:`fetch_collection`).
    """
    jobs, seconds, error = fetch_collection(
        args, coll, out_path, trackers, server, my_ip, policy, stop_event, cleanup, ready
    )
    failed = [j for j in jobs if j.error is not None or (j.result is not None and not j.result.complete)]
    downloaded = sum(j.result.bytes_downloaded for j in jobs if j.result is not None)
    if error is not None and not stop_event.is_set():
        print(f"peer fetch: error: {error}", file=sys.stderr, flush=True)
    # Interrupted, every member not done yet is incomplete by the user's choice: only the
    # members that failed for a reason of their own get a line (and the summary says the rest).
    told = [j for j in failed if j.error is not None] if stop_event.is_set() else failed
    for j in told[:20]:
        print(f"peer fetch: {j.error or f'{out_path / j.member.path}: incomplete'}", file=sys.stderr, flush=True)
    if len(told) > 20:
        print(f"peer fetch: ... and {len(told) - 20} more files failed", file=sys.stderr, flush=True)
    count = len(jobs)
    rate = downloaded / seconds if seconds > 0 else 0.0
    if stop_event.is_set():
        summary = f"peer fetch: interrupted; verified blocks are kept in {out_path / PARTIAL_DIR}, rerun to resume"
    elif failed:
        summary = f"peer fetch: error: {out_path}: {count - len(failed)} of {count} files complete"
    else:
        summary = (
            f"peer fetch: {out_path.name}/ complete: {count} files, {format_size(downloaded)} in {seconds:.2f} s "
            f"({format_size(rate)}/s)"
        )
    print(summary, file=sys.stderr, flush=True)
    if args.json:
        import json

        files = []
        for j in jobs:
            doc: dict[str, object] = {"path": j.member.path, "cascade_hash": j.cf.cascade_hash.hex()}
            if j.result is not None:
                doc.update(j.result.as_json())
            else:
                # Complete before this run, or empty and made: complete, interrupted or not.
                doc["complete"] = j.error is None
                doc["bytes_downloaded"] = 0
            if j.error is not None:
                doc["complete"] = False
                doc["error"] = j.error
            files.append(doc)
        overall = {
            "complete": not failed and not stop_event.is_set(),
            "collection_hash": coll.collection_hash.hex(),
            "count": count,
            "complete_files": count - len(failed),
            "bytes_downloaded": downloaded,
            "seconds": round(seconds, 4),
            "files": files,
        }
        print(json.dumps(overall), flush=True)
    if stop_event.is_set():
        return EXIT_INTERRUPTED
    if failed:
        return EXIT_FAILED
    if args.seed:
        announcer = Announcer(tracker_addrs, my_ip, server.address[1])
        for j in jobs:
            announcer.add(j.cf.cascade_hash)
        announcer.start()
        log.info("seeding %s; stop with Ctrl-C", out_path.name)
        try:
            stop_wait()
        finally:
            announcer.stop()
    return EXIT_OK
