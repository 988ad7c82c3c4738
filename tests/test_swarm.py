"""The multi-peer swarm: a real tracker, real `peer seed` / `peer fetch` processes and test doubles on loopback.

Files are small (a few MiB in small blocks) so the whole module runs in well
under a minute; upload limits stretch a transfer where a test must act mid-way.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from cascade.metafile import CascadeFile
from peer.localdata import check_data
from tests.doubles import Swarm, last_json, make_file, sha256_file
from tests.procs import Proc

pytestmark = pytest.mark.process


def finish_all(fetchers: list[Proc], cf: CascadeFile, outs: list[Path], timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait for every fetcher; each must exit 0 with a complete file of the right hash."""
    results = []
    for proc, out in zip(fetchers, outs, strict=True):
        code = proc.wait(timeout)
        assert code == 0, proc.stderr
        doc = last_json(proc)
        assert doc["complete"] is True
        assert out.stat().st_size == cf.data_length
        assert sha256_file(out) == cf.file_hash
        results.append(doc)
    return results


@pytest.mark.portable
def test_one_seeder_six_fetchers_all_finish(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "six.bin", 3 << 20, 16 << 10)
    swarm.seeder(cascade, cf)
    outs = [tmp_path / f"out{i}" for i in range(6)]
    fetchers = [swarm.fetcher(cascade, out) for out in outs]
    results = finish_all(fetchers, cf, outs)
    for doc in results:
        assert doc["blocks_downloaded"] == cf.block_count
        assert sum(doc["sources"].values()) == cf.block_count


def test_limited_seeder_fetchers_share_blocks(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "share.bin", 2 << 20, 8 << 10)
    _, seed_port = swarm.seeder(cascade, cf, "--max-upload-rate", "1M")
    outs = [tmp_path / f"out{i}" for i in range(4)]
    fetchers = [swarm.fetcher(cascade, out) for out in outs]
    results = finish_all(fetchers, cf, outs)
    from_seeder = sum(doc["sources"].get(f"127.0.0.1:{seed_port}", 0) for doc in results)
    total = 4 * cf.block_count
    # Without sharing the seeder would send every block 4 times; with it, a real share comes from the others.
    assert total - from_seeder >= total // 4, results


@pytest.mark.portable
def test_killing_one_of_two_seeders_mid_transfer(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "two.bin", 2 << 20, 8 << 10)
    first, _ = swarm.seeder(cascade, cf, "--max-upload-rate", "512K")
    swarm.seeder(cascade, cf, "--max-upload-rate", "2M")
    outs = [tmp_path / f"out{i}" for i in range(3)]
    fetchers = [swarm.fetcher(cascade, out, "--progress-lines") for out in outs]
    for proc in fetchers:
        proc.wait_for_line(r"^progress [1-9]")
    first.kill()
    finish_all(fetchers, cf, outs)


def test_corrupt_peer_is_banned_and_everyone_finishes(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "bad.bin", 2 << 20, 8 << 10)
    _, bad_port = swarm.double("corrupt", cascade, cf)
    # Limited so the download outlasts the backoff between the corrupt peer's two offences.
    swarm.seeder(cascade, cf, "--max-upload-rate", "1M")
    outs = [tmp_path / f"out{i}" for i in range(3)]
    fetchers = [swarm.fetcher(cascade, out) for out in outs]
    results = finish_all(fetchers, cf, outs)
    bad = f"127.0.0.1:{bad_port}"
    for doc in results:
        assert bad in doc["banned"]
        assert bad not in doc["sources"]


def test_sigkill_then_rerun_downloads_only_the_missing_blocks(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "kill.bin", 2 << 20, 8 << 10)
    swarm.seeder(cascade, cf, "--max-upload-rate", "1M")
    out = tmp_path / "out"
    first = swarm.fetcher(cascade, out, "--progress-lines")
    first.wait_for_line(rf"^progress (?:[4-9]\d{{5}}|\d{{7,}}) {cf.data_length}")
    first.signal(signal.SIGKILL)
    first.wait()
    # The blocks so far wait under the incomplete name; the final name does not exist yet.
    assert not out.exists()
    kept = check_data(tmp_path / "out.part", cf, whole_file=False).valid_count
    assert 0 < kept < cf.block_count
    second = swarm.fetcher(cascade, out)
    [doc] = finish_all([second], cf, [out])
    assert doc["blocks_downloaded"] == cf.block_count - kept
    assert doc["blocks_resumed"] == kept
    assert not (tmp_path / "out.part").exists()


def test_fetch_from_a_server_that_closes_after_every_response(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "close.bin", 1 << 20, 16 << 10)
    _, port = swarm.double("close", cascade, cf)
    out = tmp_path / "out"
    [doc] = finish_all([swarm.fetcher(cascade, out)], cf, [out])
    assert doc["sources"] == {f"127.0.0.1:{port}": cf.block_count}


def test_fetch_completes_beside_a_server_that_never_answers(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "silent.bin", 2 << 20, 16 << 10)
    _, silent_port = swarm.double("silent", cascade, cf)
    swarm.seeder(cascade, cf, "--max-upload-rate", "4M")
    outs = [tmp_path / f"out{i}" for i in range(2)]
    results = finish_all([swarm.fetcher(cascade, out) for out in outs], cf, outs)
    for doc in results:
        assert f"127.0.0.1:{silent_port}" not in doc["sources"]
        assert doc["seconds"] < 10


def test_cascade_demo_runs_from_any_folder(tmp_path: Path) -> None:
    proc = Proc(["cascade", "demo", "--fetchers", "3"], cwd=tmp_path)
    try:
        assert proc.wait(90) == 0, proc.stdout + proc.stderr
        assert "every fetcher has a verified copy" in proc.stdout
        assert proc.stdout.count("from seeder") == 3
    finally:
        proc.stop()
