"""Shared pytest fixtures. Keep this small: each suite owns its helpers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.doubles import Swarm

# ../shared beside the checkout: PROTOCOL.md and the interoperability vectors.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_vectors() -> Path:
    """The directory of reference .cascade files; skips the test when ../shared is absent."""
    vectors = SHARED_DIR / "vectors"
    if not (vectors / "expected.json").is_file():
        pytest.skip(f"interoperability vectors not found at {vectors} (../shared is not beside this checkout)")
    return vectors


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    """A real tracker process (stopped, with every peer the test started, at the end)."""
    s = Swarm(tmp_path)
    try:
        s.start_tracker()
        yield s
    finally:
        s.stop()
