"""Every message of PROTOCOL.md sections 2, 3 and 5, as frozen dataclasses.

Sans-IO: ``encode()`` gives bytes, ``decode()`` takes bytes and raises
:class:`ProtocolError` saying which field is wrong. :class:`FrameReader` turns
a stream of arbitrary chunks into whole messages, so callers never trust one
``recv`` to return one message.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Generic, TypeVar

from cascade.errors import ProtocolError

# Every hash is SHA-256, 32 raw bytes (PROTOCOL.md, top); cascade/metafile.py uses this one too.
HASH_SIZE = 32
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

# --- section 2: tracker ---------------------------------------------------

TRACKER_MAGIC = b"CASC"
TRACKER_VERSION = 1
TRACKER_BODY_LENGTH = 38
TRACKER_HEADER_SIZE = 16
TRACKER_REQUEST_SIZE = TRACKER_HEADER_SIZE + TRACKER_BODY_LENGTH  # 54
TRACKER_REPLY_HEADER_SIZE = 5
PEER_RECORD_SIZE = 12

_TRACKER_HEADER = struct.Struct(">4sIII")
_TRACKER_BODY = struct.Struct(">32s4sH")
_TRACKER_REPLY_HEADER = struct.Struct(">BI")
_PEER_RECORD = struct.Struct(">4sHIBB")


class TrackerCommand(IntEnum):
    LIST = 1
    SUBSCRIBE = 2


class TrackerStatus(IntEnum):
    """The status byte of a tracker reply. PROTOCOL.md only says "non-zero is an error": the codes are ours."""

    OK = 0
    BAD_REQUEST = 1
    NOT_ALLOWED = 2  # the hash is not on the tracker's allow list
    FULL = 3  # no room for another swarm, peer or connection; try later
    INTERNAL = 4  # a bug in the tracker; logged
    UNAVAILABLE = 5  # the tracker's store (Redis) cannot be reached; try later


def _ipv4_bytes(ip: str) -> bytes:
    # Fast path for a canonical dotted quad (what every decoded record holds): a tracker
    # reply of 65,536 records took over a second through ipaddress alone.
    parts = ip.split(".")
    if len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and (p[0] != "0" or p == "0") for p in parts
    ):
        values = [int(p) for p in parts]
        if max(values) <= 255:
            return bytes(values)
    try:
        return ipaddress.IPv4Address(ip).packed
    except ValueError as exc:
        raise ProtocolError(f"not an IPv4 address: {ip!r}") from exc


def _ipv4_str(raw: bytes) -> str:
    if len(raw) != 4:
        raise ProtocolError(f"an IPv4 address is 4 bytes, not {len(raw)}")
    return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"  # what str(IPv4Address) gives, without its cost


def parse_hex_hash(text: object) -> bytes:
    """A cascade hash written as 64 hex digits (either case) -> its 32 bytes.

    The one parser for hashes in URLs, JSON, file names and allow files.
    Raises :class:`ProtocolError` for anything else (callers say where the text came from).
    """
    if not isinstance(text, str) or len(text) != 2 * HASH_SIZE or not _HEX_DIGITS.issuperset(text):
        raise ProtocolError(f"a cascade hash is {2 * HASH_SIZE} hex digits")
    return bytes.fromhex(text)


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProtocolError(f"{what} must be {HASH_SIZE} bytes, not {len(value)}")


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ProtocolError(f"port {port} is outside 0..65535")


@dataclass(frozen=True, slots=True)
class TrackerRequest:
    """A 54-byte tracker request: list peers (1) or subscribe (2)."""

    command: TrackerCommand
    cascade_hash: bytes
    ip: str
    port: int

    def __post_init__(self) -> None:
        _check_hash(self.cascade_hash, "cascade hash")
        _check_port(self.port)
        _ipv4_bytes(self.ip)

    def encode(self) -> bytes:
        header = _TRACKER_HEADER.pack(TRACKER_MAGIC, TRACKER_VERSION, int(self.command), TRACKER_BODY_LENGTH)
        return header + _TRACKER_BODY.pack(self.cascade_hash, _ipv4_bytes(self.ip), self.port)

    @staticmethod
    def check_header(header: bytes) -> TrackerCommand:
        """Validate the 16-byte header; return the command or raise :class:`ProtocolError`."""
        if len(header) != TRACKER_HEADER_SIZE:
            raise ProtocolError(f"tracker request header is {len(header)} bytes, expected {TRACKER_HEADER_SIZE}")
        magic, version, command, length = _TRACKER_HEADER.unpack(header)
        if magic != TRACKER_MAGIC:
            raise ProtocolError(f"bad magic {magic!r}, expected {TRACKER_MAGIC!r}")
        if version != TRACKER_VERSION:
            raise ProtocolError(f"unsupported protocol version {version}, expected {TRACKER_VERSION}")
        if command not in (TrackerCommand.LIST, TrackerCommand.SUBSCRIBE):
            raise ProtocolError(f"unknown command {command}, expected 1 (list) or 2 (subscribe)")
        if length != TRACKER_BODY_LENGTH:
            raise ProtocolError(f"body length {length}, expected {TRACKER_BODY_LENGTH}")
        return TrackerCommand(command)

    @classmethod
    def decode(cls, data: bytes) -> TrackerRequest:
        """Decode exactly 54 bytes; raises :class:`ProtocolError` naming the bad field."""
        if len(data) < TRACKER_HEADER_SIZE:
            raise ProtocolError(f"tracker request is {len(data)} bytes, expected {TRACKER_REQUEST_SIZE}")
        command = cls.check_header(bytes(data[:TRACKER_HEADER_SIZE]))
        if len(data) != TRACKER_REQUEST_SIZE:
            raise ProtocolError(f"tracker request is {len(data)} bytes, expected {TRACKER_REQUEST_SIZE}")
        cascade_hash, ip, port = _TRACKER_BODY.unpack_from(data, TRACKER_HEADER_SIZE)
        return cls(command, cascade_hash, _ipv4_str(ip), port)


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """One 12-byte peer record of a tracker reply."""

    ip: str
    port: int
    last_seen: int
    good: bool

    def __post_init__(self) -> None:
        _check_port(self.port)
        _ipv4_bytes(self.ip)

    def encode(self) -> bytes:
        return _PEER_RECORD.pack(_ipv4_bytes(self.ip), self.port, self.last_seen & 0xFFFFFFFF, int(self.good), 0)

    @classmethod
    def decode(cls, data: bytes) -> PeerRecord:
        if len(data) != PEER_RECORD_SIZE:
            raise ProtocolError(f"peer record is {len(data)} bytes, expected {PEER_RECORD_SIZE}")
        ip, port, last_seen, good, _reserved = _PEER_RECORD.unpack(data)
        # The flag should be 0 or 1; any other value is read as "good" rather than
        # throwing away the whole peer list: the hashes protect us, not the flag.
        return cls(_ipv4_str(ip), port, last_seen, good != 0)


@dataclass(frozen=True, slots=True)
class PeerList:
    """A successful tracker reply (status 0): a list of peer records."""

    peers: tuple[PeerRecord, ...]

    def encode(self) -> bytes:
        body = b"".join(p.encode() for p in self.peers)
        return _TRACKER_REPLY_HEADER.pack(0, len(body)) + body


@dataclass(frozen=True, slots=True)
class TrackerError:
    """A failed tracker reply: a non-zero status and a readable message."""

    status: int
    message: str

    def __post_init__(self) -> None:
        if not 1 <= self.status <= 255:
            raise ProtocolError(f"error status must be 1..255, not {self.status}")

    def encode(self) -> bytes:
        body = self.message.encode("utf-8")
        return _TRACKER_REPLY_HEADER.pack(self.status, len(body)) + body


TrackerReply = PeerList | TrackerError

# The largest reply body we accept: far more peers than any tracker sends.
MAX_TRACKER_REPLY_BODY = PEER_RECORD_SIZE * 65536


def decode_tracker_reply_header(header: bytes) -> tuple[int, int]:
    """Decode the 5-byte reply header into (status, body length)."""
    if len(header) != TRACKER_REPLY_HEADER_SIZE:
        raise ProtocolError(f"tracker reply header is {len(header)} bytes, expected {TRACKER_REPLY_HEADER_SIZE}")
    status, length = _TRACKER_REPLY_HEADER.unpack(header)
    if length > MAX_TRACKER_REPLY_BODY:
        raise ProtocolError(f"tracker reply body length {length} exceeds the limit of {MAX_TRACKER_REPLY_BODY}")
    if status == 0 and length % PEER_RECORD_SIZE:
        raise ProtocolError(f"peer list body length {length} is not a multiple of {PEER_RECORD_SIZE}")
    return status, length


def decode_tracker_reply(data: bytes) -> TrackerReply:
    """Decode a whole tracker reply (header and body, nothing more)."""
    status, length = decode_tracker_reply_header(bytes(data[:TRACKER_REPLY_HEADER_SIZE]))
    body = data[TRACKER_REPLY_HEADER_SIZE:]
    if len(body) != length:
        raise ProtocolError(f"tracker reply body is {len(body)} bytes, header says {length}")
    if status != 0:
        return TrackerError(status, bytes(body).decode("utf-8", errors="replace"))
    # The flag should be 0 or 1; any other value reads as "good" (see PeerRecord.decode).
    return PeerList(
        tuple(
            PeerRecord(_ipv4_str(ip), port, last_seen, good != 0)
            for ip, port, last_seen, good, _reserved in _PEER_RECORD.iter_unpack(bytes(body))
        )
    )


# --- section 3 and 5: peer ------------------------------------------------

BLOCK_MAGIC = b"CASCADE1"
KEEPOPEN = b"KEEPOPEN"
BLOCK_REQUEST_SIZE = 64
BLOCK_RESPONSE_HEADER_SIZE = 9
_BLOCK_REQUEST = struct.Struct(">8s8s8sQ32s")
_BLOCK_RESPONSE_HEADER = struct.Struct(">BQ")


class BlockStatus(IntEnum):
    OK = 0
    INVALID_HASH = 1
    NOT_PRESENT = 2
    OUT_OF_RANGE = 3
    BAD_REQUEST = 4


@dataclass(frozen=True, slots=True)
class BlockRequest:
    """A 64-byte block request; ``keep_open`` is our section 5 extension."""

    index: int
    cascade_hash: bytes
    keep_open: bool = False

    def __post_init__(self) -> None:
        _check_hash(self.cascade_hash, "cascade hash")
        if not 0 <= self.index < 1 << 64:
            raise ProtocolError(f"block number {self.index} does not fit in 64 bits")

    def encode(self) -> bytes:
        marker = KEEPOPEN if self.keep_open else bytes(8)
        return _BLOCK_REQUEST.pack(BLOCK_MAGIC, marker, bytes(8), self.index, self.cascade_hash)

    @classmethod
    def decode(cls, data: bytes) -> BlockRequest:
        """Decode exactly 64 bytes. Reserved bytes are ignored, except the KEEPOPEN marker."""
        if len(data) != BLOCK_REQUEST_SIZE:
            raise ProtocolError(f"block request is {len(data)} bytes, expected {BLOCK_REQUEST_SIZE}")
        magic, marker, _reserved, index, cascade_hash = _BLOCK_REQUEST.unpack(data)
        if magic != BLOCK_MAGIC:
            raise ProtocolError(f"bad magic {magic!r}, expected {BLOCK_MAGIC!r}")
        return cls(index, cascade_hash, marker == KEEPOPEN)


@dataclass(frozen=True, slots=True)
class BlockResponseHeader:
    """The 9-byte header of a block response: status and body length."""

    status: int
    length: int

    def __post_init__(self) -> None:
        if not 0 <= self.status <= 0xFF:
            raise ProtocolError(f"block response status {self.status} does not fit in one byte")
        if not 0 <= self.length < 1 << 64:
            raise ProtocolError(f"block response length {self.length} does not fit in 64 bits")

    def encode(self) -> bytes:
        return _BLOCK_RESPONSE_HEADER.pack(self.status, self.length)

    @classmethod
    def decode(cls, data: bytes) -> BlockResponseHeader:
        if len(data) != BLOCK_RESPONSE_HEADER_SIZE:
            raise ProtocolError(f"block response header is {len(data)} bytes, expected {BLOCK_RESPONSE_HEADER_SIZE}")
        status, length = _BLOCK_RESPONSE_HEADER.unpack(data)
        return cls(status, length)


@dataclass(frozen=True, slots=True)
class BlockResponse:
    """A whole block response; for data replies servers send the header and ``sendfile`` the body."""

    status: int
    body: bytes

    def encode(self) -> bytes:
        return BlockResponseHeader(self.status, len(self.body)).encode() + self.body

    @classmethod
    def error(cls, status: BlockStatus, message: str) -> BlockResponse:
        return cls(int(status), message.encode("utf-8"))

    @classmethod
    def decode(cls, data: bytes) -> BlockResponse:
        header = BlockResponseHeader.decode(bytes(data[:BLOCK_RESPONSE_HEADER_SIZE]))
        body = bytes(data[BLOCK_RESPONSE_HEADER_SIZE:])
        if len(body) != header.length:
            raise ProtocolError(f"block response body is {len(body)} bytes, header says {header.length}")
        return cls(header.status, body)

    @property
    def message(self) -> str:
        return self.body.decode("utf-8", errors="replace")


# --- our extension: have maps (docs/protocol-extensions.md) ------------------
#
# A have-map request is a block request whose block number is 2^64-1 (no file
# can have that block, so an old server answers status 3) and whose reserved
# bytes 16-23 hold ``HAVEMAP1``. The block number is the trigger and the marker
# the confirmation: a client that garbles the reserved bytes of a request for a
# real block still gets that block.

HAVEMAP = b"HAVEMAP1"
HAVEMAP_INDEX = (1 << 64) - 1
# One byte per block (0 or 1) <-> one bit per block, most significant bit first.
_TO_ASCII_BITS = bytes([0x30] + [0x31] * 255)  # 0 -> "0", anything else -> "1"
_BYTE_BITS = tuple(bytes((v >> (7 - k)) & 1 for k in range(8)) for v in range(256))


def have_map_size(block_count: int) -> int:
    """Bytes of one bitmap for a file of ``block_count`` blocks: ceil(n / 8)."""
    return (block_count + 7) >> 3


def pack_have_bits(flags: bytes | bytearray | memoryview) -> bytes:
    """One byte per block (zero: absent, anything else: held) -> the bitmap, MSB first, spare bits zero."""
    count = len(flags)
    size = have_map_size(count)
    if not size:
        return b""
    digits = bytes(flags).translate(_TO_ASCII_BITS) + b"0" * (size * 8 - count)
    # int() of a base-2 string and to_bytes are linear: ~1 ms per million blocks.
    return int(digits, 2).to_bytes(size, "big")


def unpack_have_bits(bits: bytes | bytearray | memoryview, block_count: int) -> bytes:
    """The bitmap of a file of ``block_count`` blocks -> one byte (0 or 1) per block; spare bits ignored.

    Raises :class:`ProtocolError` when ``bits`` is not exactly ``ceil(block_count / 8)`` bytes.
    """
    size = have_map_size(block_count)
    if len(bits) != size:
        raise ProtocolError(f"have map is {len(bits)} bytes, a file of {block_count} blocks needs {size}")
    return b"".join(map(_BYTE_BITS.__getitem__, bytes(bits)))[:block_count]


def have_map_forms(length: int, block_count: int) -> bool:
    """Check a have-map reply's announced body length before reading it; True when it carries an offer.

    The body is one bitmap (``ceil(n/8)`` bytes: what the server holds) or two
    (held, then offered). Raises :class:`ProtocolError` for any other length.
    """
    size = have_map_size(block_count)
    if length == size:
        return False
    if length == 2 * size and size:
        return True
    raise ProtocolError(
        f"have map reply body is {length} bytes, a file of {block_count} blocks needs {size} or {2 * size}"
    )


def is_have_map_request(reserved: bytes, index: int) -> bool:
    """True when a request's block number and last 8 reserved bytes ask for a have map."""
    return index == HAVEMAP_INDEX and reserved == HAVEMAP


def pack_have_map_request(cascade_hash: bytes, keep_open: bool = True) -> bytes:
    """The 64-byte have-map request (fast path of :class:`HaveMapRequest`)."""
    return _BLOCK_REQUEST.pack(BLOCK_MAGIC, KEEPOPEN if keep_open else bytes(8), HAVEMAP, HAVEMAP_INDEX, cascade_hash)


@dataclass(frozen=True, slots=True)
class HaveMapRequest:
    """ "Which blocks do you hold?": our have-map extension, a 64-byte block request for block 2^64-1."""

    cascade_hash: bytes
    keep_open: bool = False

    def __post_init__(self) -> None:
        _check_hash(self.cascade_hash, "cascade hash")

    def encode(self) -> bytes:
        return pack_have_map_request(self.cascade_hash, self.keep_open)

    @classmethod
    def decode(cls, data: bytes) -> HaveMapRequest:
        """Decode exactly 64 bytes; raises :class:`ProtocolError` if they are not a have-map request."""
        request = BlockRequest.decode(data)
        _magic, _marker, reserved, index, _hash = _BLOCK_REQUEST.unpack(data)
        if not is_have_map_request(reserved, index):
            raise ProtocolError("not a have-map request: needs block number 2^64-1 and HAVEMAP1 in bytes 16-23")
        return cls(request.cascade_hash, request.keep_open)


def decode_peer_request(data: bytes) -> BlockRequest | HaveMapRequest:
    """A 64-byte request as a server reads it: a have-map request, else a block request.

    Raises :class:`ProtocolError` (wrong size or magic).
    """
    request = BlockRequest.decode(data)
    if request.index == HAVEMAP_INDEX and data[16:24] == HAVEMAP:
        return HaveMapRequest(request.cascade_hash, request.keep_open)
    return request


@dataclass(frozen=True, slots=True)
class HaveMap:
    """A have-map reply: ``held`` has one byte (0 or 1) per block; ``offer`` likewise, or None.

    ``offer`` (the blocks a super-seeding server asks to be asked for) is sent
    only when it differs from ``held``; it never names a block not held.
    """

    held: bytes
    offer: bytes | None = None

    def __post_init__(self) -> None:
        if self.offer is not None and len(self.offer) != len(self.held):
            raise ProtocolError(f"offer covers {len(self.offer)} blocks, held covers {len(self.held)}")

    def encode(self) -> bytes:
        """The whole response: status 0, body length, then the bitmap(s)."""
        body = pack_have_bits(self.held)
        if self.offer is not None and body:
            body += _and_bits(body, pack_have_bits(self.offer))
        return _BLOCK_RESPONSE_HEADER.pack(BlockStatus.OK, len(body)) + body

    @classmethod
    def decode_body(cls, body: bytes | bytearray | memoryview, block_count: int) -> HaveMap:
        """The body of a status-0 reply to a have-map request, for a file of ``block_count`` blocks.

        An offered block the server does not claim to hold is dropped (a lie
        costs nothing then). Raises :class:`ProtocolError` for a wrong length.
        """
        size = have_map_size(block_count)
        if not have_map_forms(len(body), block_count):
            return cls(unpack_have_bits(body, block_count))
        held_bits = bytes(body[:size])
        offer_bits = _and_bits(held_bits, bytes(body[size:]))
        return cls(unpack_have_bits(held_bits, block_count), unpack_have_bits(offer_bits, block_count))


def _and_bits(a: bytes, b: bytes) -> bytes:
    """Bitwise AND of two bitmaps of the same length, at C speed."""
    return (int.from_bytes(a, "big") & int.from_bytes(b, "big")).to_bytes(len(a), "big")


# --- fast paths for the hot loops ----------------------------------------
#
# The servers and the fetcher handle tens of thousands of frames a second, where
# a frozen dataclass per frame costs more than the syscall. These functions keep
# the layout here (the only place that knows it) while returning plain tuples.
# They check nothing a caller cannot check cheaper itself: the dataclasses above
# are the validating API.

PEER_KEY_SIZE = 6  # IPv4 (4) + port (2): the first bytes of a peer record
ANY_IPV4 = bytes(4)
_HASH_END = TRACKER_HEADER_SIZE + HASH_SIZE
_PEER_KEY = struct.Struct(">4sH")
_PEER_RECORD_TAIL = struct.Struct(">IBB")  # last seen, good flag, reserved


def pack_block_request(index: int, cascade_hash: bytes, keep_open: bool = False) -> bytes:
    """The 64-byte request for block ``index``; raises ``struct.error`` if it does not fit."""
    return _BLOCK_REQUEST.pack(BLOCK_MAGIC, KEEPOPEN if keep_open else bytes(8), bytes(8), index, cascade_hash)


def unpack_block_request_from(
    buf: bytes | bytearray | memoryview, pos: int = 0
) -> tuple[bytes, bytes, bytes, int, bytes]:
    """(magic, first 8 reserved bytes, last 8 reserved bytes, block number, cascade hash) at ``pos``.

    The caller checks the magic; reserved bytes are returned raw because
    clients fill them with garbage (PROTOCOL.md section 4) and our extensions
    give some of them a meaning.
    """
    magic, marker, rest, index, cascade_hash = _BLOCK_REQUEST.unpack_from(buf, pos)
    return magic, marker, rest, index, cascade_hash


def pack_block_response_header(status: int, length: int) -> bytes:
    """The 9-byte response header (status, body length)."""
    return _BLOCK_RESPONSE_HEADER.pack(status, length)


def unpack_block_response_header_from(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int]:
    """(status, body length) of the response header at ``pos``; the length is the peer's claim, unchecked."""
    status, length = _BLOCK_RESPONSE_HEADER.unpack_from(buf, pos)
    return status, length


def pack_tracker_reply_header(status: int, length: int) -> bytes:
    """The 5-byte tracker reply header (status, body length)."""
    return _TRACKER_REPLY_HEADER.pack(status, length)


def tracker_request_header(command: TrackerCommand) -> bytes:
    """The only valid 16-byte header for ``command``: a server compares whole headers at once."""
    return pack_tracker_request_header(TRACKER_MAGIC, TRACKER_VERSION, int(command), TRACKER_BODY_LENGTH)


def pack_tracker_request_header(magic: bytes, version: int, command: int, length: int) -> bytes:
    """A 16-byte request header with any field values, valid or not (conformance tests need wrong ones).

    Raises ``struct.error`` for a value that does not fit its field.
    """
    return _TRACKER_HEADER.pack(magic, version, command, length)


def split_tracker_request(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(16-byte header, cascade hash, 6-byte peer key) of a request of at least 54 bytes, by slicing.

    The peer key (IPv4 + port) is also the first 6 bytes of that peer's
    record, so a tracker keys its swarms by it without converting anything.
    """
    return data[:TRACKER_HEADER_SIZE], data[TRACKER_HEADER_SIZE:_HASH_END], data[_HASH_END:TRACKER_REQUEST_SIZE]


def is_any_ip_key(key: bytes) -> bool:
    """True when a peer key's address is 0.0.0.0: "use the address this came from" (PROTOCOL.md section 4)."""
    return key[:4] == ANY_IPV4


def with_key_ip(key: bytes, packed_ip: bytes) -> bytes:
    """The peer key ``key`` with its IPv4 address replaced by the 4 bytes ``packed_ip``."""
    return packed_ip + key[4:]


def peer_record_recency(record: bytes) -> bytes:
    """A sort key for packed peer records: last seen (big-endian, so bytes sort as numbers), then the address."""
    return record[PEER_KEY_SIZE : PEER_KEY_SIZE + 4] + record[:PEER_KEY_SIZE]


def unpack_tracker_request_body_from(
    buf: bytes | bytearray | memoryview, pos: int = TRACKER_HEADER_SIZE
) -> tuple[bytes, bytes, int]:
    """(cascade hash, packed IPv4 address, port) of the 38-byte body at ``pos``."""
    cascade_hash, ip, port = _TRACKER_BODY.unpack_from(buf, pos)
    return cascade_hash, ip, port


def pack_peer_key(packed_ip: bytes, port: int) -> bytes:
    """The first 6 bytes of a peer record (IPv4, port): a tracker's key for a peer."""
    return _PEER_KEY.pack(packed_ip, port)


def pack_peer_record_tail(last_seen: int, good: bool) -> bytes:
    """The last 6 bytes of a peer record: last seen (wrapped to 32 bits), good flag, reserved."""
    return _PEER_RECORD_TAIL.pack(last_seen & 0xFFFFFFFF, int(good), 0)


# --- incremental framing --------------------------------------------------

M = TypeVar("M")


class FrameReader(Generic[M]):
    """Collects chunks until a fixed-size frame is whole, then decodes it.

    ``feed`` any number of bytes; ``next`` returns a message once enough bytes
    have arrived, else ``None``. Bytes past a frame stay for the next one.
    """

    def __init__(self, size: int, decode: Callable[[bytes], M]) -> None:
        self._size = size
        self._decode = decode
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> M | None:
        if len(self._buf) < self._size:
            return None
        frame = bytes(self._buf[: self._size])
        del self._buf[: self._size]
        return self._decode(frame)

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet part of a decoded frame."""
        return bytes(self._buf)


def tracker_request_reader() -> FrameReader[TrackerRequest]:
    return FrameReader(TRACKER_REQUEST_SIZE, TrackerRequest.decode)


def block_request_reader() -> FrameReader[BlockRequest]:
    return FrameReader(BLOCK_REQUEST_SIZE, BlockRequest.decode)


class TrackerReplyReader:
    """Collects chunks of one tracker reply (5-byte header, then the body it announces).

    ``next`` returns the decoded reply once it is whole, else ``None``; a bad
    header raises :class:`ProtocolError` as soon as its 5 bytes are in, before
    the body is awaited.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> TrackerReply | None:
        if len(self._buf) < TRACKER_REPLY_HEADER_SIZE:
            return None
        _status, length = decode_tracker_reply_header(bytes(self._buf[:TRACKER_REPLY_HEADER_SIZE]))
        end = TRACKER_REPLY_HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        frame = bytes(self._buf[:end])
        del self._buf[:end]
        return decode_tracker_reply(frame)

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)


class BlockResponseReader:
    """Collects chunks of block responses (9-byte header, then the body it announces).

    ``max_body`` is the most the caller will accept (the block's expected
    length, or a small limit for error messages); a header announcing more
    raises :class:`ProtocolError` before any body is buffered.
    """

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> BlockResponse | None:
        if len(self._buf) < BLOCK_RESPONSE_HEADER_SIZE:
            return None
        header = BlockResponseHeader.decode(bytes(self._buf[:BLOCK_RESPONSE_HEADER_SIZE]))
        if header.length > self._max_body:
            raise ProtocolError(f"block response body length {header.length} exceeds the expected {self._max_body}")
        end = BLOCK_RESPONSE_HEADER_SIZE + header.length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[BLOCK_RESPONSE_HEADER_SIZE:end])
        del self._buf[:end]
        return BlockResponse(header.status, body)

    @property
    def pending(self) -> bytes:
        return bytes(self._buf)
