"""Shared pytest fixtures. Keep this small: each suite owns its helpers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.doubles import Swarm
from tests.redisfix import RedisServer

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


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test session (free port, no persistence); skips when not installed."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed (scripts/test.sh installs it with apt when it can)")
    server = RedisServer(executable)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, running and empty."""
    if redis_server.popen is None or redis_server.popen.poll() is not None:
        redis_server.start()  # a test stopped it
    assert redis_server.command("FLUSHALL").startswith(b"+OK")
    return redis_server.url
