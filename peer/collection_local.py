"""Collections on the local disk: read one, make one from a folder, open its members safely.

The format itself is pure code in :mod:`cascade.collection`; this module is the
file I/O around it, shared by ``cascade create/info/verify`` and ``peer seed``.

Safety: a member path comes from a stranger, and a folder on disk can hold
symbolic links. Every member is opened by :func:`open_member`, which walks the
path one component at a time from a descriptor of the folder, with
``O_NOFOLLOW`` on each component, so no symlink anywhere on the way is followed
(not even one that points back inside the folder), and only a regular file is
accepted. :func:`walk_tree` lists a folder without following symlinks either.
"""

from __future__ import annotations

import errno
import functools
import operator
import os
import stat
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cascade.collection import (
    MAX_COLLECTION_SIZE,
    MAX_DEPTH,
    MAX_MEMBERS,
    MAX_PATH_BYTES,
    Collection,
    Member,
    check_tree,
    fold_name,
    member_size,
    serialize_collection,
    shown,
)
from cascade.errors import CollectionError, DataError, StartError, UsageError, from_os_error
from cascade.metafile import CascadeFile
from peer.localdata import DataCheck, Progress, check_data, create_metafile, default_workers
from peer.storage import DiskSignature, signature_at

_T = TypeVar("_T")
_R = TypeVar("_R")

# Files at least this large are hashed one at a time with every core on their
# blocks; smaller ones are hashed side by side, one core each, so a tree of
# thousands of small files keeps every core busy too. Arbitrary: a few chunks
# of peer.localdata (4 MiB each).
BIG_FILE = 16 << 20

# Folders are walked relative to directory descriptors with O_NOFOLLOW on every component.
# Windows has neither (nor dir_fd): there a folder cannot be shared safely, and
# require_safe_tree_io() refuses it in one line rather than following links.
O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
SAFE_TREE_IO = bool(O_DIRECTORY and O_NOFOLLOW) and os.open in os.supports_dir_fd
_DIR_FLAGS = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just after.
_FILE_FLAGS = os.O_RDONLY | O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)

# Where ``peer fetch`` keeps the members it has not finished, under ``--out``: a fetch
# refuses a collection holding this name at its top, in any case, so none is made with it.
PARTIAL_DIR = ".cascade-partial"
# The name as names are compared (folded as the clash check folds: ".cascade\u200c-partial"
# is this folder on HFS+).
PARTIAL_DIR_FOLDED = fold_name(PARTIAL_DIR)


def refuse_foreign_folder(folder: Path, collection: Collection) -> None:
    """Refuse ``folder`` as a fetch's default output if it holds what the collection does not.

    ``peer fetch`` without ``--out`` writes into a folder named by the collection
    file, or, for a URL, by the tracker: a stranger's choice, which could be one
    of the user's own folders (``bin``). Such a folder is taken only when it is
    absent, empty, or holds nothing at its top but the collection's own names and
    ``.cascade-partial`` (an earlier run of this fetch, to resume or to complete).
    Names are compared folded, as the clash check does. Raises :class:`DataError`
    naming the first foreign entry; a folder that cannot be listed is left to the
    fetch, which says why it cannot use it.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    ours = {fold_name(m.path.split("/", 1)[0]) for m in collection.members} | {PARTIAL_DIR_FOLDED}
    for name in sorted(names):
        if fold_name(name) not in ours:
            raise DataError(
                f"{folder}: exists and holds {shown(name)}, which this collection does not;"
                f" fetch into a new folder, or give --out {folder} to add the collection's files to it"
            )


# --- opening members without following symlinks ---------------------------------


def require_safe_tree_io() -> None:
    """Raise :class:`UsageError` where folders cannot be walked without following symlinks (Windows)."""
    if not SAFE_TREE_IO:
        raise UsageError(
            "sharing a folder needs O_NOFOLLOW and directory-relative opens, which this system lacks "
            "(Windows); share single files here, or create and fetch the folder on Linux or macOS"
        )


def open_root(folder: Path, what: str = "the collection's folder") -> int:
    """A descriptor of ``folder`` (which may itself be a symlink the user named). Raises :class:`DataError`."""
    require_safe_tree_io()
    try:
        return os.open(folder, os.O_RDONLY | O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise DataError(f"{folder}: no such folder ({what})") from exc
    except NotADirectoryError as exc:
        raise DataError(f"{folder}: not a folder ({what})") from exc
    except OSError as exc:
        raise from_os_error(exc, folder, "open the folder") from exc


class MemberMissing(DataError):
    """A member's file is not there (or a folder on its way is not)."""


def open_member(root_fd: int, path: str, shown: Path | Callable[[], Path], *, respell: bool = True) -> int:
    """Open member ``path`` ('/'-separated, checked) under ``root_fd`` for reading; returns a descriptor.

    No component is followed if it is a symlink, and only a regular file is
    accepted. ``shown`` names the file in messages, or makes the name when one is
    needed (a seeder reopens members thousands of times a second, and a Path each
    costs more than the open). A member path is NFC, but a file on a disk that
    does not normalise names (Linux) may be spelt otherwise, NFD from a Mac, say:
    with ``respell``, a non-ASCII path not found as spelt is looked up by its NFC
    form (:func:`disk_spelling`). Raises :class:`MemberMissing` when it is not
    there, :class:`DataError` for a symlink, a special file or another error.
    """
    try:
        return _open_member_as_spelt(root_fd, path, shown)
    except MemberMissing:
        if not respell or path.isascii():
            raise
        spelt = disk_spelling(root_fd, path)
        if spelt is None or spelt == path:
            raise
        return _open_member_as_spelt(root_fd, spelt, shown)


def disk_spelling(root_fd: int, path: str) -> str | None:
    """How member ``path`` is spelt on disk under ``root_fd`` when not exactly so, else ``path``; None when absent.

    Each component not found as spelt is matched by its NFC form against the
    names in its folder (only then is the folder listed). Two names with one NFC
    form (possible on Linux) match neither: which one the collection meant cannot
    be told. Folders are entered without following symlinks. Raises nothing.
    """
    spelt: list[str] = []
    fd = root_fd
    parts = path.split("/")
    try:
        for i, comp in enumerate(parts):
            name = comp if _exists(comp, fd) else _respelt(comp, fd)
            if name is None:
                return None
            spelt.append(name)
            if i < len(parts) - 1:
                nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if fd != root_fd:
                    os.close(fd)
                fd = nfd
    except OSError:
        return None
    finally:
        if fd != root_fd:
            os.close(fd)
    return "/".join(spelt)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _respelt(comp: str, dir_fd: int) -> str | None:
    """The one name in folder ``dir_fd`` whose NFC form is ``comp``, or None (none, or two)."""
    if comp.isascii():
        return None  # an ASCII name has no other spelling
    found = [name for name in os.listdir(dir_fd) if not name.isascii() and _nfc(name) == comp]
    return found[0] if len(found) == 1 else None


def _open_member_as_spelt(root_fd: int, path: str, shown: Path | Callable[[], Path]) -> int:
    parts = path.split("/")
    fd = root_fd
    try:
        for i, comp in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nfd = os.open(comp, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError as exc:
                raise MemberMissing(f"{_named(shown)}: no such file") from exc
            except OSError as exc:
                where = "/".join(parts[: i + 1])
                if exc.errno == errno.ENOTDIR and _is_link(comp, fd):  # O_DIRECTORY met the link first
                    exc.errno = errno.ELOOP
                if exc.errno in (errno.ELOOP, errno.EMLINK):  # EMLINK: FreeBSD's answer to O_NOFOLLOW
                    link = f"{where!r} is a symbolic link; Cascade does not follow it"
                    raise DataError(f"{_named(shown)}: {link}") from exc
                if exc.errno == errno.ENOTDIR:
                    raise DataError(f"{_named(shown)}: {where!r} is not a folder") from exc
                raise from_os_error(exc, _named(shown), "open") from exc
            if fd != root_fd:
                os.close(fd)
            fd = nfd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{_named(shown)}: not a regular file")
        os.set_blocking(fd, True)
        result, fd = fd, root_fd
        return result
    finally:
        if fd != root_fd:
            os.close(fd)


def _named(shown: Path | Callable[[], Path]) -> Path:
    return shown if isinstance(shown, Path) else shown()


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


# --- making a collection from a folder ---------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeFile:
    """A regular file found under the folder: its member path (NFC) and its path as on disk."""

    path: str
    on_disk: str
    size: int


@dataclass(slots=True)
class Tree:
    """What :func:`walk_tree` found: the files, in collection order, and what it skipped (one line each)."""

    files: list[TreeFile]
    skipped: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)


def walk_tree(folder: Path) -> Tree:
    """List the regular files under ``folder``, following no symlink; check their paths as members.

    Symlinks, special files (FIFOs, sockets, devices) and a top-level
    ``.cascade-partial`` (an unfinished fetch's) are skipped, each with
    a line in ``skipped``; empty folders hold no file and so are not in the
    result. Raises :class:`CollectionError` for a path no collection may hold
    (as :func:`cascade.collection.check_tree`), too many files or too deep a
    tree, and :class:`DataError` when a folder cannot be read.
    """
    found: list[tuple[str, int]] = []
    skipped: list[str] = []
    stack: list[tuple[str, int]] = [("", 0)]
    while stack:
        rel, depth = stack.pop()
        where = folder / rel if rel else folder
        try:
            with os.scandir(where) as it:
                entries = list(it)
        except OSError as exc:
            raise from_os_error(exc, where, "list the folder") from exc
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if not rel and fold_name(entry.name) == PARTIAL_DIR_FOLDED:
                    skipped.append(
                        f"{child!r} holds the parts of an unfinished fetch: skipped (no fetch takes the name)"
                    )
                elif entry.is_symlink():
                    skipped.append(f"{child!r} is a symbolic link: skipped (collections hold no links)")
                elif entry.is_dir(follow_symlinks=False):
                    if depth + 1 >= MAX_DEPTH:
                        raise CollectionError(f"{folder}: {shown(child)} is deeper than {MAX_DEPTH} folders")
                    size = len(child.encode("utf-8", "surrogateescape"))
                    if size >= MAX_PATH_BYTES:
                        # Every file under it would be refused; and listing it could pass the
                        # system's PATH_MAX, a line of 4 KB saying "File name too long".
                        raise CollectionError(
                            f"{folder}: the folder {shown(child)} is {size} bytes long: a path under it would be"
                            f" longer than the limit of {MAX_PATH_BYTES}"
                        )
                    stack.append((child, depth + 1))
                elif entry.is_file(follow_symlinks=False):
                    found.append((child, entry.stat(follow_symlinks=False).st_size))
                    if len(found) > MAX_MEMBERS:
                        raise CollectionError(f"{folder}: more than {MAX_MEMBERS} files, the limit of one collection")
                else:
                    skipped.append(f"{child!r} is not a regular file (a FIFO, socket or device): skipped")
            except OSError as exc:
                raise from_os_error(exc, folder / child, "look at") from exc
    try:
        paths = check_tree(p for p, _ in found)
    except CollectionError as exc:
        raise CollectionError(f"{folder}: {exc}") from exc
    # check_tree refused duplicates after NFC, so each member path has one name on disk.
    by_member = {_nfc(p): (p, size) for p, size in found}
    files = [TreeFile(m, *by_member[m]) for m in paths]
    return Tree(files, skipped)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# One block size for every member, or a function of a member's length giving its own.
BlockSizeRule = int | Callable[[int], int]


def member_block_size(rule: BlockSizeRule, length: int) -> int:
    """The block size ``rule`` gives a member of ``length`` bytes."""
    return rule if isinstance(rule, int) else rule(length)


def collection_size(tree: Tree, block_size: BlockSizeRule) -> int:
    """The bytes the collection of ``tree`` will take (to refuse a too-big one before hashing)."""
    return 16 + sum(member_size(f.path, f.size, member_block_size(block_size, f.size)) for f in tree.files)


def create_collection(
    folder: Path,
    tree: Tree,
    block_size: BlockSizeRule,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> bytes:
    """Hash every file of ``tree`` (found under ``folder``) and return the collection's bytes.

    ``block_size`` is one size for every member or a function of a member's length.
    Each file is opened with :func:`open_member` (a file swapped for a symlink
    since the walk is refused). Memory is bounded by the hashing chunks in
    flight, not by the files' sizes. Raises :class:`DataError` (a file changed,
    vanished or became a link) and :class:`CollectionError`.
    """
    size = collection_size(tree, block_size)
    if size > MAX_COLLECTION_SIZE:
        raise CollectionError(
            f"{folder}: the collection would take {size} bytes, more than the limit of {MAX_COLLECTION_SIZE};"
            " use a larger --block-size"
        )
    root = open_root(folder, "the folder to describe")
    try:

        def one(f: TreeFile, pool_workers: int) -> Member:
            shown = folder / f.on_disk
            try:
                fd = open_member(root, f.on_disk, shown)
            except MemberMissing as exc:
                raise DataError(f"{shown}: vanished while the folder was being hashed") from exc
            try:
                size = member_block_size(block_size, f.size)
                raw = create_metafile(shown, size, workers=pool_workers, progress=progress, fd=fd)
            finally:
                os.close(fd)
            return Member(f.path, raw)

        small = [f for f in tree.files if f.size < BIG_FILE]
        big = [f for f in tree.files if f.size >= BIG_FILE]
        members: list[Member] = []
        n = workers or default_workers()
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="hash-tree") as pool:
            try:
                members.extend(_bounded_map(pool, lambda f: one(f, 1), small, 4 * n))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        for f in big:
            members.append(one(f, n))
    finally:
        os.close(root)
    return serialize_collection(members)


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[_T], _R], items: list[_T], ahead: int) -> Iterator[_R]:
    """``pool.map`` in order with at most ``ahead`` calls queued (``map`` would queue every item at once)."""
    pending: deque[Future[_R]] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.popleft().result()
        for item in it:
            pending.append(pool.submit(fn, item))
            break
        yield result


# --- checking a folder against a collection ------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberCheck:
    """What the folder holds of one member; ``check`` is ``None`` when its file is missing."""

    member: Member
    cf: CascadeFile
    check: DataCheck
    present: bool
    problem: str | None  # why the file could not be checked (a symlink, a special file), else None
    # The file as opened, before it was hashed, as peer.storage.disk_signature gives it; None when absent.
    seen: DiskSignature | None = None


def check_members(
    folder: Path,
    collection: Collection,
    *,
    whole_file: bool,
    progress: Progress | None = None,
    keep_open: bool = False,
    root_fd: int | None = None,
) -> Iterator[tuple[MemberCheck, int | None]]:
    """Check every member's file under ``folder``, several at a time, yielding in collection order.

    With ``keep_open`` each present member's descriptor is yielded too (the
    caller closes it); else ``None``. With ``root_fd`` (``folder`` held open,
    left open) the members are opened relative to it. A missing file, a
    symlink or a special file holds no block (``problem`` says why for the
    last two). Raises :class:`DataError` when ``folder`` cannot be opened or a file not read.
    """
    root = open_root(folder) if root_fd is None else root_fd
    n = default_workers()

    def one(m: Member) -> tuple[MemberCheck, int | None]:
        cf = m.cascade_file()
        shown = folder / m.path
        empty = DataCheck(bytearray(cf.block_count), 0, 0, False if whole_file else None)
        try:
            fd = open_member(root, m.path, shown)
        except MemberMissing:
            return MemberCheck(m, cf, empty, False, None), None
        except DataError as exc:
            return MemberCheck(m, cf, empty, False, str(exc)), None
        try:
            st = os.fstat(fd)
            seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            big = cf.data_length >= BIG_FILE
            check = check_data(shown, cf, whole_file=whole_file, workers=n if big else 1, progress=progress, fd=fd)
        except BaseException:
            os.close(fd)
            raise
        if not keep_open:
            os.close(fd)
            return MemberCheck(m, cf, check, True, None, seen), None
        return MemberCheck(m, cf, check, True, None, seen), fd

    try:
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="check-tree") as pool:
            try:
                yield from _bounded_map(pool, one, list(collection.members), 4 * n)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        if root_fd is None:
            os.close(root)


class HeldFolder:
    """A collection's folder held open while it is seeded: its members are opened relative to it.

    Renaming the folder, or swapping it for a link, does not change what is
    served. Raises :class:`DataError` when the folder cannot be opened.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder
        self.fd = open_root(folder)
        # Member paths found spelt otherwise on disk (see open_member), so that the
        # folder is listed once for such a member, not at every opening.
        self._spelt: dict[str, str] = {}

    def open_member(self, path: str) -> int:
        """Open member ``path`` as :func:`open_member` does (and raises as it does)."""
        shown = functools.partial(operator.truediv, self.path, path)
        try:
            return open_member(self.fd, self._spelt.get(path, path), shown, respell=False)
        except MemberMissing:
            if self._respell(path) is None:
                raise
            return open_member(self.fd, self._spelt[path], shown, respell=False)

    def look(self, path: str) -> DiskSignature | None:
        """Member ``path``'s signature (its last component not followed); ``None`` when it is gone."""
        seen = signature_at(self.fd, self._spelt.get(path, path))
        if seen is None and self._respell(path) is not None:
            seen = signature_at(self.fd, self._spelt[path])
        return seen

    def _respell(self, path: str) -> str | None:
        """Find ``path`` spelt otherwise on disk, remember and return the spelling; None when there is no new one."""
        if path.isascii():
            return None
        spelt = disk_spelling(self.fd, path)
        if spelt is None or spelt == self._spelt.get(path, path):
            return None
        self._spelt[path] = spelt
        return spelt

    def close(self) -> None:
        os.close(self.fd)


# Descriptors kept free for connections (a socket and at most one file being sent
# each), the listener and the trackers beyond the files held open (arbitrary; the
# server caps its connections at 512 by default).
_SPARE_DESCRIPTORS = 1024


def raise_file_limit(files: int) -> None:
    """Raise the soft limit of open files to hold ``files`` data files open at once besides the connections.

    ``peer fetch`` of a collection passes its member count (each member is
    served from its own descriptor); ``peer seed`` its cap of files held open.

    Raises :class:`StartError` when even the hard limit is too low.
    """
    if not files:
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = files + _SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            raise StartError(
                f"serving {files} files at once needs about {need} open files; this system allows {hard} (ulimit -n)"
            )
