"""SIGKILL ``peer fetch`` at random moments, rerun, and lose nothing (issue 9, sections 1 and 7).

Real processes on loopback: a tracker, one rate-limited ``peer seed`` (so a
fetch lasts about two seconds and can be killed mid-way) and ``peer fetch``
runs. The moments are drawn from a seeded :class:`random.Random`, as
fractions of the file: the fetch is killed once its progress lines pass
them. After every kill the partial file (the ``--out`` path today; a
``.part`` name beside it once issue 9 section 1 is merged: both are looked
for) is checked block by block; the rerun must keep every verified block
and download only the others.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from cascade.metafile import CascadeFile
from tests.doubles import Swarm, last_json, make_file, partial_files, sha256_file, verified_blocks
from tests.procs import Proc

pytestmark = pytest.mark.process

SIZE = 4 << 20
BLOCK = 64 << 10
# About two seconds for the whole file, after the seeder's 0.25 s burst.
SEED_RATE = "2M"
PROGRESS = re.compile(r"^progress (\d+) (\d+)")
WAIT = 30.0  # seconds any single wait may take before the test fails; far above what loopback needs


def verified_bytes_seen(proc: Proc) -> int:
    """The last verified byte count the fetch printed (``--progress-lines``), 0 before the first line."""
    seen = 0
    for line in proc.stderr.splitlines():
        m = PROGRESS.match(line)
        if m:
            seen = int(m.group(1))
    return seen


def kill_after(proc: Proc, at_least: int) -> bool:
    """SIGKILL ``proc`` once it reports ``at_least`` verified bytes; False if it finished first."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if verified_bytes_seen(proc) >= at_least:
            proc.kill()
            return True
        if proc.popen.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError(f"the fetch never reached {at_least} bytes:\n{proc.stderr}")


def setup_swarm(swarm: Swarm, tmp_path: Path) -> tuple[Path, CascadeFile]:
    (tmp_path / "seed").mkdir()
    cascade, cf = make_file(tmp_path / "seed", "d.bin", SIZE, BLOCK, seed=21)
    swarm.seeder(cascade, cf, "--max-upload-rate", SEED_RATE)
    return cascade, cf


def finish_and_check(swarm: Swarm, cascade: Path, cf: CascadeFile, out: Path, before: set[int]) -> None:
    """Rerun to completion; it must resume ``before`` and download exactly the rest."""
    proc = swarm.fetcher(cascade, out)
    assert proc.wait(WAIT) == 0, proc.stderr
    result = last_json(proc)
    assert result["complete"] is True
    assert result["blocks_resumed"] == len(before), "verified blocks were lost (or counted twice)"
    assert result["blocks_downloaded"] == cf.block_count - len(before), "verified blocks were downloaded again"
    assert sha256_file(out) == cf.file_hash
    assert partial_files(out) == [out], "a partial file was left beside the complete one"


@pytest.mark.parametrize("seed", [pytest.param(7, marks=pytest.mark.portable), 1234])
def test_sigkill_at_random_moments_then_rerun_keeps_every_verified_block(
    swarm: Swarm, tmp_path: Path, seed: int
) -> None:
    cascade, cf = setup_swarm(swarm, tmp_path)
    out = tmp_path / "out" / "d.bin"
    out.parent.mkdir()
    rng = random.Random(seed)
    # Three moments, each at least one block past the one before (a kill must find new progress).
    moments = sorted(rng.uniform(0.05, 0.85) for _ in range(3))
    before: set[int] = set()
    for fraction in moments:
        at_least = max(int(fraction * SIZE), (len(before) + 1) * BLOCK)
        proc = swarm.fetcher(cascade, out, "--progress-lines")
        killed = kill_after(proc, at_least)
        assert killed, f"the fetch finished before {at_least} bytes; the seeder's rate limit is too high"
        now = verified_blocks(out, cf)
        assert before <= now, f"blocks {sorted(before - now)} were verified before the kill and are gone"
        assert len(now) * BLOCK >= at_least, "a block reported verified did not survive the kill"
        before = now
    finish_and_check(swarm, cascade, cf, out, before)


def test_sigkill_before_the_first_block_then_rerun(swarm: Swarm, tmp_path: Path) -> None:
    (tmp_path / "seed").mkdir()
    cascade, cf = make_file(tmp_path / "seed", "d.bin", 64 << 10, 4096, seed=23)
    out = tmp_path / "d.bin"
    # No seeder yet: the fetch opens its output and waits for peers; it is killed there.
    proc = swarm.fetcher(cascade, out)
    proc.wait_for_line(r"listening on", WAIT)
    proc.kill()
    assert verified_blocks(out, cf) == set()
    swarm.seeder(cascade, cf)
    finish_and_check(swarm, cascade, cf, out, set())


@pytest.mark.parametrize("failure", ["tracker unreachable", "no peers within --timeout"])
def test_rerun_after_an_early_failure_needs_no_force(swarm: Swarm, tmp_path: Path, failure: str) -> None:
    (tmp_path / "seed").mkdir()
    cascade, cf = make_file(tmp_path / "seed", "d.bin", 64 << 10, 4096, seed=22)
    out = tmp_path / "d.bin"
    if failure == "tracker unreachable":
        # Port 1 on loopback: nothing listens there, the connection is refused at once.
        proc = swarm.start(
            "peer", "fetch", str(cascade), "--out", str(out), "--tracker", "127.0.0.1:1", "--listen", "127.0.0.1:0"
        )
    else:
        proc = swarm.fetcher(cascade, out, "--timeout", "0.3")
    assert proc.wait(WAIT) != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("peer fetch: error: "), proc.stderr
    swarm.seeder(cascade, cf)
    finish_and_check(swarm, cascade, cf, out, set())
