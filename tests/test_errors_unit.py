"""Pure parts of issue 9's one-line errors: the JSON boundary and the block-size check."""

from __future__ import annotations

import pytest

from cascade.errors import ProtocolError, UsageError
from peer.cascade_command import check_block_size
from peer.http_client import parse_json

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"[" * 60_000, "nested too deeply"), (b'{"a": ' * 60_000, "nested too deeply"), (b"{", "Expecting")],
)
def test_parse_json_turns_anything_into_one_protocol_error(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason) as info:
        parse_json(body)
    assert "\n" not in str(info.value)


def test_parse_json_passes_json_through() -> None:
    assert parse_json(b'{"peers": [[[1]]]}') == {"peers": [[[1]]]}


@pytest.mark.parametrize(
    ("length", "block_size"),
    [(0, 1), (5000, 64), (64 << 10, 64), (10 << 30, 1 << 20), (1000, 3), (3 << 20, 1024), (1 << 39, 1 << 20)],
)
def test_sensible_block_sizes_pass(length: int, block_size: int) -> None:
    check_block_size(length, block_size)


@pytest.mark.parametrize(
    ("length", "block_size", "blocks", "suggested"),
    [
        (6 << 20, 3, "2,097,152 blocks", "1MiB"),  # the 64 MiB .cascade
        (128 << 10, 3, "43,691 blocks", "1MiB"),
        (2 << 20, 1000, "2,098 blocks", "1MiB"),
        (2 << 40, 1 << 20, "2,097,152 blocks", "32MiB"),
    ],
)
def test_absurd_block_sizes_are_refused_with_the_numbers(
    length: int, block_size: int, blocks: str, suggested: str
) -> None:
    with pytest.raises(UsageError) as info:
        check_block_size(length, block_size)
    message = str(info.value)
    assert blocks in message and f"--block-size {suggested}" in message and "--force" in message
