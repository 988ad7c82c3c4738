"""The .cascade format: byte-for-byte layout, parsing and every malformed case."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cascade.errors import MetafileError
from cascade.metafile import (
    MAX_BLOCK_SIZE,
    CascadeFile,
    block_count_for,
    default_cascade_path,
    default_data_path,
    encode_cascade,
    parse_cascade,
    read_cascade,
)
from peer.localdata import create_metafile

pytestmark = pytest.mark.unit


def u64(n: int) -> bytes:
    """An unsigned big-endian 64-bit field, as PROTOCOL.md writes every integer."""
    return n.to_bytes(8, "big")


def reference_cascade(data: bytes, block_size: int) -> bytes:
    """PROTOCOL.md section 1, written out independently of the code under test."""
    header = b"CASCADE1" + bytes(8) + u64(len(data)) + u64(block_size) + hashlib.sha256(data).digest()
    blocks = b"".join(hashlib.sha256(data[i : i + block_size]).digest() for i in range(0, len(data), block_size))
    return header + blocks


DATA = bytes((i * 7 + i // 256) % 256 for i in range(1000))


@pytest.mark.parametrize(
    ("data", "block_size", "blocks"),
    [
        (DATA, 64, 16),  # the PROTOCOL.md example: last block 40 bytes, 576-byte file
        (DATA, 1, 1000),
        (DATA, 1000, 1),  # exactly one block
        (DATA, 999, 2),  # a 1-byte last block
        (DATA, 250, 4),  # an exact multiple
        (DATA, 4096, 1),  # one block longer than the file
        (DATA, 1 << 20, 1),
        (DATA, 1 << 30, 1),  # the largest block size: must not allocate a 1 GiB buffer
        (b"", 64, 0),  # empty file: header only
        (b"", 1 << 20, 0),
        (b"\x00", 1, 1),
    ],
)
def test_create_matches_protocol_layout(tmp_path: Path, data: bytes, block_size: int, blocks: int) -> None:
    f = tmp_path / "data"
    f.write_bytes(data)
    raw = create_metafile(f, block_size)
    assert raw == reference_cascade(data, block_size)
    assert len(raw) == 64 + 32 * blocks
    cf = parse_cascade(raw)
    assert (cf.data_length, cf.block_size, cf.block_count) == (len(data), block_size, blocks)
    assert cf.cascade_hash == hashlib.sha256(raw).digest()
    assert cf.file_hash == hashlib.sha256(data).digest()


def test_protocol_example_sizes() -> None:
    cf = parse_cascade(reference_cascade(DATA, 64))
    assert len(cf.raw) == 576
    assert cf.block_count == 16
    assert cf.last_block_length == 40
    assert cf.block_length(15) == 40
    assert cf.block_length(0) == 64
    assert cf.block_hash(3) == hashlib.sha256(DATA[192:256]).digest()
    with pytest.raises(IndexError):
        cf.block_hash(16)
    with pytest.raises(IndexError):
        cf.block_length(-1)


def test_reserved_bytes_are_ignored() -> None:
    raw = bytearray(reference_cascade(DATA, 64))
    raw[8:16] = b"\xffgarbage"
    cf = parse_cascade(bytes(raw))
    assert cf.block_count == 16
    # ...but they are part of the bytes, so they change the cascade hash.
    assert cf.cascade_hash != parse_cascade(reference_cascade(DATA, 64)).cascade_hash


def test_encode_roundtrip() -> None:
    raw = reference_cascade(DATA, 100)
    cf = parse_cascade(raw)
    assert encode_cascade(cf.data_length, cf.block_size, cf.file_hash, cf.block_hashes) == raw


GOOD = reference_cascade(DATA, 64)


def header(length: int, block_size: int, magic: bytes = b"CASCADE1") -> bytes:
    return magic + bytes(8) + u64(length) + u64(block_size) + bytes(32)


# (name, bytes, a phrase the error must contain)
MALFORMED = [
    ("empty", b"", "too short"),
    ("header cut", GOOD[:63], "too short"),
    ("wrong magic", b"CASCADE2" + GOOD[8:], "not a .cascade file"),
    ("lowercase magic", b"cascade1" + GOOD[8:], "not a .cascade file"),
    ("block size 0", header(1000, 0) + GOOD[64:], "block size is 0"),
    ("one hash missing", GOOD[:-32], "expected 16 block hashes"),
    ("one hash too many", GOOD + bytes(32), "found 17 hashes"),
    ("ragged hash list", GOOD[:-1], "bytes of hashes"),
    ("hashes for an empty file", header(0, 64) + bytes(32), "expected 0 block hashes"),
    ("absurd block size", header(10, MAX_BLOCK_SIZE + 1) + bytes(32), "block size"),
    ("absurd length", header(1 << 62, 1 << 20), "data length"),
    ("absurd block count", header(1 << 40, 1), "blocks exceed"),
]


@pytest.mark.parametrize(("name", "raw", "phrase"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_is_rejected_naming_the_file(name: str, raw: bytes, phrase: str) -> None:
    with pytest.raises(MetafileError) as err:
        parse_cascade(raw, "x/notes.txt.cascade")
    assert str(err.value).startswith("x/notes.txt.cascade: ")
    assert phrase in str(err.value)


def test_read_cascade_errors(tmp_path: Path) -> None:
    with pytest.raises(MetafileError, match="no such file"):
        read_cascade(tmp_path / "missing.cascade")
    with pytest.raises(MetafileError, match="directory"):
        read_cascade(tmp_path)
    bad = tmp_path / "bad.cascade"
    bad.write_bytes(GOOD[:40])
    with pytest.raises(MetafileError, match=f"{bad}: too short"):
        read_cascade(bad)


def test_read_cascade(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt.cascade"
    p.write_bytes(GOOD)
    cf = read_cascade(p)
    assert isinstance(cf, CascadeFile)
    assert cf.raw == GOOD


@pytest.mark.parametrize(
    ("cascade", "data"),
    [
        ("dir/notes.txt.cascade", "dir/notes.txt"),
        ("a.b.cascade", "a.b"),
        ("plain", "plain.data"),
        # Names that would make the data the folder itself or its parent (a fetch writes there).
        ("dir/.cascade", "dir/.cascade.data"),
        ("dir/..cascade", "dir/..cascade.data"),
        ("dir/...cascade", "dir/...cascade.data"),
        ("dir/....cascade", "dir/..."),  # "..." is a name like any other
    ],
)
def test_default_data_path(cascade: str, data: str) -> None:
    assert default_data_path(cascade) == Path(data)


def test_default_cascade_path() -> None:
    assert default_cascade_path("dir/notes.txt") == Path("dir/notes.txt.cascade")


@pytest.mark.parametrize(
    ("length", "block_size", "count"), [(0, 1, 0), (1, 1, 1), (1000, 64, 16), (1024, 64, 16), (1025, 64, 17)]
)
def test_block_count_for(length: int, block_size: int, count: int) -> None:
    assert block_count_for(length, block_size) == count


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        ((10, 0, bytes(32), bytes(32)), "block size"),
        ((10, 64, bytes(31), bytes(32)), "whole-file hash"),
        ((10, 64, bytes(32), bytes(64)), "expected 1 block hashes"),
        ((-1, 64, bytes(32), b""), "data length"),
    ],
)
def test_encode_refuses_inconsistent_values(args: tuple[int, int, bytes, bytes], phrase: str) -> None:
    with pytest.raises(MetafileError, match=phrase):
        encode_cascade(*args)
