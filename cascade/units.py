"""Byte sizes as users write them (``64K``, ``1MiB``, ``5M``) and as we print them."""

from __future__ import annotations

import re

from cascade.errors import UsageError

# Every suffix is a power of 1024, as in the `cascade create` contract. "KB",
# "MB" and "GB" are refused on purpose: tools disagree on whether they mean
# 1000 or 1024 (dd says 1000), so we make the user pick an unambiguous form.
_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
}
_SIZE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(text: str, what: str = "size", nonzero: bool = False) -> int:
    """``"64K"`` -> 65536. Raises :class:`UsageError` with the accepted forms (and for 0 when ``nonzero``)."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    # More than 20 digits is more than 2**64 bytes; the check also keeps int() from
    # raising ValueError on strings of over 4300 digits.
    if not m or unit not in _SUFFIXES or len(m.group(1)) > 20:
        raise UsageError(
            f"invalid {what} {text!r}: use a byte count or a number with K, M, G, KiB, MiB or GiB (e.g. 1M)"
        )
    size = int(m.group(1)) * _SUFFIXES[unit]
    if nonzero and size == 0:
        raise UsageError(f"invalid {what} {text!r}: it must be at least 1 byte")
    return size


def format_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
