"""Property-based fuzzing of every decoder in ``cascade/`` (issue 9, section 7).

The contract: whatever bytes or text come in, a decoder returns a value or
raises one of the project's own errors (:class:`CascadeError` and its
subclasses). Anything else (``struct.error``, ``ValueError``, ``IndexError``,
``UnicodeDecodeError``...) would reach the user as a traceback, so it fails
the test, and hypothesis prints the smallest input that shows it.

Inputs are a mix of random bytes and valid frames with a few bytes changed,
cut short or extended, so both the length checks and the field checks are
reached. Example counts are bounded so the module runs in a few seconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.addresses import parse_hostport
from cascade.errors import CascadeError
from cascade.metafile import HASH_SIZE, HEADER_SIZE, block_count_for, encode_cascade, parse_cascade
from cascade.units import parse_size
from cascade.wire import (
    BLOCK_RESPONSE_HEADER_SIZE,
    TRACKER_HEADER_SIZE,
    BlockRequest,
    BlockResponse,
    BlockResponseHeader,
    BlockResponseReader,
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
    decode_tracker_reply_header,
    have_map_forms,
    have_map_size,
    tracker_request_reader,
    unpack_have_bits,
)
from peer.http_client import safe_file_name, split_cascade_url, tracker_base_url

pytestmark = pytest.mark.unit

T = TypeVar("T")

# Arbitrary: enough to reach every branch of these small decoders, few enough
# that the whole module stays within seconds.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# Each reader example decodes many frames: fewer examples.
FUZZ_READERS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def project_errors_only(decode: Callable[[], T]) -> T | None:
    """Run ``decode``; a :class:`CascadeError` is an accepted outcome (None), any other exception escapes."""
    try:
        return decode()
    except CascadeError as exc:
        assert str(exc), "a project error must say what is wrong"
        return None


# --- strategies ----------------------------------------------------------------

hashes = st.binary(min_size=HASH_SIZE, max_size=HASH_SIZE)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str((n >> s) & 0xFF) for s in (24, 16, 8, 0)))
ports = st.integers(0, 0xFFFF)

tracker_requests = st.builds(TrackerRequest, st.sampled_from(list(TrackerCommand)), hashes, ipv4, ports)
peer_records = st.builds(PeerRecord, ipv4, ports, st.integers(0, 2**32 - 1), st.booleans())
tracker_replies = st.one_of(
    st.builds(PeerList, st.lists(peer_records, max_size=6).map(tuple)),
    st.builds(TrackerError, st.integers(1, 255), st.text(max_size=40)),
)
block_requests = st.builds(BlockRequest, st.integers(0, 2**64 - 1), hashes, st.booleans())
block_responses = st.builds(BlockResponse, st.integers(0, 255), st.binary(max_size=64))


@st.composite
def metafiles(draw: st.DrawFn) -> bytes:
    """A valid ``.cascade`` file with a handful of blocks (or none)."""
    block_size = draw(st.integers(1, 1 << 20))
    blocks = draw(st.integers(0, 5))
    length = 0 if blocks == 0 else draw(st.integers((blocks - 1) * block_size + 1, blocks * block_size))
    assert block_count_for(length, block_size) == blocks
    return encode_cascade(length, block_size, draw(hashes), draw(st.binary(min_size=32 * blocks, max_size=32 * blocks)))


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid frame with some bytes overwritten, then cut short or extended."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(-3, 3))
    if cut < 0:
        del data[max(0, len(data) + cut * draw(st.integers(1, 8))) :]
    elif cut > 0:
        data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def frames(valid: st.SearchStrategy[bytes], max_random: int = 128) -> st.SearchStrategy[bytes]:
    """Random bytes, valid frames, and valid frames damaged."""
    return st.one_of(st.binary(max_size=max_random), valid, mutated(valid))


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split at random points, as a peer's ``recv`` may return it."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# --- fixed-size frames -------------------------------------------------------------


@FUZZ
@given(frames(tracker_requests.map(TrackerRequest.encode)))
def test_tracker_request_decode(data: bytes) -> None:
    req = project_errors_only(lambda: TrackerRequest.decode(data))
    if req is not None:
        assert req.encode() == data


@FUZZ
@given(frames(tracker_requests.map(lambda r: r.encode()[:TRACKER_HEADER_SIZE]), max_random=24))
def test_tracker_request_header_check(header: bytes) -> None:
    project_errors_only(lambda: TrackerRequest.check_header(header))


@FUZZ
@given(frames(peer_records.map(PeerRecord.encode), max_random=16))
def test_peer_record_decode(data: bytes) -> None:
    project_errors_only(lambda: PeerRecord.decode(data))


@FUZZ
@given(frames(tracker_replies.map(lambda r: r.encode())))
def test_tracker_reply_decode(data: bytes) -> None:
    project_errors_only(lambda: decode_tracker_reply_header(data[:5]))
    reply = project_errors_only(lambda: decode_tracker_reply(data))
    if isinstance(reply, PeerList):
        # Re-encoding may differ (a flag of 2 reads as "good"), but never in length.
        assert len(reply.encode()) == len(data)


@FUZZ
@given(frames(block_requests.map(BlockRequest.encode)))
def test_block_request_decode(data: bytes) -> None:
    req = project_errors_only(lambda: BlockRequest.decode(data))
    if req is not None:
        assert req.encode()[24:] == data[24:]


@FUZZ
@given(frames(block_responses.map(BlockResponse.encode)))
def test_block_response_decode(data: bytes) -> None:
    project_errors_only(lambda: BlockResponseHeader.decode(data[:BLOCK_RESPONSE_HEADER_SIZE]))
    resp = project_errors_only(lambda: BlockResponse.decode(data))
    if resp is not None:
        assert resp.encode() == data


have_map_requests = st.builds(HaveMapRequest, hashes, st.booleans())


@FUZZ
@given(frames(st.one_of(have_map_requests, block_requests).map(lambda r: r.encode())))
def test_peer_request_decode(data: bytes) -> None:
    req = project_errors_only(lambda: decode_peer_request(data))
    if isinstance(req, HaveMapRequest):
        assert data[16:24] == b"HAVEMAP1" and data[24:32] == b"\xff" * 8
        assert req.encode()[16:] == data[16:]
    elif req is not None:
        assert req.encode()[24:] == data[24:]


@st.composite
def have_map_bodies(draw: st.DrawFn) -> tuple[int, bytes]:
    """(block count, reply body): well-formed ones, and bodies of any length."""
    count = draw(st.integers(0, 80))
    size = have_map_size(count)
    body = draw(
        st.one_of(
            st.binary(min_size=size, max_size=size),
            st.binary(min_size=2 * size, max_size=2 * size),
            st.binary(max_size=2 * size + 3),
        )
    )
    return count, body


@FUZZ
@given(have_map_bodies())
def test_have_map_decode(case: tuple[int, bytes]) -> None:
    count, body = case
    checked = project_errors_only(lambda: have_map_forms(len(body), count))
    decoded = project_errors_only(lambda: HaveMap.decode_body(body, count))
    # The length check alone decides, before any body byte is read.
    assert (checked is None) == (decoded is None)
    if decoded is not None:
        assert len(decoded.held) == count and set(decoded.held) <= {0, 1}
        if decoded.offer is not None:
            # An offer never names a block the map does not say is held.
            assert all(h or not o for h, o in zip(decoded.held, decoded.offer, strict=True))
        # Re-encoding gives the same bits, less any spare bits and offers of blocks not held.
        assert HaveMap.decode_body(decoded.encode()[BLOCK_RESPONSE_HEADER_SIZE:], count) == decoded


@FUZZ
@given(st.binary(max_size=20), st.integers(0, 200))
def test_have_bits_decode(bits: bytes, count: int) -> None:
    flags = project_errors_only(lambda: unpack_have_bits(bits, count))
    if flags is not None:
        assert len(flags) == count


# --- stream readers: any chunking of any bytes --------------------------------------


def drain(reader: TrackerReplyReader | BlockResponseReader, chunks: list[bytes]) -> int:
    """Feed ``chunks`` and take every whole frame; returns how many came out. Stops at the first error."""
    frames_out = 0
    try:
        for chunk in chunks:
            reader.feed(chunk)
            # Bounded: each frame consumes at least its header.
            for _ in range(len(chunk) + 1):
                if reader.next() is None:
                    break
                frames_out += 1
    except CascadeError:
        pass
    return frames_out


@FUZZ_READERS
@given(st.data(), st.lists(frames(block_requests.map(BlockRequest.encode)), max_size=4))
def test_request_readers_take_any_chunking(data: st.DataObject, parts: list[bytes]) -> None:
    stream = b"".join(parts)
    for make in (block_request_reader, tracker_request_reader):
        reader = make()
        for chunk in data.draw(chunked(stream)):
            reader.feed(chunk)
            for _ in range(len(chunk) + 1):
                if project_errors_only(reader.next) is None:
                    break


@FUZZ_READERS
@given(st.data(), st.lists(frames(tracker_replies.map(lambda r: r.encode())), max_size=3))
def test_tracker_reply_reader_takes_any_chunking(data: st.DataObject, parts: list[bytes]) -> None:
    drain(TrackerReplyReader(), data.draw(chunked(b"".join(parts))))


@FUZZ_READERS
@given(st.data(), st.lists(frames(block_responses.map(BlockResponse.encode)), max_size=4), st.integers(0, 80))
def test_block_response_reader_takes_any_chunking(data: st.DataObject, parts: list[bytes], max_body: int) -> None:
    stream = b"".join(parts)
    whole = drain(BlockResponseReader(max_body), [stream])
    # However the bytes are split, the same frames come out.
    assert drain(BlockResponseReader(max_body), data.draw(chunked(stream))) == whole


def test_block_response_reader_refuses_a_huge_length_before_buffering() -> None:
    reader = BlockResponseReader(1 << 20)
    reader.feed(BlockResponseHeader(0, 2**63).encode())
    with pytest.raises(CascadeError):
        reader.next()


# --- the .cascade file -----------------------------------------------------------


@FUZZ
@given(frames(metafiles(), max_random=HEADER_SIZE + 3 * HASH_SIZE))
def test_parse_cascade(data: bytes) -> None:
    cf = project_errors_only(lambda: parse_cascade(data, "fuzz.cascade"))
    if cf is not None:
        assert cf.raw == data
        assert cf.block_count == block_count_for(cf.data_length, cf.block_size)


@FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=3 * HASH_SIZE))
def test_parse_cascade_header_fields(length: int, block_size: int, hashes_part: bytes) -> None:
    # Random bytes rarely carry the magic; here every header field is random behind a valid one.
    data = b"CASCADE1" + bytes(8) + length.to_bytes(8, "big") + block_size.to_bytes(8, "big") + bytes(32) + hashes_part
    project_errors_only(lambda: parse_cascade(data))


# --- text a user or a server gives us -------------------------------------------------

# Text that looks like what is expected, with the characters that have broken parsers before.
url_like = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
        st.sampled_from(["http", "https", "ftp", "HTTP", ""]),
        st.one_of(st.sampled_from(["127.0.0.1", "[::1]", "[", "[::1", "a]", "\uff03a", "host"]), st.text(max_size=10)),
        st.one_of(st.just(""), st.integers(-5, 10**6).map(lambda p: f":{p}"), st.text(max_size=6).map(":".__add__)),
        st.one_of(
            st.just(""),
            hashes.map(lambda h: f"/cascades/{h.hex()}.cascade"),
            st.text(max_size=20),
        ),
    ),
)


@FUZZ
@given(url_like)
def test_url_parsers(text: str) -> None:
    project_errors_only(lambda: tracker_base_url(text))
    project_errors_only(lambda: split_cascade_url(text))
    name = safe_file_name(text)
    assert name is None or "/" not in name


@FUZZ
@given(
    st.one_of(
        st.text(max_size=30),
        st.builds("{}:{}".format, st.text(max_size=10), st.text(alphabet="0123456789", max_size=8)),
    ),
    st.sampled_from([None, "0.0.0.0"]),
)
def test_parse_hostport(text: str, default_host: str | None) -> None:
    hostport = project_errors_only(lambda: parse_hostport(text, "--listen", default_host))
    if hostport is not None:
        assert 0 <= hostport[1] <= 0xFFFF


@FUZZ
@given(st.one_of(st.text(max_size=30), st.from_regex(r"\s*[0-9]{1,25}\s*(K|M|G|KiB|MiB|GiB|kb|x)?\s*", fullmatch=True)))
def test_parse_size(text: str) -> None:
    size = project_errors_only(lambda: parse_size(text))
    assert size is None or size >= 0


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        # Regressions found by this suite: each used to raise ValueError (a traceback for the user).
        (lambda t: parse_hostport(t), "h:" + "1" * 5000),
        (lambda t: parse_size(t), "1" * 5000),
        (lambda t: tracker_base_url(t), "http://[::1"),
        (lambda t: tracker_base_url(t), "http://\uff03a:1"),
        (lambda t: split_cascade_url(t), "http://[x/cascades/" + "00" * 32 + ".cascade"),
    ],
)
def test_inputs_that_once_escaped_as_value_errors(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(CascadeError):
        parse(text)
