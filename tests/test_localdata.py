"""Hashing data files: create -> parse -> verify, and finding bad blocks."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.errors import DataError, UsageError
from cascade.metafile import parse_cascade
from peer import localdata
from peer.localdata import check_data, create_metafile

pytestmark = pytest.mark.unit


@pytest.fixture(params=[None, 256], ids=["4MiB-chunks", "tiny-chunks"])
def chunking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with the real chunk size and with chunks of a few blocks, to cross chunk edges."""
    if request.param:
        monkeypatch.setattr(localdata, "CHUNK_TARGET", request.param)
        monkeypatch.setattr(localdata, "MAX_IN_FLIGHT", request.param * 3)


def make(tmp_path: Path, data: bytes, block_size: int) -> tuple[Path, bytes]:
    f = tmp_path / "data.bin"
    f.write_bytes(data)
    return f, create_metafile(f, block_size)


def test_one_corrupt_block_among_sixteen(tmp_path: Path, chunking: None) -> None:
    data = random.Random(1).randbytes(16 * 64)
    f, raw = make(tmp_path, data, 64)
    cf = parse_cascade(raw)
    with f.open("r+b") as fh:
        fh.seek(9 * 64 + 17)
        fh.write(bytes([data[9 * 64 + 17] ^ 1]))
    check = check_data(f, cf)
    assert (check.valid_count, check.missing(), check.complete, check.file_hash_ok) == (15, [9], False, False)


def test_complete(tmp_path: Path, chunking: None) -> None:
    data = random.Random(2).randbytes(1000)
    f, raw = make(tmp_path, data, 64)
    check = check_data(f, parse_cascade(raw))
    assert check.complete and check.file_hash_ok and check.valid_count == 16 and check.missing() == []
    quick = check_data(f, parse_cascade(raw), whole_file=False)
    assert quick.complete and quick.file_hash_ok is None


def test_missing_file_holds_nothing(tmp_path: Path) -> None:
    _, raw = make(tmp_path, b"x" * 100, 10)
    check = check_data(tmp_path / "nope", parse_cascade(raw))
    assert (check.valid_count, check.complete, len(check.missing())) == (0, False, 10)


def test_truncated_file_loses_its_tail(tmp_path: Path, chunking: None) -> None:
    data = random.Random(3).randbytes(1000)
    f, raw = make(tmp_path, data, 64)
    f.write_bytes(data[:900])  # block 14 cut short (896..900), block 15 gone
    check = check_data(f, parse_cascade(raw))
    assert check.missing() == [14, 15]
    assert check.size == 900 and not check.complete


def test_longer_file_is_not_complete(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(1000)
    f, raw = make(tmp_path, data, 64)
    f.write_bytes(data + b"extra")
    check = check_data(f, parse_cascade(raw))
    assert check.valid_count == 16 and check.missing() == []
    assert not check.complete and check.file_hash_ok is False


def test_sparse_preallocated_file(tmp_path: Path) -> None:
    """A download in progress: right size, only some blocks written."""
    data = random.Random(5).randbytes(1000)
    f, raw = make(tmp_path, data, 100)
    partial = bytearray(1000)
    partial[200:300] = data[200:300]
    partial[900:] = data[900:]
    f.write_bytes(partial)
    check = check_data(f, parse_cascade(raw))
    assert [i for i in range(10) if check.valid[i]] == [2, 9]


def test_errors(tmp_path: Path) -> None:
    _, raw = make(tmp_path, b"abc", 2)
    with pytest.raises(DataError, match="directory"):
        check_data(tmp_path, parse_cascade(raw))
    with pytest.raises(DataError, match="directory"):
        create_metafile(tmp_path, 64)
    with pytest.raises(DataError, match="no such data file"):
        create_metafile(tmp_path / "nope", 64)
    with pytest.raises(UsageError, match="block size"):
        create_metafile(tmp_path / "data.bin", 0)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        create_metafile(fifo, 64)  # must not block waiting for a writer


def test_progress_adds_up_to_the_length(tmp_path: Path, chunking: None) -> None:
    data = random.Random(7).randbytes(5000)
    f = tmp_path / "d"
    f.write_bytes(data)
    seen: list[int] = []
    raw = create_metafile(f, 64, progress=seen.append)
    assert sum(seen) == 5000
    seen.clear()
    check_data(f, parse_cascade(raw), progress=seen.append)
    assert sum(seen) == 5000


@st.composite
def files(draw: st.DrawFn) -> tuple[bytes, int]:
    block_size = draw(st.sampled_from([1, 2, 3, 7, 64, 100, 256, 1000, 4096]) | st.integers(1, 3000))
    shape = draw(st.sampled_from(["empty", "multiple", "any"]))
    if shape == "empty":
        length = 0
    elif shape == "multiple":
        length = block_size * draw(st.integers(1, max(1, 4000 // block_size)))
    else:
        length = draw(st.integers(0, 5000))
    seed = draw(st.integers(0, 2**32 - 1))
    return random.Random(seed).randbytes(length), block_size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files(), st.integers(0, 2**32 - 1))
def test_create_parse_verify(monkeypatch: pytest.MonkeyPatch, file: tuple[bytes, int], pick: int) -> None:
    data, block_size = file
    monkeypatch.setattr(localdata, "CHUNK_TARGET", 512)  # many chunks even for small files
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "d"
        f.write_bytes(data)
        cf = parse_cascade(create_metafile(f, block_size, workers=1 + pick % 3))
        count = -(-len(data) // block_size)
        assert (cf.data_length, cf.block_size, cf.block_count) == (len(data), block_size, count)
        assert cf.file_hash == hashlib.sha256(data).digest()
        if count:
            assert cf.last_block_length == len(data) - (count - 1) * block_size
        check = check_data(f, cf)
        assert check.complete and check.valid_count == count
        if data:
            pos = pick % len(data)
            f.write_bytes(data[:pos] + bytes([data[pos] ^ 0x80]) + data[pos + 1 :])
            check = check_data(f, cf)
            assert check.missing() == [pos // block_size]
            assert not check.complete
