"""``peer fetch`` as a process beside a real tracker full of dead peers, a banned seeder, and rate limits."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from peer.tracker_client import TrackerAddress
from tests.doubles import Swarm, hanging_addresses, last_json, make_file, refused_addresses, sha256_file, subscribe_all

pytestmark = pytest.mark.process


def test_two_thousand_dead_subscribers_beside_one_seeder(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 1 << 20, 64 << 10)
    swarm.seeder(cascade, cf)
    with contextlib.ExitStack() as stack:
        dead = refused_addresses(stack, 1960) + hanging_addresses(stack, 40)
        subscribe_all(TrackerAddress("127.0.0.1", swarm.tracker_port), cf.cascade_hash, dead)
        # The tracker replies 50 records at a time: the fetcher must keep asking, and its own
        # --timeout is the bound of this test.
        proc = swarm.fetcher(cascade, tmp_path / "out", "--timeout", "20")
        assert proc.wait(60) == 0, proc.stderr
    assert sha256_file(tmp_path / "out") == cf.file_hash
    assert last_json(proc)["complete"] is True


def test_a_fetch_whose_only_seeder_is_banned_says_so(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 50_000, 4096)
    swarm.double("corrupt", cascade, cf)
    proc = swarm.fetcher(cascade, tmp_path / "out", "--timeout", "1")
    assert proc.wait(30) == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "its only peer was banned" in errors[0] and "corrupt block" in errors[0], proc.stderr


def test_rate_limits_on_fetch(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 200_000, 16 << 10)
    swarm.seeder(cascade, cf)
    proc = swarm.fetcher(cascade, tmp_path / "out", "--max-download-rate", "10M/s", "--max-upload-rate", "1M")
    assert proc.wait(30) == 0, proc.stderr
    assert sha256_file(tmp_path / "out") == cf.file_hash
    bad = swarm.fetcher(cascade, tmp_path / "out2", "--max-download-rate", "fast")
    assert bad.wait(30) != 0
    assert "Traceback" not in bad.stderr and "--max-download-rate" in bad.stderr, bad.stderr
