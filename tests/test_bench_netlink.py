"""The rtnetlink replies ``bench/netlab.py`` reads its class counters from: built by hand, sound and broken."""

from __future__ import annotations

import struct

import pytest

from bench.netlab import RTATTR, TCA_STATS2, TCA_STATS_BASIC, _basic_bytes

pytestmark = pytest.mark.unit


def _attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes as the kernel does."""
    raw = RTATTR.pack(RTATTR.size + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


BASIC = struct.pack("=QI", 70_421_088, 48_000)  # bytes, packets (struct gnet_stats_basic)
NESTED = 0x8000  # NLA_F_NESTED, which the kernel may set on TCA_STATS2


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        (_attr(1, b"htb\0") + _attr(TCA_STATS2, _attr(TCA_STATS_BASIC, BASIC)), 70_421_088),
        (_attr(TCA_STATS2 | NESTED, _attr(9, bytes(8)) + _attr(TCA_STATS_BASIC, BASIC)), 70_421_088),
    ],
)
def test_the_byte_counter_is_found_among_the_attributes(attrs: bytes, expected: int) -> None:
    assert _basic_bytes(attrs, 0, len(attrs)) == expected


@pytest.mark.parametrize(
    "attrs",
    [
        _attr(1, b"htb\0"),  # no statistics at all
        _attr(TCA_STATS2, _attr(9, bytes(8))),  # statistics without the basic ones
        _attr(TCA_STATS2, _attr(TCA_STATS_BASIC, bytes(4))),  # a counter too short to hold 8 bytes
        _attr(TCA_STATS2, _attr(TCA_STATS_BASIC, BASIC))[:-6],  # cut short
        RTATTR.pack(2, TCA_STATS2),  # a length shorter than the attribute's own header
    ],
)
def test_a_reply_without_a_sound_counter_is_refused(attrs: bytes) -> None:
    with pytest.raises(ValueError):
        _basic_bytes(attrs, 0, len(attrs))
