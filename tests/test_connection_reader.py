"""The fetcher's response reader (peer.connection.Reader): large bodies in a buffer it may trade.

A body larger than half the read buffer is received straight into the reader's
own buffer; the write-behind thread may keep that buffer (peer.writebehind) and
give the reader another, so a verified block is never copied. What must hold:
the kept buffer is never read into again, and a small body (in the shared read
buffer) is never offered for trade.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cascade.wire import BlockStatus, pack_block_response_header
from peer.connection import READ_BUFFER, Reader

pytestmark = pytest.mark.socketpair

LARGE = READ_BUFFER  # more than half the read buffer: read into the scratch buffer


def responses(*bodies: bytes) -> bytes:
    return b"".join(pack_block_response_header(BlockStatus.OK, len(b)) + b for b in bodies)


@contextmanager
def sending(data: bytes) -> Iterator[socket.socket]:
    """One end of a socket pair; the other sends ``data`` meanwhile (more than the pair buffers)."""
    a, b = socket.socketpair()
    sender = threading.Thread(target=b.sendall, args=(data,), daemon=True)
    sender.start()
    try:
        yield a
    finally:
        a.close()
        sender.join(10)
        b.close()


def test_a_traded_buffer_is_never_read_into_again() -> None:
    first, second = os.urandom(LARGE), os.urandom(LARGE)
    with sending(responses(first, second)) as sock:
        reader = Reader(sock, LARGE)
        assert reader.header() == (BlockStatus.OK, LARGE)
        body = reader.body(LARGE)
        assert reader.lends(body) and body == first
        given = bytearray(LARGE)
        kept = reader.trade(given)
        assert kept is not None and kept is body.obj
        assert reader.header() == (BlockStatus.OK, LARGE)
        nxt = reader.body(LARGE)
        assert nxt.obj is given and nxt == second
        assert kept == first  # the next block went into the new buffer, not the one given up


def test_a_buffer_too_small_is_refused_and_small_bodies_are_not_offered() -> None:
    small = os.urandom(100)
    with sending(responses(small, os.urandom(LARGE))) as sock:
        reader = Reader(sock, LARGE)
        reader.header()
        body = reader.body(100)
        assert body == small and not reader.lends(body)  # it is in the shared read buffer
        reader.header()
        body = reader.body(LARGE)
        assert reader.lends(body)
        assert reader.trade(bytearray(LARGE - 1)) is None
        assert reader.lends(body)  # nothing changed


def test_a_reader_of_small_blocks_has_nothing_to_trade() -> None:
    with sending(responses(os.urandom(4096))) as sock:
        reader = Reader(sock, 4096)
        reader.header()
        body = reader.body(4096)
        assert not reader.lends(body)
        assert reader.trade(bytearray(1 << 20)) is None
