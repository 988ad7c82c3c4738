"""Collections: one file that describes a folder of data files (docs/collection-format.md).

Pure code: bytes in, a :class:`Collection` out, and back; no file I/O. Every
member is a plain v1 ``.cascade`` embedded byte for byte, so its cascade hash,
and therefore its swarm, is the same as when the file is shared alone.

The path checks here are the one gate every member path passes, whoever makes
or reads a collection: :func:`parse_collection`, ``cascade create DIR`` (through
:func:`normalise_member_path` and :func:`check_tree`, before it hashes anything)
and a fetch before it writes. A path that passes :func:`check_member_path` is
relative, in NFC, has no empty, ``.`` or ``..`` component, and is a valid name on
Linux, Windows and macOS, so joined under any folder it stays inside it.
"""

from __future__ import annotations

import functools
import hashlib
import re
import struct
import unicodedata
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise

from cascade import metafile
from cascade.errors import CollectionError, MetafileError
from cascade.metafile import (
    COLLECTION_MAGIC,
    HASH_SIZE,
    HEADER_SIZE,
    MAX_DATA_LENGTH,
    MAX_METAFILE_SIZE,
    block_count_for,
    parse_cascade,
)
from cascade.metafile import MAX_COLLECTION_SIZE as MAX_COLLECTION_SIZE
from cascade.metafile import looks_like_collection as looks_like_collection

MAGIC = COLLECTION_MAGIC  # defined beside the .cascade magic, to tell the two apart
VERSION = 1
_HEADER = struct.Struct(">8sII")  # magic, format version, member count
_PATH_LENGTH = struct.Struct(">H")
_CASCADE_LENGTH = struct.Struct(">I")
COLLECTION_HEADER_SIZE = _HEADER.size
# The smallest member on the wire: a 1-byte path and a header-only .cascade (an empty file).
MIN_MEMBER_SIZE = _PATH_LENGTH.size + 1 + _CASCADE_LENGTH.size + HEADER_SIZE

# Limits, checked before anything is allocated for what a length field claims.
# Arbitrary but argued in docs/collection-format.md: far above real trees, low
# enough that a parsed collection fits in memory (~400 bytes per member).
MAX_MEMBERS = 1 << 20
# MAX_COLLECTION_SIZE (1 GiB) is in cascade.metafile, with the magic.
MAX_TOTAL_LENGTH = MAX_DATA_LENGTH  # the sum of the members' lengths, 1 PiB like one file
MAX_PATH_BYTES = 4096  # Linux PATH_MAX
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux, macOS and (in UTF-16 units, so more) Windows
MAX_DEPTH = 128
assert MAX_METAFILE_SIZE < 1 << 32, "a member's .cascade length must fit its u32 field"
assert MAX_PATH_BYTES < 1 << 16, "a path length must fit its u16 field"

# Names Windows reserves for devices, with or without an extension, in any case
# (COM0/LPT0 and the superscript digits are in Microsoft's current list).
_WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {port + digit for port in ("COM", "LPT") for digit in "0123456789\u00b9\u00b2\u00b3"}
)
# One search finds any character a member path may not hold: C0 and C1 controls and
# DEL; what Windows refuses in a name (<>:"|?* and the backslash, its separator);
# the line and paragraph separators; the bidirectional controls, which make a name
# display as another ("gpj.exe" shown as "exe.jpg").
_BAD_CHAR = re.compile('[\x00-\x1f\x7f-\x9f<>:"|?*\\\\\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]')
# Windows can give a file a second, short (8.3) name, "PROGRA~1" for "Program Files";
# a member spelt like one could open another member there.
_SHORT_NAME = re.compile(r"[^.~]{1,6}~[0-9]{1,6}(\.[^.]{0,3})?")
# Code points HFS+ ignores when it compares names (the list git checks since
# CVE-2014-9390): "a\u200db" and "ab" are one file there.
_HFS_IGNORED = dict.fromkeys(
    [0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0xFEFF, *range(0x206A, 0x2070)]
)
_SHOW_LIMIT = 120


def shown(text: str | bytes, code_points: bool = False) -> str:
    """``repr`` of a name from a stranger or from disk, so no control character reaches the terminal, cut short.

    A long one keeps its start and its end (a path's file name). ``code_points``
    escapes every non-ASCII character, for two spellings that print alike.
    """
    text = ascii(text) if code_points else repr(text)
    if len(text) <= _SHOW_LIMIT:
        return text
    tail = _SHOW_LIMIT // 3
    return text[: _SHOW_LIMIT - tail - 3] + "..." + text[-tail:]


def _char_fault(ch: str) -> str:
    if ch == "\\":
        return "has a backslash, a path separator on Windows"
    if ch == ":":
        return "has ':', a drive or stream separator on Windows and a separator on macOS"
    if ch in '<>"|?*':
        return f"has {ch!r}, which Windows does not allow in a name"
    if unicodedata.category(ch) == "Cc":
        return f"has the control character {ch!r}"
    return f"has the invisible character {ch!r}, which can make a name display as another"


def _component_fault(comp: str) -> str | None:
    if comp == "":
        return "has an empty component (a leading, trailing or doubled '/')"
    if comp in (".", ".."):
        return f"has a {comp!r} component"
    if len(comp.encode("utf-8")) > MAX_COMPONENT_BYTES:
        return f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
    if comp[-1] in ". ":
        return f"has the component {shown(comp)}, ending in {comp[-1]!r}: Windows strips it, so two names become one"
    base = comp.split(".", 1)[0]
    if base.rstrip(" ").upper() in _WINDOWS_DEVICES:
        return f"has the component {shown(comp)}, a device name reserved on Windows"
    if len(base) <= 8 and comp.isascii() and _SHORT_NAME.fullmatch(comp):
        return f"has the component {shown(comp)}, shaped like a Windows short name, which can open another file"
    return None


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def check_member_path(path: str, folders: set[str] | None = None) -> str:
    """Return ``path`` unchanged if it is a safe member path, else raise :class:`CollectionError`.

    Safe means: '/'-separated, relative, in Unicode NFC, at most ``MAX_PATH_BYTES``
    bytes of UTF-8 and ``MAX_DEPTH`` components, each component at most
    ``MAX_COMPONENT_BYTES`` bytes, not empty, ``.`` or ``..``, and a valid name on
    Linux, Windows and macOS. The message names the path, escaped. ``folders``: folder
    names already found sound, not checked again (see :func:`_path_fault`).
    """
    fault = _path_fault(path, folders)
    if fault is not None:
        raise CollectionError(f"path {shown(path)} {fault}")
    return path


def _path_fault(path: str, folders: set[str] | None = None) -> str | None:
    """What makes ``path`` unsafe, or None; ``folders`` holds folder names already found sound (skipped, added to)."""
    if path == "":
        return "is empty"
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (a name that was not UTF-8 on disk?)"
    if size > MAX_PATH_BYTES:
        return f"is {size} bytes long, more than the limit of {MAX_PATH_BYTES}"
    if path.startswith("/"):
        return "is absolute"
    bad = _BAD_CHAR.search(path)
    if bad is not None:
        return _char_fault(bad.group())
    if not unicodedata.is_normalized("NFC", path):
        spelled, nfc = shown(path, code_points=True), shown(_nfc(path), code_points=True)
        return f"is not in Unicode NFC form (it is {spelled}, NFC is {nfc})"
    components = path.split("/")
    if len(components) > MAX_DEPTH:
        return f"has {len(components)} components, more than the limit of {MAX_DEPTH}"
    # The folder names of a tree repeat from member to member; its file names seldom do
    # (and are not kept, so the set stays as small as the tree's folder count).
    last = len(components) - 1
    for i, comp in enumerate(components):
        if folders is not None and i < last and comp in folders:
            continue
        fault = _component_fault(comp)
        if fault is not None:
            return fault
        if folders is not None and i < last:
            folders.add(comp)
    return None


def normalise_member_path(relative: str) -> str:
    """The member path for a '/'-separated relative path found on disk: its NFC form, checked.

    For ``cascade create DIR``: macOS hands out names in NFD, the format wants NFC.
    Raises :class:`CollectionError` if the normalised path is not safe.
    """
    return check_member_path(_nfc(relative))


def fold_name(component: str) -> str:
    """A path component as any case-insensitive or normalising file system may see it.

    Unicode's canonical caseless match, NFD(casefold(NFD(x))), after dropping what
    HFS+ ignores: wider than what any one file system folds (Windows does not
    normalise; none folds "ß" to "ss"), so a tree that passes is safe on all of
    them, and a few pairs that one of them could hold are refused.
    """
    if component.isascii():
        # The same, for less: no ignored code point is ASCII, NFD leaves ASCII as it is,
        # and ASCII folds as it lowers.
        return component.lower()
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", component.translate(_HFS_IGNORED)).casefold())


@dataclass(frozen=True, slots=True)
class Clash:
    """Two member paths that one case-insensitive or normalising file system cannot hold together."""

    first: str
    second: str
    directory: bool  # True: one needs as a directory a name the other has as a file

    def describe(self) -> str:
        first, second = shown(self.first), shown(self.second)
        if _nfc(self.first) == _nfc(self.second):  # two spellings that print alike: show their code points
            first, second = shown(self.first, code_points=True), shown(self.second, code_points=True)
        if self.directory:
            return (
                f"{first} and {second} need the same name as both a file and a directory"
                " (after case folding and Unicode normalisation)"
            )
        return f"{first} and {second} would be the same file on a case-insensitive or Unicode-normalising file system"


def find_clash(paths: Iterable[str]) -> Clash | None:
    """A pair of ``paths`` that would clash on a case-insensitive, normalising file system, or None.

    Two paths clash when they are equal after case folding and normalisation, or
    when one needs as a directory what the other has as a file ("a" and "A/b").
    ``first`` is the one met first. Meant for paths that passed
    :func:`check_member_path` (no NUL). Raises nothing.
    """
    # Fold every path, with '/' as NUL, the smallest character and one no checked
    # name holds, then sort: a path's successor is then either its equal or, if any
    # path lies under it, such a path. One sort instead of a tree of every
    # directory keeps the memory at one string per path.
    given = list(paths)
    keys = [
        # An ASCII path folds per component as it lowers whole (see fold_name).
        path.lower().replace("/", "\0") if path.isascii() else "\0".join(fold_name(c) for c in path.split("/"))
        for path in given
    ]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    for i, j in pairwise(order):
        a, b = keys[i], keys[j]
        if b == a or b.startswith(a + "\0"):
            return Clash(given[min(i, j)], given[max(i, j)], directory=b != a)
    return None


def check_tree(paths: Iterable[str]) -> list[str]:
    """Normalise and check the relative paths of a tree; return them in collection order.

    The cheap checks ``cascade create DIR`` runs before hashing anything: every
    path (:func:`normalise_member_path`), the member count, no duplicate and no
    clash. Raises :class:`CollectionError` naming the first offending path.
    """
    members: list[str] = []
    # NFC path -> the spellings found that were not NFC (rare: names from a Mac), so that
    # two names that become one say so, instead of "appears twice" of a name seen once.
    respelt: dict[str, list[str]] = {}
    for path in paths:
        member = normalise_member_path(path)
        if member != path:
            respelt.setdefault(member, []).append(path)
        members.append(member)
        if len(members) > MAX_MEMBERS:
            raise CollectionError(f"more than {MAX_MEMBERS} files, the limit of one collection")
    if not members:
        raise CollectionError("no files: a collection needs at least one")
    members.sort()
    for a, b in pairwise(members):
        if a == b and a in respelt:
            first, second = ([a] + respelt[a])[-2:] if len(respelt[a]) == 1 else respelt[a][:2]
            raise CollectionError(
                f"{shown(first, code_points=True)} and {shown(second, code_points=True)} are one name in Unicode NFC,"
                " the form a collection keeps (and macOS sees): rename one"
            )
    _refuse_duplicates_and_clashes(members)
    return members


def _refuse_duplicates_and_clashes(ordered: list[str]) -> None:
    for a, b in pairwise(ordered):
        if a == b:
            raise CollectionError(f"path {shown(a)} appears twice")
    clash = find_clash(ordered)
    if clash is not None:
        raise CollectionError(clash.describe())


@dataclass(frozen=True, slots=True)
class Member:
    """One data file of a collection: its path and its ``.cascade`` bytes, exactly.

    Constructing a member checks both (:func:`check_member_path`, :func:`parse_cascade`)
    and raises :class:`CollectionError`. The fields after ``cascade`` are read from it.
    """

    path: str
    cascade: bytes = field(repr=False)
    data_length: int = field(init=False)
    block_size: int = field(init=False)
    cascade_hash: bytes = field(init=False, repr=False)
    # The parsed .cascade, kept when the collection was parsed with keep_files (see cascade_file).
    _file: metafile.CascadeFile | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_member_path(self.path)
        self._take(_member_cascade(self.path, self.cascade))

    def _take(self, cf: metafile.CascadeFile) -> None:
        object.__setattr__(self, "data_length", cf.data_length)
        object.__setattr__(self, "block_size", cf.block_size)
        object.__setattr__(self, "cascade_hash", cf.cascade_hash)

    @classmethod
    def _checked(cls, path: str, cascade: bytes, cf: metafile.CascadeFile, keep: bool) -> Member:
        """The member of ``path`` (checked by the caller) and ``cascade`` (parsed into ``cf``, kept if ``keep``)."""
        member = object.__new__(cls)
        object.__setattr__(member, "path", path)
        object.__setattr__(member, "cascade", cascade)
        object.__setattr__(member, "_file", cf if keep else None)
        member._take(cf)
        return member

    def cascade_file(self) -> metafile.CascadeFile:
        """The member's ``.cascade``, parsed (on demand unless kept: it holds a second copy of the hashes)."""
        if self._file is not None:
            return self._file
        return parse_cascade(self.cascade, functools.partial(_cascade_source, self.path))


def _cascade_source(path: str) -> str:
    return f"the .cascade of {shown(path)}"


def _member_cascade(path: str, cascade: bytes) -> metafile.CascadeFile:
    """The parsed ``.cascade`` of the member at ``path``; raises :class:`CollectionError` naming it."""
    try:
        return parse_cascade(cascade, functools.partial(_cascade_source, path))
    except MetafileError as exc:
        raise CollectionError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class Collection:
    """A parsed collection: its members in order of their UTF-8 paths, and its name.

    ``collection_hash`` is the SHA-256 of the collection file's bytes, ``size`` their count.
    """

    members: tuple[Member, ...]
    collection_hash: bytes
    size: int

    @property
    def total_length(self) -> int:
        """The sum of the members' data lengths."""
        return sum(m.data_length for m in self.members)

    def find(self, path: str) -> Member | None:
        """The member at ``path`` (exactly, no folding), or None."""
        # str order is code point order, which is UTF-8 byte order: the order of the file.
        i = bisect_left(self.members, path, key=lambda m: m.path)
        return self.members[i] if i < len(self.members) and self.members[i].path == path else None


def collection_hash(data: bytes) -> bytes:
    """The name of a collection: the SHA-256 of its file's bytes. Raises nothing."""
    return hashlib.sha256(data).digest()


def member_size(path: str, data_length: int, block_size: int) -> int:
    """Bytes one member takes in a collection file (to refuse a too-big tree before hashing it)."""
    cascade = HEADER_SIZE + HASH_SIZE * block_count_for(data_length, block_size)
    return _PATH_LENGTH.size + len(path.encode("utf-8")) + _CASCADE_LENGTH.size + cascade


def serialize_collection(members: Iterable[Member]) -> bytes:
    """The bytes of the collection of ``members``, in canonical order.

    The same members give the same bytes whatever their order, so the same tree
    has the same collection hash. Raises :class:`CollectionError` for no member,
    too many, a duplicate or clashing path, or a result over the size limits.
    """
    ordered = sorted(members, key=lambda m: m.path)
    if not ordered:
        raise CollectionError("a collection needs at least one member")
    if len(ordered) > MAX_MEMBERS:
        raise CollectionError(f"{len(ordered)} members exceed the limit of {MAX_MEMBERS}")
    _refuse_duplicates_and_clashes([m.path for m in ordered])
    total = sum(m.data_length for m in ordered)
    if total > MAX_TOTAL_LENGTH:
        raise CollectionError(f"the members hold {total} bytes, more than the limit of {MAX_TOTAL_LENGTH}")
    parts = [_HEADER.pack(MAGIC, VERSION, len(ordered))]
    size = COLLECTION_HEADER_SIZE
    for m in ordered:
        path = m.path.encode("utf-8")
        parts += [_PATH_LENGTH.pack(len(path)), path, _CASCADE_LENGTH.pack(len(m.cascade)), m.cascade]
        size += _PATH_LENGTH.size + len(path) + _CASCADE_LENGTH.size + len(m.cascade)
        if size > MAX_COLLECTION_SIZE:
            raise CollectionError(f"the collection would be larger than the limit of {MAX_COLLECTION_SIZE} bytes")
    return b"".join(parts)


def parse_collection(data: bytes, source: str = "<bytes>", *, keep_files: bool = False) -> Collection:
    """Parse and validate the bytes of a collection file.

    Every length field is checked against the limits and against the bytes left
    before anything is sliced; every member path is checked as by
    :func:`check_member_path` and :func:`find_clash`. With ``keep_files`` each
    member keeps its parsed ``.cascade`` (:meth:`Member.cascade_file` is then free;
    the block hashes are held twice): for a caller that needs every member's.
    Raises :class:`CollectionError` naming ``source``, the member and the fault.
    """

    def fail(message: str) -> CollectionError:
        return CollectionError(f"{source}: {message}")

    size = len(data)
    if size > MAX_COLLECTION_SIZE:
        raise fail(f"larger than any valid collection ({size} bytes, the limit is {MAX_COLLECTION_SIZE})")
    if size < COLLECTION_HEADER_SIZE:
        raise fail(f"too short to be a collection ({size} bytes, the header alone is {COLLECTION_HEADER_SIZE})")
    magic, version, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        hint = ": it is a single-file .cascade" if magic == metafile.MAGIC else ""
        raise fail(f"not a collection (magic is {magic!r}, expected {MAGIC!r}){hint}")
    if version != VERSION:
        raise fail(f"collection format version {version}; this client reads version {VERSION} only")
    if count == 0:
        raise fail("has no members")
    if count > MAX_MEMBERS:
        raise fail(f"{count} members exceed the limit of {MAX_MEMBERS}")
    if count * MIN_MEMBER_SIZE > size - COLLECTION_HEADER_SIZE:
        raise fail(f"{count} members cannot fit in {size} bytes (each takes at least {MIN_MEMBER_SIZE})")
    members: list[Member] = []
    offset = COLLECTION_HEADER_SIZE
    total = 0
    folders: set[str] = set()  # folder names found sound (see _path_fault)
    for index in range(count):
        where = f"member {index + 1} of {count}"
        if size - offset < _PATH_LENGTH.size:
            raise fail(f"{where}: truncated in its path length")
        (path_length,) = _PATH_LENGTH.unpack_from(data, offset)
        offset += _PATH_LENGTH.size
        if path_length == 0:
            raise fail(f"{where}: empty path")
        if path_length > MAX_PATH_BYTES:
            raise fail(f"{where}: path length {path_length} exceeds the limit of {MAX_PATH_BYTES} bytes")
        if size - offset < path_length:
            raise fail(f"{where}: truncated in its path ({size - offset} of {path_length} bytes)")
        raw_path = bytes(data[offset : offset + path_length])
        offset += path_length
        try:
            path = raw_path.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(f"{where}: path {shown(raw_path)} is not valid UTF-8") from None
        if size - offset < _CASCADE_LENGTH.size:
            raise fail(f"{where} {shown(path)}: truncated in its .cascade length")
        (cascade_length,) = _CASCADE_LENGTH.unpack_from(data, offset)
        offset += _CASCADE_LENGTH.size
        if not HEADER_SIZE <= cascade_length <= MAX_METAFILE_SIZE:
            raise fail(
                f"{where} {shown(path)}: .cascade length {cascade_length} is outside {HEADER_SIZE}..{MAX_METAFILE_SIZE}"
            )
        if size - offset < cascade_length:
            raise fail(f"{where} {shown(path)}: truncated in its .cascade ({size - offset} of {cascade_length} bytes)")
        cascade = bytes(data[offset : offset + cascade_length])
        try:
            # The checks of Member(path, cascade), the path's first, with the folder names remembered.
            check_member_path(path, folders)
            member = Member._checked(path, cascade, _member_cascade(path, cascade), keep_files)
        except CollectionError as exc:
            raise fail(f"{where}: {exc}") from exc
        if members and path <= members[-1].path:
            previous = shown(members[-1].path)
            raise fail(
                f"{where}: path {shown(path)} appears twice"
                if path == members[-1].path
                else f"{where}: path {shown(path)} comes after {previous}: members must be in increasing order of"
                " their UTF-8 paths"
            )
        offset += cascade_length
        total += member.data_length
        if total > MAX_TOTAL_LENGTH:
            raise fail(f"the members hold more than the limit of {MAX_TOTAL_LENGTH} bytes")
        members.append(member)
    if offset != size:
        raise fail(f"{size - offset} bytes after the last member")
    clash = find_clash(m.path for m in members)
    if clash is not None:
        raise fail(clash.describe())
    return Collection(tuple(members), collection_hash(data), size)
