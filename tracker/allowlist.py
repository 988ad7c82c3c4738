"""The ``--allow`` file: which cascade hashes this tracker serves.

One entry per line: a cascade hash in hex (64 digits), or the path of a
``.cascade`` file (relative paths are tried from the current directory, then
from the allow file's folder). Blank lines and lines starting with ``#`` are
skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from cascade.errors import CascadeError, ProtocolError, UsageError, from_os_error
from cascade.metafile import read_cascade
from cascade.wire import parse_hex_hash


def load_allow_file(path: str | os.PathLike[str]) -> frozenset[bytes]:
    """Read an allow file; raises :class:`~cascade.errors.DataError` when it cannot be read,
    :class:`UsageError` naming the file and line for a bad line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise from_os_error(exc, p, "read the allow file") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read allow file {p}: {exc}") from exc
    hashes: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            hashes.add(parse_hex_hash(line))
            continue
        except ProtocolError:
            pass  # not a hash: a .cascade path
        candidate = Path(line)
        if not candidate.is_absolute() and not candidate.exists():
            candidate = p.parent / candidate
        if not candidate.exists():
            raise UsageError(
                f"{p}:{number}: {line!r} is neither a 64-digit hex cascade hash nor an existing .cascade file"
            )
        try:
            hashes.add(read_cascade(candidate).cascade_hash)
        except CascadeError as exc:
            raise UsageError(f"{p}:{number}: {exc}") from exc
    return frozenset(hashes)
