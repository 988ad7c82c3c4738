"""Shared pytest fixtures. Keep this small: each suite owns its helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

# ../shared beside the checkout: PROTOCOL.md and the interoperability vectors.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared_vectors() -> Path:
    """The directory of reference .cascade files; skips the test when ../shared is absent."""
    vectors = SHARED_DIR / "vectors"
    if not (vectors / "expected.json").is_file():
        pytest.skip(f"interoperability vectors not found at {vectors} (../shared is not beside this checkout)")
    return vectors
