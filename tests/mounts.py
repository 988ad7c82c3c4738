"""Real file systems mounted for a test (root only): the mount, or a skip that says why, and the unmount."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(command: list[str], mount: Path, why: str) -> Iterator[Path]:
    """Run ``command`` (which mounts something on ``mount``); skip the test with ``why`` if it fails.

    Yields ``mount``; unmounts it afterwards (raises ``CalledProcessError`` if that fails).
    """
    if subprocess.run(command, capture_output=True, timeout=30).returncode:
        pytest.skip(why)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], timeout=30, check=True)
