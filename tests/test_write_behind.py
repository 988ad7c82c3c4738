"""Verified blocks written behind the connection (peer/writebehind.py), and a fetch that uses it.

A block counts as verified in the store only once its bytes are written; a second
copy is not written twice; a failed write is the download's error, at the next block
or when the writes are drained.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cascade.errors import DataError
from oscompat.fileio import PositionalFile
from peer.fetcher import WRITE_BEHIND_MIN_BLOCK
from peer.localdata import check_data
from peer.storage import BlockStore
from peer.writebehind import WriteBehind
from tests.doubles import make_file, sha256_file
from tests.test_fetch import doubles, fetch_in_process

pytestmark = pytest.mark.loopback

BLOCK = WRITE_BEHIND_MIN_BLOCK


def fresh_store(tmp_path: Path, size: int) -> tuple[BlockStore, bytes]:
    _, cf = make_file(tmp_path, "d.bin", size, BLOCK)
    out = tmp_path / "out.bin"
    store = BlockStore.open_for_fetching(cf, out, check_data(out, cf, whole_file=False))
    return store, (tmp_path / "d.bin").read_bytes()


def test_blocks_are_marked_verified_only_once_written_and_a_second_copy_is_not_written(tmp_path: Path) -> None:
    store, data = fresh_store(tmp_path, 3 * BLOCK + 1000)
    written: list[int] = []
    behind = WriteBehind(store, lambda: written.append(store.verified_count), 2, BLOCK)
    try:
        for i in range(store.cf.block_count):
            body = memoryview(data[i * BLOCK : (i + 1) * BLOCK])
            store.check_block(i, body)
            assert behind.put(i, body)
        assert not behind.put(1, memoryview(data[BLOCK : 2 * BLOCK]))  # the endgame's second copy
        behind.drain()
    finally:
        behind.close()
        store.close()
    assert store.complete
    assert sorted(written) == [1, 2, 3, 4]  # one call per block, each after its block was marked
    assert (tmp_path / "out.bin").read_bytes()[: len(data)] == data


class Scratch:
    """A reader's own buffer (peer.connection.Reader's scratch), tradeable as the write-behind asks."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.traded: list[bytearray] = []

    def trade(self, buf: bytearray) -> bytearray | None:
        if len(buf) < len(self.buf):
            return None
        old, self.buf = self.buf, buf
        self.traded.append(old)
        return old


def test_a_block_in_the_readers_own_buffer_is_written_from_it_not_copied(tmp_path: Path) -> None:
    store, data = fresh_store(tmp_path, 4 * BLOCK)
    reader = Scratch(BLOCK)
    behind = WriteBehind(store, lambda: None, 2, BLOCK)
    try:
        for i in range(store.cf.block_count):
            reader.buf[:] = data[i * BLOCK : (i + 1) * BLOCK]  # received into the reader's buffer
            body = memoryview(reader.buf)
            store.check_block(i, body)
            mine = reader.buf
            assert behind.put(i, body, reader)
            assert reader.buf is not mine and reader.traded[-1] is mine  # kept, and a free one given back
            reader.buf[:] = os.urandom(BLOCK)  # the reader reads the next block at once
        # The second copy of a block is not written: the reader keeps its buffer.
        before = reader.buf
        assert not behind.put(0, memoryview(reader.buf), reader)
        assert reader.buf is before
        behind.drain()
    finally:
        behind.close()
        store.close()
    assert store.complete
    assert len(reader.traded) == 4
    assert (tmp_path / "out.bin").read_bytes() == data  # not what the reader overwrote its buffers with


def test_a_buffer_too_small_to_trade_is_copied_instead(tmp_path: Path) -> None:
    store, data = fresh_store(tmp_path, 2 * BLOCK)
    reader = Scratch(2 * BLOCK)  # longer than the write-behind's buffers: no trade
    behind = WriteBehind(store, lambda: None, 2, BLOCK)
    try:
        for i in range(2):
            reader.buf[:BLOCK] = data[i * BLOCK : (i + 1) * BLOCK]
            body = memoryview(reader.buf)[:BLOCK]
            store.check_block(i, body)
            assert behind.put(i, body, reader)
            reader.buf[:] = bytes(2 * BLOCK)
        behind.drain()
    finally:
        behind.close()
        store.close()
    assert not reader.traded
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_failed_write_is_raised_when_drained_and_at_the_next_block(tmp_path: Path) -> None:
    store, data = fresh_store(tmp_path, 2 * BLOCK)
    # Writes through a read-only descriptor fail (EBADF), as writes to a vanished disk would.
    read_only = os.open(tmp_path / "out.bin", os.O_RDONLY)
    store.pfile = PositionalFile(read_only, store.features, writable=True)
    behind = WriteBehind(store, lambda: None, 2, BLOCK)
    try:
        behind.put(0, memoryview(data[:BLOCK]))
        with pytest.raises(DataError, match="write block 0"):
            behind.drain()
        with pytest.raises(DataError, match="write block 0"):
            behind.put(1, memoryview(data[BLOCK:]))
    finally:
        behind.close()
        os.close(read_only)
        store.close()
    assert not store.valid[0]  # never marked: a rerun fetches it again


def test_a_fetch_of_large_blocks_writes_them_behind_and_gets_every_byte(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 12 * BLOCK + 12345, BLOCK)
    data = tmp_path / "d.bin"
    with doubles(cf, data, "close", "strict") as servers:
        fetcher = fetch_in_process(cf, tmp_path / "out", servers)
    assert fetcher.store.complete
    assert sha256_file(tmp_path / "out") == hashlib.sha256(data.read_bytes()).digest()
    assert fetcher._behind is None  # drained and stopped when the download ended
