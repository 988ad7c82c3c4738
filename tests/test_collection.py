"""The collection format (docs/collection-format.md): layout, every malformed case, the path checks, fuzz."""

from __future__ import annotations

import hashlib
import json
import ntpath
import posixpath
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.collection import (
    MAX_COMPONENT_BYTES,
    MAX_DEPTH,
    MAX_MEMBERS,
    MAX_PATH_BYTES,
    MIN_MEMBER_SIZE,
    Clash,
    Collection,
    Member,
    check_member_path,
    check_tree,
    collection_hash,
    find_clash,
    fold_name,
    looks_like_collection,
    member_size,
    normalise_member_path,
    parse_collection,
    serialize_collection,
    shown,
)
from cascade.errors import CascadeError, CollectionError, MetafileError
from cascade.metafile import MAX_METAFILE_SIZE

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def be(n: int, size: int) -> bytes:
    """An unsigned big-endian field of ``size`` bytes, as both formats write every integer."""
    return n.to_bytes(size, "big")


def reference_cascade(data: bytes, block_size: int) -> bytes:
    """PROTOCOL.md section 1, written out independently of the code under test."""
    header = b"CASCADE1" + bytes(8) + be(len(data), 8) + be(block_size, 8) + hashlib.sha256(data).digest()
    blocks = b"".join(hashlib.sha256(data[i : i + block_size]).digest() for i in range(0, len(data), block_size))
    return header + blocks


def reference_collection(entries: list[tuple[bytes, bytes]], count: int | None = None, version: int = 1) -> bytes:
    """docs/collection-format.md, written out independently: entries of (UTF-8 path, .cascade bytes), as given."""
    out = b"CASCCOLL" + be(version, 4) + be(len(entries) if count is None else count, 4)
    for path, cascade in entries:
        out += be(len(path), 2) + path + be(len(cascade), 4) + cascade
    return out


HELLO = reference_cascade(b"hello\n", 4)  # 2 blocks, the second 2 bytes
EMPTY = reference_cascade(b"", 1 << 20)  # header only
SMALL = reference_collection([(b"README", EMPTY), (b"notes/a.txt", HELLO)])

# The example of docs/collection-format.md: if this changes, the format changed.
SMALL_HASH = "e7260211449cf4445b437cf70e4235172793bfac9ae3af2b7a6031d84c6d535f"


def test_small_example_layout() -> None:
    assert len(SMALL) == 16 + (2 + 6 + 4 + 64) + (2 + 11 + 4 + 128) == 237
    c = parse_collection(SMALL)
    assert [m.path for m in c.members] == ["README", "notes/a.txt"]
    assert [(m.data_length, m.block_size) for m in c.members] == [(0, 1 << 20), (6, 4)]
    assert c.members[1].cascade == HELLO
    assert c.members[1].cascade_hash == hashlib.sha256(HELLO).digest()
    assert c.collection_hash == hashlib.sha256(SMALL).digest() == collection_hash(SMALL)
    assert c.size == len(SMALL)
    assert c.total_length == 6
    assert c.find("notes/a.txt") == c.members[1]
    assert c.find("NOTES/a.txt") is None
    assert c.find("zzz") is None
    assert c.members[1].cascade_file().block_length(1) == 2
    assert looks_like_collection(SMALL) and not looks_like_collection(HELLO)


def test_small_example_matches_the_doc() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "collection-format.md").read_text()
    assert SMALL_HASH in doc
    assert parse_collection(SMALL).collection_hash.hex() == SMALL_HASH
    hexdump = "".join(line.split("|")[0].split(maxsplit=1)[1] for line in _doc_block(doc, "hexdump").splitlines())
    assert bytes.fromhex(hexdump) == SMALL


def _doc_block(doc: str, tag: str) -> str:
    start = doc.index(f"<!-- {tag} -->")
    body = doc[start:].split("```", 2)[1]
    return body.split("\n", 1)[1]


def test_serialize_is_canonical_and_round_trips() -> None:
    a = Member("notes/a.txt", HELLO)
    b = Member("README", EMPTY)
    assert serialize_collection([a, b]) == serialize_collection([b, a]) == SMALL
    c = parse_collection(SMALL)
    assert serialize_collection(c.members) == SMALL
    assert c.members == (b, a)


def test_member_size_predicts_the_encoding() -> None:
    assert 16 + member_size("README", 0, 1 << 20) + member_size("notes/a.txt", 6, 4) == len(SMALL)
    assert member_size("é", 1000, 64) == 2 + 2 + 4 + 64 + 16 * 32


def test_vectors_as_members(shared_vectors: Path) -> None:
    expected = json.loads((shared_vectors / "expected.json").read_text())
    members = [
        Member(f"shakespeare/{name.removesuffix('.cascade')}", (shared_vectors / name).read_bytes())
        for name in expected
    ]
    raw = serialize_collection(members)
    c = parse_collection(raw)
    assert len(c.members) == len(expected)
    for name, want in expected.items():
        m = c.find(f"shakespeare/{name.removesuffix('.cascade')}")
        assert m is not None
        # Embedded byte for byte: the member's cascade hash is the one old clients know.
        assert m.cascade == (shared_vectors / name).read_bytes()
        assert m.cascade_hash.hex() == want["cascade_hash"]
        assert (m.data_length, m.block_size) == (want["data_length"], want["block_size"])


# Paths that must pass, unchanged.
GOOD_PATHS = [
    "a",
    "a/b/c.txt",
    ".hidden",
    "dir/.gitignore",
    "a.b.c",
    "..a",
    "a..b",
    " leading space",
    "-dash",
    "~tilde",
    "a b/c d",
    "CONSOLE.txt",  # only the exact device names are reserved
    "COM10",
    "backup~",
    "longer-name~1.txt",  # not the shape of a short name
    "a~b",
    "LPT",
    "auxiliary",
    "NUL_",
    "con-fig.yaml",
    "日本語/ファイル.txt",
    "émoji 👨\u200d👩\u200d👧.txt",  # the zero-width joiner inside an emoji sequence is fine
    "Straße",
    "x" * MAX_COMPONENT_BYTES,
    "é" * (MAX_COMPONENT_BYTES // 2),
    "/".join(["a"] * MAX_DEPTH),
    "/".join(["x" * 200] * 20)[: MAX_PATH_BYTES - 1] + "y",
]

# (path, a phrase the error must contain)
BAD_PATHS = [
    ("", "is empty"),
    ("/etc/passwd", "absolute"),
    ("//server/share", "absolute"),
    ("../x", "'..' component"),
    ("a/../../b", "'..' component"),
    ("a/..", "'..' component"),
    ("..", "'..' component"),
    (".", "'.' component"),
    ("a/./b", "'.' component"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("C:/Windows", "':'"),
    ("C:x", "':'"),
    ("file:stream", "':'"),
    ("a\\b", "backslash"),
    ("..\\..\\x", "backslash"),
    ("con", "reserved on Windows"),
    ("CON", "reserved on Windows"),
    ("Con.txt", "reserved on Windows"),
    ("dir/nul.tar.gz", "reserved on Windows"),
    ("com1", "reserved on Windows"),
    ("COM0", "reserved on Windows"),
    ("lpt9.log", "reserved on Windows"),
    ("COM\u00b9", "reserved on Windows"),
    ("conin$", "reserved on Windows"),
    ("CONOUT$.x", "reserved on Windows"),
    ("AUX .txt", "reserved on Windows"),
    ("a.", "ending in '.'"),
    ("...", "ending in '.'"),
    ("a ", "ending in ' '"),
    ("a/b./c", "ending in '.'"),
    ("x\x00y", "control character"),
    ("x\ny", "control character"),
    ("x\ty", "control character"),
    ("x\x1b[2Jy", "control character"),
    ("x\x7f", "control character"),
    ("x\x85", "control character"),
    ("x\u2028y", "invisible"),
    ("gpj\u202e.exe", "invisible"),
    ("\u200fa", "invisible"),
    ("\u2066a", "invisible"),
    ("a<b", "'<'"),
    ("a>b", "'>'"),
    ('a"b', "'\"'"),
    ("a|b", "'|'"),
    ("a?b", "'?'"),
    ("a*b", "'*'"),
    ("e\u0301", "NFC"),
    ("A\u030a", "NFC"),
    ("\udc80", "not valid Unicode"),
    ("x" * (MAX_COMPONENT_BYTES + 1), "longer than 255 bytes"),
    ("é" * 128, "longer than 255 bytes"),
    ("/".join(["a"] * (MAX_DEPTH + 1)), "components"),
    ("PROGRA~1", "short name"),
    ("dir/README~2.TXT", "short name"),
    ("a~1", "short name"),
    ("/".join(["x" * 200] * 21), "limit of 4096"),
]


@pytest.mark.parametrize("path", GOOD_PATHS)
def test_good_paths_pass_unchanged(path: str) -> None:
    assert check_member_path(path) == path
    assert normalise_member_path(path) == path
    assert parse_collection(reference_collection([(path.encode(), HELLO)])).members[0].path == path


@pytest.mark.parametrize(("path", "phrase"), BAD_PATHS, ids=[repr(p[:40]) for p, _ in BAD_PATHS])
def test_bad_paths_are_refused_in_one_clear_line(path: str, phrase: str) -> None:
    with pytest.raises(CollectionError) as err:
        check_member_path(path)
    message = str(err.value)
    assert phrase in message
    assert message.isprintable(), "a stranger's name must not reach the terminal raw"
    assert len(message) < 400
    with pytest.raises(CollectionError):
        Member(path, HELLO)


def test_a_long_name_is_shown_by_its_start_and_its_end() -> None:
    name = "top/" + "a" * 300 + "/\x1bfile.bin"
    text = shown(name)
    assert len(text) <= 120 and text.isprintable()
    assert text.startswith("'top/aaa") and text.endswith("\\x1bfile.bin'")  # the file name stays readable
    assert shown("short") == "'short'"


@pytest.mark.parametrize(("path", "phrase"), BAD_PATHS, ids=[repr(p[:40]) for p, _ in BAD_PATHS])
def test_parser_refuses_every_bad_path(path: str, phrase: str) -> None:
    encoded = path.encode("utf-8", "surrogateescape" if path == "\udc80" else "strict")
    if not 0 < len(encoded) <= MAX_PATH_BYTES:
        phrase = "path length" if encoded else "empty path"
    elif path == "\udc80":
        phrase = "not valid UTF-8"
    with pytest.raises(CollectionError, match=r"^x\.coll: member 1 of 1: ") as err:
        parse_collection(reference_collection([(encoded, HELLO)]), "x.coll")
    assert phrase in str(err.value)
    assert str(err.value).isprintable()


def test_normalise_turns_nfd_into_nfc() -> None:
    assert normalise_member_path("cafe\u0301/Ame\u0301lie.txt") == "caf\xe9/Am\xe9lie.txt"
    with pytest.raises(CollectionError, match="absolute"):
        normalise_member_path("/e\u0301")


@pytest.mark.parametrize(
    ("paths", "clash"),
    [
        (["a", "b", "c/a"], None),
        (["a/b", "a/c", "a/d/e"], None),
        (["a.txt", "a/b", "a"], ("a/b", "a", True)),  # "a" is also a directory
        (["a", "a/b"], ("a", "a/b", True)),
        (["A", "a/b"], ("A", "a/b", True)),
        (["x/A/b", "x/a"], ("x/A/b", "x/a", True)),
        (["README", "readme"], ("README", "readme", False)),
        (["Straße", "STRASSE"], ("Straße", "STRASSE", False)),
        (["caf\xe9", "CAFE\u0301"], ("caf\xe9", "CAFE\u0301", False)),
        (["dir/K", "DIR/\u212a"], ("dir/K", "DIR/\u212a", False)),  # the Kelvin sign folds to k
        (["a", "a"], ("a", "a", False)),
        (["ab", "A\u200db"], ("ab", "A\u200db", False)),  # HFS+ ignores the zero-width joiner
        (["x/\ufeffy/z", "X/Y"], ("x/\ufeffy/z", "X/Y", True)),
    ],
)
def test_find_clash(paths: list[str], clash: tuple[str, str, bool] | None) -> None:
    found = find_clash(paths)
    assert (found and (found.first, found.second, found.directory)) == clash


def test_clash_message_shows_code_points_when_names_print_alike() -> None:
    assert "'caf\\xe9' and 'cafe\\u0301'" in Clash("caf\xe9", "cafe\u0301", False).describe()
    assert "'A' and 'a/b' need the same name as both a file and a directory" in Clash("A", "a/b", True).describe()


def test_check_tree_sorts_normalises_and_refuses() -> None:
    assert check_tree(["b", "a/c", "e\u0301"]) == ["a/c", "b", "\xe9"]
    for paths, phrase in [
        ([], "no files"),
        (["a", "b/../a"], "'..'"),
        (["x", "\xe9", "e\u0301"], r"^'\\xe9' and 'e\\u0301' are one name in Unicode NFC"),
        (["e\u0302\u0323", "e\u0323\u0302"], r"^'e\\u0302\\u0323' and 'e\\u0323\\u0302' are one name"),
        (["a", "a"], "'a' appears twice"),
        (["Makefile", "makefile"], "same file"),
        (["a", "A/b"], "file and a directory"),
    ]:
        with pytest.raises(CollectionError, match=phrase):
            check_tree(paths)


def test_member_refuses_a_bad_cascade() -> None:
    with pytest.raises(CollectionError, match=r"the \.cascade of 'a': too short"):
        Member("a", HELLO[:63])
    with pytest.raises(CollectionError, match="expected 2 block hashes"):
        Member("a", HELLO + bytes(32))
    assert issubclass(CollectionError, MetafileError)


def test_serialize_refuses() -> None:
    with pytest.raises(CollectionError, match="at least one member"):
        serialize_collection([])
    with pytest.raises(CollectionError, match="appears twice"):
        serialize_collection([Member("a", HELLO), Member("a", EMPTY)])
    with pytest.raises(CollectionError, match="same file"):
        serialize_collection([Member("a", HELLO), Member("A", EMPTY)])
    with pytest.raises(CollectionError, match="file and a directory"):
        serialize_collection([Member("a", HELLO), Member("a/b", EMPTY)])


def header(count: int, version: int = 1, magic: bytes = b"CASCCOLL") -> bytes:
    return magic + be(version, 4) + be(count, 4)


def member(path: bytes, cascade: bytes, cascade_length: int | None = None) -> bytes:
    n = len(cascade) if cascade_length is None else cascade_length
    return be(len(path), 2) + path + be(n, 4) + cascade


BAD_CASCADE = HELLO[:24] + be(0, 8) + HELLO[32:]  # block size 0

# (name, bytes, a phrase the error must contain)
MALFORMED = [
    ("empty", b"", "too short"),
    ("header cut", SMALL[:15], "too short"),
    ("wrong magic", b"CASCOLL2" + SMALL[8:], "not a collection"),
    ("a single-file .cascade", HELLO, "it is a single-file .cascade"),
    ("version 2", header(2, version=2) + SMALL[16:], "version 2; this client reads version 1"),
    ("version 0", header(2, version=0) + SMALL[16:], "version 0"),
    ("no members", header(0), "has no members"),
    ("absurd count", header(MAX_MEMBERS + 1) + SMALL[16:], "exceed the limit"),
    ("count beyond the bytes", header(4) + SMALL[16:], "4 members cannot fit in 237 bytes"),
    ("count too small", header(1) + SMALL[16:], "bytes after the last member"),
    ("count too large", header(3) + SMALL[16:] + bytes(MIN_MEMBER_SIZE), "member 3 of 3: empty path"),
    ("trailing garbage", SMALL + b"\x00", "1 bytes after the last member"),
    ("trailing member", SMALL + member(b"z", EMPTY), "after the last member"),
    ("empty path", header(1) + member(b"", HELLO), "empty path"),
    ("path too long", header(1) + member(b"a" * 4097, HELLO), "path length 4097 exceeds"),
    ("path not UTF-8", header(1) + member(b"\xff\xfe", HELLO), "path b'\\xff\\xfe' is not valid UTF-8"),
    ("overlong UTF-8 slash", header(1) + member(b"a\xc0\xafb", HELLO), "not valid UTF-8"),
    ("UTF-8 of a surrogate", header(1) + member(b"\xed\xb2\x80", HELLO), "not valid UTF-8"),
    ("path cut", header(1) + be(4000, 2) + bytes(100), "truncated in its path (100 of 4000 bytes)"),
    ("cascade shorter than a header", header(1) + member(b"a", HELLO[:63]) + bytes(8), "outside 64.."),
    ("cascade length absurd", header(1) + member(b"a", bytes(66), MAX_METAFILE_SIZE + 1), "outside 64.."),
    ("cascade cut", header(1) + member(b"a", HELLO, 200), "truncated in its .cascade (128 of 200 bytes)"),
    ("bad embedded cascade", header(1) + member(b"a", BAD_CASCADE), "the .cascade of 'a': block size is 0"),
    ("hash list too long", header(1) + member(b"a", HELLO + bytes(32)), "expected 2 block hashes"),
    ("out of order", reference_collection([(b"b", HELLO), (b"a", HELLO)]), "'a' comes after 'b'"),
    ("duplicate", reference_collection([(b"a", HELLO), (b"a", EMPTY)]), "'a' appears twice"),
    ("case clash", reference_collection([(b"A", HELLO), (b"a", HELLO)]), "same file"),
    ("file and directory", reference_collection([(b"a", HELLO), (b"a/b", HELLO)]), "file and a directory"),
    ("folded file and dir", reference_collection([(b"A", HELLO), (b"a/b", HELLO)]), "file and a directory"),
    ("dotdot", reference_collection([(b"../../etc/passwd", HELLO)]), "'..' component"),
    ("absolute", reference_collection([(b"/etc/passwd", HELLO)]), "absolute"),
    ("escape sequence", reference_collection([(b"\x1b]0;pwned\x07", HELLO)]), "control character '\\x1b'"),
]


@pytest.mark.parametrize(("name", "raw", "phrase"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_is_refused_naming_the_file(name: str, raw: bytes, phrase: str) -> None:
    with pytest.raises(CollectionError) as err:
        parse_collection(raw, "x/data.cascade")
    message = str(err.value)
    assert message.startswith("x/data.cascade: ")
    assert phrase in message
    assert message.isprintable() and len(message) < 400


def test_every_truncation_is_refused() -> None:
    for n in range(len(SMALL)):
        with pytest.raises(CollectionError):
            parse_collection(SMALL[:n])


def test_every_single_byte_change_is_refused_or_changes_the_hash() -> None:
    for i in range(len(SMALL)):
        changed = bytearray(SMALL)
        changed[i] ^= 0x01
        try:
            c = parse_collection(bytes(changed))
        except CollectionError:
            continue
        # Accepted: only the reserved bytes or the hashes of an embedded .cascade can change unnoticed
        # here, and then the member's cascade hash and the collection hash change with them.
        assert c.collection_hash != parse_collection(SMALL).collection_hash
        assert serialize_collection(c.members) == bytes(changed)


def test_the_total_length_is_limited() -> None:
    # Two members of 2**50 - 1 bytes each in blocks of 1 GiB: each .cascade holds 2**20 hashes (32 MiB).
    big = be((1 << 50) - 1, 8) + be(1 << 30, 8)
    cascade = b"CASCADE1" + bytes(8) + big + bytes(32) + bytes(32 << 20)
    raw = reference_collection([(b"a", cascade), (b"b", cascade)])
    with pytest.raises(CollectionError, match="more than the limit of 1125899906842624 bytes"):
        parse_collection(raw)


# ---- fuzz ----------------------------------------------------------------------------------------

NASTY = ["/", ".", "..", "\\", ":", " ", "a", "A", "b", "é", "e\u0301", "\u212a", "ß", "CON", "nul", "\x00", "\n",
         "\u202e", "~", "*", "\udc80", "C:", "//", "x" * 100]  # fmt: skip
nasty_text = st.lists(st.sampled_from(NASTY) | st.text(max_size=3), max_size=12).map("".join)
# Mostly valid paths, so that accepted collections (and clashes between them) are common too.
COMPONENTS = ["a", "A", "b", "é", "ß", "ss", "x y", ".h", "~", "日本", "con", "a.", "..", ""]
plausible_path = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4).map("/".join)


def is_under(flavour: ModuleType, base: str, path: str) -> bool:
    joined: str = flavour.normpath(flavour.join(base, path))
    return joined.startswith(base + flavour.sep)


@FUZZ
@given(nasty_text | plausible_path | st.text())
def test_fuzz_path_check_accepts_only_safe_paths(path: str) -> None:
    try:
        checked = check_member_path(path)
    except CollectionError as exc:
        assert str(exc).isprintable()
        return
    assert checked == path
    assert unicodedata.is_normalized("NFC", path)
    parts = path.split("/")
    assert all(part not in ("", ".", "..") for part in parts)
    assert len(parts) <= MAX_DEPTH and len(path.encode()) <= MAX_PATH_BYTES
    assert not posixpath.isabs(path) and not ntpath.isabs(path) and ntpath.splitdrive(path)[0] == ""
    # Joined under any folder, on POSIX or on Windows, it stays inside that folder.
    assert is_under(posixpath, "/srv/out", path)
    assert is_under(ntpath, "C:\\out", path)
    assert ntpath.normpath(ntpath.join("C:\\out", path)) == "C:\\out\\" + path.replace("/", "\\")
    assert posixpath.normpath(posixpath.join("/srv/out", path)) == "/srv/out/" + path


@FUZZ
@given(nasty_text)
def test_fuzz_normalise_gives_nfc_and_is_idempotent(path: str) -> None:
    try:
        normal = normalise_member_path(path)
    except CollectionError:
        return
    assert normal == unicodedata.normalize("NFC", path)
    assert normalise_member_path(normal) == normal


def brute_force_clash(paths: list[str]) -> bool:
    def fold(p: str) -> list[str]:
        parts = [c.replace("\u200d", "") for c in p.split("/")]  # HFS+ ignores the zero-width joiner
        return [unicodedata.normalize("NFD", unicodedata.normalize("NFD", c).casefold()) for c in parts]

    folded = [fold(p) for p in paths]
    return any(a == b or a == b[: len(a)] or b == a[: len(b)] for i, a in enumerate(folded) for b in folded[i + 1 :])


CLASHY = ["a", "A", "b", "ß", "ss", "é", "e\u0301", "k", "\u212a", "\u200d"]


@FUZZ
@given(st.lists(st.lists(st.sampled_from(CLASHY), min_size=1, max_size=3).map("/".join), max_size=6))
def test_fuzz_find_clash_matches_brute_force(paths: list[str]) -> None:
    found = find_clash(paths)
    assert (found is not None) == brute_force_clash(paths)
    if found is not None:
        assert found.first in paths and found.second in paths


def parse_or_refuse(raw: bytes) -> Collection | None:
    try:
        c = parse_collection(raw)
    except CollectionError:
        return None
    except CascadeError as exc:  # pragma: no cover - a failure message, not a path
        raise AssertionError(f"a {type(exc).__name__} escaped, not a CollectionError: {exc}") from exc
    # Whatever is accepted is safe and canonical: it re-encodes to the same bytes.
    assert serialize_collection(c.members) == raw
    for m in c.members:
        assert check_member_path(m.path) == m.path
    assert find_clash(m.path for m in c.members) is None
    return c


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    parse_or_refuse(raw)
    parse_or_refuse(b"CASCCOLL" + raw)
    parse_or_refuse(header(1) + raw)


@FUZZ
@given(st.data())
def test_fuzz_mutated_collection(data: st.DataObject) -> None:
    raw = bytearray(SMALL)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip" and at < len(raw):
            raw[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[at : at + data.draw(st.integers(1, 8))]
    parse_or_refuse(bytes(raw))


@FUZZ
@given(st.data())
def test_fuzz_structured_members(data: st.DataObject) -> None:
    # Well-framed members with nasty paths: mostly sorted, counted right and distinct, so
    # that the path checks, not the framing, decide (and some collections are accepted).
    text = plausible_path | nasty_text
    paths = data.draw(st.lists(text.map(lambda p: p.encode("utf-8", "surrogatepass")), min_size=1, max_size=5))
    if data.draw(st.booleans()):
        paths = sorted(set(paths))
    entries = [(path, data.draw(st.sampled_from([HELLO, EMPTY, HELLO, EMPTY, BAD_CASCADE]))) for path in paths]
    count = data.draw(st.just(len(entries)) | st.integers(0, 6))
    c = parse_or_refuse(reference_collection(entries, count=count))
    if c is not None:
        assert [m.path.encode() for m in c.members] == paths


def test_fold_name_of_ascii_is_the_unicode_fold() -> None:
    # fold_name takes a short cut for ASCII: it must agree with the full fold on every character.
    def full(name: str) -> str:
        return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())

    for name in ["".join(chr(c) for c in range(128)), "README.TXT", "Part-000", "a~1.B"]:
        assert fold_name(name) == full(name)
    assert find_clash(["Docs/A.txt", "docs/a.TXT"]) == Clash("Docs/A.txt", "docs/a.TXT", directory=False)
    assert find_clash(["docs", "DOCS/\u00e9"]) == Clash("docs", "DOCS/\u00e9", directory=True)


def test_a_faulty_file_name_under_a_folder_already_checked_is_refused() -> None:
    # parse_collection checks each folder name once; the file names under it are checked every time.
    raw = reference_collection([(b"d/x", HELLO), (b"d/x/CON", HELLO)])
    with pytest.raises(CollectionError, match=r"member 2 of 2: path 'd/x/CON' has the component 'CON'"):
        parse_collection(raw)
    raw = reference_collection([(b"d/a", HELLO), (b"d/b.", HELLO)])
    with pytest.raises(CollectionError, match=r"member 2 of 2: path 'd/b\.' has the component 'b\.'"):
        parse_collection(raw)
    raw = reference_collection([(b"d/a", HELLO), (b"d/b", HELLO[:-1])])
    with pytest.raises(CollectionError, match=r"member 2 of 2: the \.cascade of 'd/b': expected 2 block hashes"):
        parse_collection(raw)


def test_kept_files_are_the_parsed_cascades_and_change_no_member() -> None:
    kept, plain = parse_collection(SMALL, keep_files=True), parse_collection(SMALL)
    assert kept == plain and kept.members == plain.members
    for k, p in zip(kept.members, plain.members, strict=True):
        assert k.cascade_file() is k.cascade_file()  # kept: not parsed again
        assert k.cascade_file() == p.cascade_file() and k.cascade_file().raw == p.cascade
        assert repr(k) == repr(p)
