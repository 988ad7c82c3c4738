"""Table-driven codec tests: known byte strings against decoded values.

Every valid frame is decoded whole, fed one byte at a time to an incremental
reader, and fed with trailing bytes (which must stay pending). The byte strings
are written out by hand from PROTOCOL.md, not produced by the encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pytest

from cascade import wire
from cascade.errors import ProtocolError
from cascade.wire import (
    BLOCK_REQUEST_SIZE,
    KEEPOPEN,
    TRACKER_REQUEST_SIZE,
    BlockRequest,
    BlockResponse,
    BlockResponseHeader,
    BlockResponseReader,
    BlockStatus,
    HaveMap,
    HaveMapRequest,
    PeerList,
    PeerRecord,
    TrackerCommand,
    TrackerError,
    TrackerReplyReader,
    TrackerRequest,
    block_request_reader,
    decode_peer_request,
    decode_tracker_reply,
    have_map_forms,
    pack_have_bits,
    tracker_request_reader,
    unpack_have_bits,
)
from cascade.wire import FrameReader as _FrameReader

pytestmark = pytest.mark.unit

H = bytes(range(32))  # a recognisable cascade hash
H_HEX = H.hex()


def b(hex_text: str) -> bytes:
    return bytes.fromhex("".join(hex_text.split()))


class Reader(Protocol):
    def feed(self, data: bytes) -> None: ...
    def next(self) -> Any: ...
    @property
    def pending(self) -> bytes: ...


# (name, bytes on the wire, decoded value, decode whole, new incremental reader)
FRAMES: list[tuple[str, bytes, Any, Callable[[bytes], Any], Callable[[], Reader]]] = [
    (
        "tracker list request",
        b"CASC" + b("00000001 00000001 00000026") + H + b("7f000001 1a0a"),
        TrackerRequest(TrackerCommand.LIST, H, "127.0.0.1", 6666),
        TrackerRequest.decode,
        tracker_request_reader,
    ),
    (
        "tracker subscribe request, unknown address",
        b"CASC" + b("00000001 00000002 00000026") + H + b("00000000 ffff"),
        TrackerRequest(TrackerCommand.SUBSCRIBE, H, "0.0.0.0", 65535),
        TrackerRequest.decode,
        tracker_request_reader,
    ),
    (
        "block request, plain",
        b"CASCADE1" + bytes(16) + b("0000000000000007") + H,
        BlockRequest(7, H, keep_open=False),
        BlockRequest.decode,
        block_request_reader,
    ),
    (
        "block request, KEEPOPEN",
        b"CASCADE1" + b"KEEPOPEN" + bytes(8) + b("0102030405060708") + H,
        BlockRequest(0x0102030405060708, H, keep_open=True),
        BlockRequest.decode,
        block_request_reader,
    ),
    (
        "tracker reply, two peers",
        b("00 00000018") + b("0a000001 1a0a 65000000 01 00") + b("c0a80102 22b8 00000001 00 00"),
        PeerList(
            (
                PeerRecord("10.0.0.1", 6666, 0x65000000, True),
                PeerRecord("192.168.1.2", 8888, 1, False),
            )
        ),
        decode_tracker_reply,
        TrackerReplyReader,
    ),
    (
        "tracker reply, no peers",
        b("00 00000000"),
        PeerList(()),
        decode_tracker_reply,
        TrackerReplyReader,
    ),
    (
        "tracker reply, error",
        b("01 00000007") + b"no such",
        TrackerError(1, "no such"),
        decode_tracker_reply,
        TrackerReplyReader,
    ),
    (
        "block response, data",
        b("00 0000000000000005") + b"\x00ab\x00c",
        BlockResponse(0, b"\x00ab\x00c"),
        BlockResponse.decode,
        lambda: BlockResponseReader(max_body=5),
    ),
    (
        "block response, not present",
        b("02 0000000000000003") + b"not",
        BlockResponse(int(BlockStatus.NOT_PRESENT), b"not"),
        BlockResponse.decode,
        lambda: BlockResponseReader(max_body=1024),
    ),
    (
        "have-map request, KEEPOPEN",
        b"CASCADE1" + b"KEEPOPEN" + b"HAVEMAP1" + b("ffffffffffffffff") + H,
        HaveMapRequest(H, keep_open=True),
        HaveMapRequest.decode,
        lambda: _FrameReader(BLOCK_REQUEST_SIZE, HaveMapRequest.decode),
    ),
    (
        "have-map request, plain",
        b"CASCADE1" + bytes(8) + b"HAVEMAP1" + b("ffffffffffffffff") + H,
        HaveMapRequest(H, keep_open=False),
        HaveMapRequest.decode,
        lambda: _FrameReader(BLOCK_REQUEST_SIZE, HaveMapRequest.decode),
    ),
    (
        "block response, empty body",
        b("00 0000000000000000"),
        BlockResponse(0, b""),
        BlockResponse.decode,
        lambda: BlockResponseReader(max_body=0),
    ),
]
IDS = [f[0] for f in FRAMES]


@pytest.mark.parametrize(("name", "wire", "value", "decode", "reader"), FRAMES, ids=IDS)
def test_decode_whole(name: str, wire: bytes, value: Any, decode: Callable[[bytes], Any], reader: Any) -> None:
    assert decode(wire) == value


@pytest.mark.parametrize(("name", "wire", "value", "decode", "reader"), FRAMES, ids=IDS)
def test_encode(name: str, wire: bytes, value: Any, decode: Any, reader: Any) -> None:
    assert value.encode() == wire


@pytest.mark.parametrize(("name", "wire", "value", "decode", "reader"), FRAMES, ids=IDS)
def test_fed_byte_by_byte(name: str, wire: bytes, value: Any, decode: Any, reader: Callable[[], Reader]) -> None:
    r = reader()
    for i in range(len(wire) - 1):
        r.feed(wire[i : i + 1])
        assert r.next() is None, f"decoded early after {i + 1} of {len(wire)} bytes"
    r.feed(wire[-1:])
    assert r.next() == value
    assert r.pending == b""
    assert r.next() is None


@pytest.mark.parametrize(("name", "wire", "value", "decode", "reader"), FRAMES, ids=IDS)
def test_fed_with_trailing_bytes(name: str, wire: bytes, value: Any, decode: Any, reader: Callable[[], Reader]) -> None:
    r = reader()
    r.feed(wire + b"\x00trailing")
    assert r.next() == value
    assert r.pending == b"\x00trailing"


@pytest.mark.parametrize(("name", "wire", "value", "decode", "reader"), FRAMES, ids=IDS)
def test_two_frames_in_one_chunk(name: str, wire: bytes, value: Any, decode: Any, reader: Callable[[], Reader]) -> None:
    r = reader()
    r.feed(wire + wire)
    assert r.next() == value
    assert r.next() == value
    assert r.next() is None


@pytest.mark.parametrize(("name", "wire", "value", "decode", "reader"), FRAMES, ids=IDS)
def test_whole_decode_rejects_trailing_bytes(name: str, wire: bytes, value: Any, decode: Any, reader: Any) -> None:
    with pytest.raises(ProtocolError):
        decode(wire + b"x")


TRACKER_OK = b"CASC" + b("00000001 00000001 00000026") + H + b("7f000001 1a0a")
BLOCK_OK = b"CASCADE1" + bytes(16) + b("0000000000000007") + H
HAVE_OK = b"CASCADE1" + bytes(8) + b"HAVEMAP1" + b"\xff" * 8 + H

# (name, decoder, bytes, a word the error message must contain)
BAD: list[tuple[str, Callable[[bytes], Any], bytes, str]] = [
    ("tracker request too short", TrackerRequest.decode, TRACKER_OK[:-1], "53 bytes"),
    ("tracker request too long", TrackerRequest.decode, TRACKER_OK + b"\x00", "55 bytes"),
    ("tracker request header cut", TrackerRequest.decode, TRACKER_OK[:10], "10 bytes"),
    ("tracker request bad magic", TrackerRequest.decode, b"CASK" + TRACKER_OK[4:], "magic"),
    ("tracker request version 2", TrackerRequest.decode, TRACKER_OK[:4] + b("00000002") + TRACKER_OK[8:], "version"),
    ("tracker request command 3", TrackerRequest.decode, TRACKER_OK[:8] + b("00000003") + TRACKER_OK[12:], "command"),
    ("tracker request command 0", TrackerRequest.decode, TRACKER_OK[:8] + b("00000000") + TRACKER_OK[12:], "command"),
    ("tracker request length 37", TrackerRequest.decode, TRACKER_OK[:12] + b("00000025") + TRACKER_OK[16:], "length"),
    ("block request too short", BlockRequest.decode, BLOCK_OK[:63], "63 bytes"),
    ("block request too long", BlockRequest.decode, BLOCK_OK + b"\x00", "65 bytes"),
    ("block request bad magic", BlockRequest.decode, b"CASCADE2" + BLOCK_OK[8:], "magic"),
    ("have-map request, real block number", HaveMapRequest.decode, HAVE_OK[:24] + BLOCK_OK[24:], "block number"),
    ("have-map request, no marker", HaveMapRequest.decode, BLOCK_OK[:24] + HAVE_OK[24:], "HAVEMAP1"),
    ("have-map request, bad magic", HaveMapRequest.decode, b"CASCADE2" + HAVE_OK[8:], "magic"),
    ("tracker reply header cut", decode_tracker_reply, b("00 0000"), "header"),
    ("tracker reply ragged peer list", decode_tracker_reply, b("00 0000000d") + bytes(13), "multiple of 12"),
    ("tracker reply body short", decode_tracker_reply, b("00 0000000c") + bytes(11), "header says 12"),
    ("tracker reply body long", decode_tracker_reply, b("00 0000000c") + bytes(13), "header says 12"),
    ("tracker reply absurd length", decode_tracker_reply, b("01 ffffffff"), "limit"),
    ("block response header cut", BlockResponse.decode, b("00 00000000"), "header"),
    ("block response body short", BlockResponse.decode, b("00 0000000000000004") + b"abc", "header says 4"),
]


@pytest.mark.parametrize(("name", "decode", "wire", "word"), BAD, ids=[x[0] for x in BAD])
def test_decode_rejects(name: str, decode: Callable[[bytes], Any], wire: bytes, word: str) -> None:
    with pytest.raises(ProtocolError, match=word):
        decode(wire)


def test_tracker_reader_rejects_bad_header_before_body() -> None:
    r = TrackerReplyReader()
    r.feed(b("00 0000000d"))
    with pytest.raises(ProtocolError, match="multiple of 12"):
        r.next()


def test_block_reader_rejects_oversized_body_before_reading_it() -> None:
    r = BlockResponseReader(max_body=1024)
    r.feed(b("00 0000000000100000"))
    with pytest.raises(ProtocolError, match="exceeds"):
        r.next()


@pytest.mark.parametrize(
    ("reserved", "keep_open"),
    [
        (bytes(16), False),
        (b"KEEPOPEN" + bytes(8), True),
        (b"KEEPOPEN" + b"\xff" * 8, True),
        (b"\xde\xad\xbe\xef" * 4, False),  # garbage must be ignored, not rejected
        (b"keepopen" + bytes(8), False),
    ],
)
def test_block_request_reserved_bytes(reserved: bytes, keep_open: bool) -> None:
    req = BlockRequest.decode(b"CASCADE1" + reserved + b("0000000000000003") + H)
    assert req == BlockRequest(3, H, keep_open)


def test_good_flag_other_than_one_counts_as_good() -> None:
    assert PeerRecord.decode(b("7f000001 1a0a 00000000 02 ff")).good is True


def test_block_response_header_roundtrip() -> None:
    h = BlockResponseHeader(3, 42)
    assert BlockResponseHeader.decode(h.encode()) == h


@pytest.mark.parametrize(
    "make",
    [
        lambda: TrackerRequest(TrackerCommand.LIST, H[:31], "127.0.0.1", 1),
        lambda: TrackerRequest(TrackerCommand.LIST, H, "::1", 1),
        lambda: TrackerRequest(TrackerCommand.LIST, H, "127.0.0.1", 65536),
        lambda: BlockRequest(-1, H),
        lambda: BlockRequest(1 << 64, H),
        lambda: BlockRequest(0, b"short"),
        lambda: PeerRecord("127.0.0.1", 70000, 0, True),
        lambda: TrackerError(0, "status 0 is success"),
        lambda: BlockResponseHeader(256, 0),
    ],
)
def test_invalid_values_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ProtocolError):
        make()


def test_frame_sizes() -> None:
    assert TRACKER_REQUEST_SIZE == 54
    assert BLOCK_REQUEST_SIZE == 64
    assert H_HEX.startswith("000102")


def test_fast_paths_agree_with_the_dataclasses() -> None:
    h = bytes(range(32))
    for index, keep in ((0, False), (7, True), ((1 << 64) - 1, True)):
        frame = BlockRequest(index, h, keep).encode()
        assert wire.pack_block_request(index, h, keep) == frame
        magic, marker, rest, got_index, got_hash = wire.unpack_block_request_from(b"xx" + frame, 2)
        assert (magic, marker == KEEPOPEN, rest, got_index, got_hash) == (b"CASCADE1", keep, bytes(8), index, h)
    header = BlockResponseHeader(2, 1 << 40).encode()
    assert wire.pack_block_response_header(2, 1 << 40) == header
    assert wire.unpack_block_response_header_from(b"\x00" + header, 1) == (2, 1 << 40)
    request = TrackerRequest(TrackerCommand.SUBSCRIBE, h, "10.0.0.1", 6666).encode()
    assert request.startswith(wire.tracker_request_header(TrackerCommand.SUBSCRIBE))
    assert wire.unpack_tracker_request_body_from(request) == (h, bytes([10, 0, 0, 1]), 6666)
    assert wire.pack_tracker_reply_header(3, 11) == TrackerError(3, "hello world").encode()[:5]
    record = PeerRecord("10.0.0.1", 6666, (1 << 32) + 5, True).encode()
    assert wire.pack_peer_key(bytes([10, 0, 0, 1]), 6666) + wire.pack_peer_record_tail((1 << 32) + 5, True) == record
    assert len(wire.pack_peer_key(bytes(4), 0)) == wire.PEER_KEY_SIZE


def test_tracker_request_fast_paths_agree_with_the_dataclass() -> None:
    h = bytes(range(32))
    request = TrackerRequest(TrackerCommand.LIST, h, "10.0.0.1", 6666).encode()
    head, cascade_hash, key = wire.split_tracker_request(request + b"trailing")
    assert head == wire.tracker_request_header(TrackerCommand.LIST)
    assert head == wire.pack_tracker_request_header(b"CASC", 1, 1, 38) == request[:16]
    assert (cascade_hash, key) == (h, wire.pack_peer_key(bytes([10, 0, 0, 1]), 6666))
    assert not wire.is_any_ip_key(key)
    anywhere = TrackerRequest(TrackerCommand.SUBSCRIBE, h, "0.0.0.0", 6666).encode()
    _, _, key = wire.split_tracker_request(anywhere)
    assert wire.is_any_ip_key(key)
    assert wire.with_key_ip(key, bytes([127, 0, 0, 5])) == wire.pack_peer_key(bytes([127, 0, 0, 5]), 6666)
    # Wrong field values are packed as given, for conformance tests.
    bad = wire.pack_tracker_request_header(b"CASX", 2, 3, 0xFFFFFFFF)
    assert bad == b"CASX" + bytes.fromhex("00000002 00000003 ffffffff")
    with pytest.raises(ProtocolError, match="magic"):
        TrackerRequest.check_header(bad)


def test_peer_record_recency_sorts_by_last_seen_then_address() -> None:
    records = [
        PeerRecord(ip, port, seen, False)
        for ip, port, seen in [("10.0.0.9", 1, 5), ("10.0.0.1", 9, 300), ("10.0.0.1", 2, 5)]
    ]
    ordered = sorted((r.encode() for r in records), key=wire.peer_record_recency)
    assert [PeerRecord.decode(r) for r in ordered] == [records[2], records[0], records[1]]


def test_tracker_status_codes() -> None:
    assert [int(s) for s in wire.TrackerStatus] == [0, 1, 2, 3, 4, 5]
    for status in list(wire.TrackerStatus)[1:]:
        assert TrackerError(status, "x").encode()[:1] == bytes([status])


@pytest.mark.parametrize("text", ["ab" * 32, "AB" * 32, "0123456789abcdefABCDEF" * 2 + "00" * 10])
def test_parse_hex_hash_accepts_64_hex_digits(text: str) -> None:
    assert wire.parse_hex_hash(text) == bytes.fromhex(text)


@pytest.mark.parametrize(
    "text", ["ab" * 31, "ab" * 33, "zz" * 32, " " + "ab" * 31 + "a", "ab" * 31 + "a ", "", None, 7]
)
def test_parse_hex_hash_rejects_anything_else(text: object) -> None:
    with pytest.raises(ProtocolError, match="64 hex digits"):
        wire.parse_hex_hash(text)


# --- have maps (docs/protocol-extensions.md) ---------------------------------

# (one byte per block, the bitmap on the wire): MSB first, spare bits zero.
HAVE_BITS = [
    (b"", b""),
    (b"\x01", b("80")),
    (b"\x00", b("00")),
    (b"\x01\x00\x01", b("a0")),
    (b"\x01" * 8, b("ff")),
    (b"\x01" * 9, b("ff80")),
    (b"\x00" * 7 + b"\x01" + b"\x01" + b"\x00" * 6 + b"\x01", b("0181")),
    (b"\x00\x01" * 10, b("5555 50")),
]


@pytest.mark.parametrize(("flags", "bits"), HAVE_BITS, ids=[f"{len(f)} blocks {bits.hex()}" for f, bits in HAVE_BITS])
def test_have_bits_table(flags: bytes, bits: bytes) -> None:
    assert pack_have_bits(flags) == bits
    assert unpack_have_bits(bits, len(flags)) == flags


def test_have_bits_spare_bits_are_ignored_when_read() -> None:
    assert unpack_have_bits(b("a7"), 3) == b"\x01\x00\x01"


def test_have_bits_any_nonzero_flag_counts_as_held() -> None:
    assert pack_have_bits(b"\x02\x00\xff") == b("a0")


@pytest.mark.parametrize(("size", "count"), [(0, 1), (1, 0), (1, 9), (2, 8), (3, 9)])
def test_have_bits_wrong_length_is_refused(size: int, count: int) -> None:
    with pytest.raises(ProtocolError, match="have map"):
        unpack_have_bits(bytes(size), count)


# (blocks, body length, carries an offer?) ; None: refused before reading the body.
HAVE_FORMS: list[tuple[int, int, bool | None]] = [
    (0, 0, False),
    (1, 1, False),
    (1, 2, True),
    (8, 1, False),
    (9, 2, False),
    (9, 4, True),
    (9, 3, None),
    (9, 0, None),
    (0, 1, None),
    (64, 1 << 60, None),
]


@pytest.mark.parametrize(("count", "length", "offer"), HAVE_FORMS)
def test_have_map_reply_length_is_checked_against_the_block_count(count: int, length: int, offer: bool | None) -> None:
    if offer is None:
        with pytest.raises(ProtocolError, match="have map reply body"):
            have_map_forms(length, count)
    else:
        assert have_map_forms(length, count) is offer


def test_have_map_reply_wire_bytes() -> None:
    # 3 blocks held: 1 and 3; no offer.
    assert HaveMap(b"\x01\x00\x01").encode() == b("00 0000000000000001 a0")
    # 10 blocks all held, blocks 0 and 9 offered: two bitmaps of 2 bytes.
    held = b"\x01" * 10
    offer = b"\x01" + bytes(8) + b"\x01"
    assert HaveMap(held, offer).encode() == b("00 0000000000000004 ffc0 8040")
    assert HaveMap.decode_body(b("ffc0 8040"), 10) == HaveMap(held, offer)
    assert HaveMap.decode_body(b("ffc0"), 10) == HaveMap(held)


def test_have_map_offer_of_a_block_not_held_is_dropped() -> None:
    # Held: blocks 0-3; offered: 0 and 7 (not held). A lie costs nothing: 7 is not offered.
    assert HaveMap.decode_body(b("f0 81"), 8) == HaveMap(b"\x01" * 4 + bytes(4), b"\x01" + bytes(7))


def test_have_map_offer_must_cover_every_block() -> None:
    with pytest.raises(ProtocolError, match="offer covers"):
        HaveMap(b"\x01\x01", b"\x01")


@pytest.mark.parametrize(
    ("reserved", "index", "expected"),
    [
        (b"KEEPOPEN" + b"HAVEMAP1", (1 << 64) - 1, HaveMapRequest(H, keep_open=True)),
        (bytes(8) + b"HAVEMAP1", (1 << 64) - 1, HaveMapRequest(H)),
        # The marker alone (a garbling client, or a real block) is a normal block request.
        (b"KEEPOPEN" + b"HAVEMAP1", 5, BlockRequest(5, H, keep_open=True)),
        # The block number alone is a normal request, for a block no file has (status 3).
        (b"KEEPOPEN" + bytes(8), (1 << 64) - 1, BlockRequest((1 << 64) - 1, H, keep_open=True)),
        (bytes(8) + b"HAVEMAP2", (1 << 64) - 1, BlockRequest((1 << 64) - 1, H)),
        (bytes(8) + b"havemap1", (1 << 64) - 1, BlockRequest((1 << 64) - 1, H)),
    ],
)
def test_a_server_tells_have_map_requests_from_block_requests(reserved: bytes, index: int, expected: object) -> None:
    assert decode_peer_request(b"CASCADE1" + reserved + index.to_bytes(8, "big") + H) == expected
