"""`peer fetch` across failures and reruns, and what the tracker lists afterwards (issue 9).

A failed or interrupted fetch must never block its own rerun, the final name
holds only complete verified data (the download lives in ``OUT.part``), and a
peer is listed as a seeder only while it serves.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from cascade.metafile import CascadeFile
from cascade.wire import TrackerCommand
from peer.tracker_client import TrackerAddress, announce
from tests.doubles import Swarm, last_json, make_file, sha256_file
from tests.procs import Proc

pytestmark = pytest.mark.process


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def part(out: Path) -> Path:
    return out.with_name(out.name + ".part")


def listing(swarm: Swarm, cf: CascadeFile) -> dict[int, bool]:
    """port -> good, as the tracker lists the swarm (asked from port 0, which is never listed)."""
    records = announce(
        TrackerAddress("127.0.0.1", swarm.tracker_port), TrackerCommand.LIST, cf.cascade_hash, "127.0.0.1", 0
    )
    return {r.port: r.good for r in records}


def serving_port(proc: Proc) -> int:
    return int(proc.wait_for_line(r"peer listening on \S+:(\d+)").group(1))


def rerun_succeeds(swarm: Swarm, cascade: Path, cf: CascadeFile, out: Path) -> dict[str, object]:
    """Start a seeder, rerun the same fetch (no --force): it must finish with the right bytes."""
    swarm.seeder(cascade, cf)
    proc = swarm.fetcher(cascade, out)
    assert proc.wait(30) == 0, proc.stderr
    assert sha256_file(out) == cf.file_hash
    assert not part(out).exists()
    return last_json(proc)


def test_rerun_after_an_unreachable_tracker(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    out = tmp_path / "out"
    proc = swarm.start(
        "peer", "fetch", str(cascade), "--out", str(out), "--tracker", f"127.0.0.1:{free_port()}",
        "--listen", "127.0.0.1:0",
    )  # fmt: skip
    assert proc.wait(20) == 1 and "unreachable" in proc.stderr
    # Nothing was created before the tracker answered.
    assert not out.exists() and not part(out).exists()
    rerun_succeeds(swarm, cascade, cf, out)


def test_rerun_after_the_tracker_refused_the_hash(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    allow = tmp_path / "allow.txt"
    allow.write_text("ab" * 32 + "\n")
    picky = swarm.start("tracker", "run", "--host", "127.0.0.1", "--port", "0", "--allow", str(allow))
    out = tmp_path / "out"
    proc = swarm.start(
        "peer", "fetch", str(cascade), "--out", str(out), "--tracker", f"127.0.0.1:{picky.wait_listening()}",
        "--listen", "127.0.0.1:0",
    )  # fmt: skip
    assert proc.wait(20) == 1 and "refused" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not part(out).exists()
    rerun_succeeds(swarm, cascade, cf, out)


def test_rerun_after_no_peers(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    out = tmp_path / "out"
    proc = swarm.fetcher(cascade, out, "--timeout", "0.5")
    assert proc.wait(20) == 1 and "no peers" in proc.stderr and "Traceback" not in proc.stderr
    # The .part it made got no block, so it is gone again.
    assert not out.exists() and not part(out).exists()
    rerun_succeeds(swarm, cascade, cf, out)


def test_rerun_after_sigint_before_the_first_block(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    out = tmp_path / "out"
    proc = swarm.fetcher(cascade, out, "--timeout", "60")
    wait_until(part(out).exists, "the fetcher never created its .part file")
    proc.signal(signal.SIGINT)
    assert proc.wait(20) == 130
    assert "rerun to resume" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    doc = rerun_succeeds(swarm, cascade, cf, out)
    assert doc["blocks_downloaded"] == cf.block_count


def test_rerun_after_sigkill_before_the_first_block(swarm: Swarm, tmp_path: Path) -> None:
    """The report of issue 9: a full-size file of zeros must not make the rerun ask for --force."""
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    out = tmp_path / "out"
    proc = swarm.fetcher(cascade, out, "--timeout", "60")
    wait_until(lambda: part(out).exists() and part(out).stat().st_size == cf.data_length, "no preallocated .part")
    proc.signal(signal.SIGKILL)
    proc.wait(20)
    assert not out.exists() and part(out).read_bytes() == bytes(cf.data_length)
    doc = rerun_succeeds(swarm, cascade, cf, out)
    assert doc["blocks_resumed"] == 0 and doc["blocks_downloaded"] == cf.block_count


def test_a_complete_part_is_renamed_without_downloading(swarm: Swarm, tmp_path: Path) -> None:
    """Killed between the last block and the rename: the rerun only renames."""
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    out = tmp_path / "out"
    shutil.copyfile(tmp_path / "d.bin", part(out))
    proc = swarm.fetcher(cascade, out)  # no seeder: nothing could be downloaded
    assert proc.wait(20) == 0, proc.stderr
    assert last_json(proc)["blocks_downloaded"] == 0
    assert sha256_file(out) == cf.file_hash and not part(out).exists()


def test_a_partial_out_is_resumed_under_the_part_name(swarm: Swarm, tmp_path: Path) -> None:
    """A partial file under the final name (an older version, a power cut) keeps its blocks."""
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    out = tmp_path / "out"
    out.write_bytes((tmp_path / "d.bin").read_bytes()[: 10 * 4096])
    doc = rerun_succeeds(swarm, cascade, cf, out)
    assert doc["blocks_resumed"] == 10 and doc["blocks_downloaded"] == cf.block_count - 10


def test_a_foreign_file_is_still_protected(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    swarm.seeder(cascade, cf)
    out = tmp_path / "notes.txt"
    out.write_bytes(b"mine\n" * 1000)
    proc = swarm.fetcher(cascade, out)
    assert proc.wait(20) == 1 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == b"mine\n" * 1000 and not part(out).exists()
    forced = swarm.fetcher(cascade, out, "--force")
    assert forced.wait(20) == 0, forced.stderr
    assert sha256_file(out) == cf.file_hash


def test_fetch_without_seed_is_never_a_seeder(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    _, seed_port = swarm.seeder(cascade, cf)
    plain = swarm.fetcher(cascade, tmp_path / "plain")
    plain_port = serving_port(plain)
    assert plain.wait(20) == 0, plain.stderr
    seeding = swarm.fetcher(cascade, tmp_path / "seeding", "--seed")
    seeding_port = serving_port(seeding)
    seeding.wait_for_line("seeding")
    swarm.wait_subscribed(cf, seeding_port)
    listed = listing(swarm, cf)
    assert listed[seed_port] is True and listed[seeding_port] is True
    # Listed (it asked for peers) until the TTL, but never as a seeder.
    assert listed.get(plain_port) is not True


def http_tracker(swarm: Swarm) -> tuple[str, int]:
    """A tracker with its HTTP API; returns (its URL, its binary port)."""
    proc = swarm.start("tracker", "run", "--host", "127.0.0.1", "--port", "0", "--http-port", "0")
    port = proc.wait_listening()
    http = int(proc.wait_for_line(r"tracker http on \S+:(\d+)").group(1))
    return f"http://127.0.0.1:{http}", port


def http_peers(url: str, cf: CascadeFile) -> dict[int, tuple[bool, int]]:
    r = requests.get(f"{url}/api/v1/swarms/{cf.cascade_hash.hex()}/peers", timeout=5)
    if r.status_code == 404:
        return {}
    return {p["port"]: (p["good"], p["age"]) for p in r.json()["peers"]}


def test_peers_say_stopped_to_an_http_tracker(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    url, _ = http_tracker(swarm)
    seeder = swarm.start("peer", "seed", str(cascade), "--tracker", url, "--listen", "127.0.0.1:0")
    seed_port = seeder.wait_listening()
    wait_until(lambda: http_peers(url, cf).get(seed_port, (False, 0))[0], "the seeder never subscribed")
    # A plain fetch over HTTP leaves the swarm as it exits.
    plain = swarm.start(
        "peer", "fetch", str(cascade), "--out", str(tmp_path / "plain"), "--tracker", url, "--listen", "127.0.0.1:0",
    )  # fmt: skip
    plain_port = serving_port(plain)
    assert plain.wait(20) == 0, plain.stderr
    assert plain_port not in http_peers(url, cf)
    # A fetch --seed is a seeder while it serves, and gone as soon as it stops.
    seeding = swarm.start(
        "peer", "fetch", str(cascade), "--out", str(tmp_path / "seeding"), "--tracker", url,
        "--listen", "127.0.0.1:0", "--seed",
    )  # fmt: skip
    seeding_port = serving_port(seeding)
    wait_until(lambda: http_peers(url, cf).get(seeding_port, (False, 0))[0], "fetch --seed never subscribed")
    seeding.signal(signal.SIGTERM)
    assert seeding.wait(10) == 0
    seeder.signal(signal.SIGTERM)
    assert seeder.wait(10) == 0
    assert http_peers(url, cf) == {}
    assert not re.search("Traceback", seeder.stderr + seeding.stderr + plain.stderr)
