"""Several trackers for one swarm, as real processes: two ``tracker run`` on one real redis-server.

Issue 12: a peer given several ``--tracker`` keeps working while any one
answers; a tracker killed mid-fetch costs the swarm nothing; Redis restarted
under the trackers costs a while, not the swarm; and a ``.cascade`` uploaded
at one tracker is fetched by URL from the other.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.addresses import TrackerAddress
from cascade.errors import TrackerRefused
from cascade.metafile import CascadeFile
from cascade.wire import TrackerCommand
from peer.tracker_client import announce
from tests.doubles import Swarm, make_file, sha256_file
from tests.procs import Proc, TrackerProcess, start_tracker
from tests.redisfix import RedisServer, free_port

pytestmark = pytest.mark.process

WAIT = 60.0  # seconds for a fetch or a log line; generous for a loaded 2-core machine


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    """Peer processes (no tracker of its own: the tests start theirs), stopped at the end."""
    s = Swarm(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def two_trackers(swarm: Swarm, redis: str) -> tuple[TrackerProcess, TrackerProcess]:
    """Trackers A and B on one Redis; the swarm stops them with its peers."""
    a = start_tracker("--store", redis)
    swarm.procs.insert(0, a.proc)  # stopped last, after the peers
    b = start_tracker("--store", redis)
    swarm.procs.insert(0, b.proc)
    return a, b


def seed(swarm: Swarm, cascade: Path, cf: CascadeFile, at: TrackerProcess, *args: str) -> tuple[Proc, int]:
    """A seeder with the given ``--tracker`` options, once ``at`` lists it as good."""
    proc = swarm.start("peer", "seed", str(cascade), "--listen", "127.0.0.1:0", *args)
    port = proc.wait_listening()
    swarm.tracker_port = at.port
    swarm.wait_subscribed(cf, port, timeout=WAIT)
    return proc, port


def fetch(swarm: Swarm, what: str, out: Path, *args: str) -> Proc:
    return swarm.start("peer", "fetch", what, "--out", str(out), "--listen", "127.0.0.1:0", *args)


def assert_complete(proc: Proc, out: Path, data: Path) -> None:
    assert proc.wait(WAIT) == 0, proc.stderr
    assert sha256_file(out) == sha256_file(data)
    assert "Traceback" not in proc.stderr


def test_seeder_at_a_binary_and_fetcher_at_b_http(swarm: Swarm, redis_url: str, tmp_path: Path) -> None:
    a, b = two_trackers(swarm, redis_url)
    cascade, cf = make_file(tmp_path, "one.bin", 300_000, 16_384)
    seed(swarm, cascade, cf, a, "--tracker", a.addr)
    out = tmp_path / "got.bin"
    assert_complete(fetch(swarm, str(cascade), out, "--tracker", b.http), out, tmp_path / "one.bin")


def test_a_tracker_killed_mid_fetch_costs_the_swarm_nothing(swarm: Swarm, redis_url: str, tmp_path: Path) -> None:
    a, b = two_trackers(swarm, redis_url)
    both = ("--tracker", a.addr, "--tracker", b.http)
    # 2 MiB at 512 KiB/s: the first fetch runs for seconds, long enough to kill A under it.
    cascade, cf = make_file(tmp_path, "big.bin", 2 << 20, 65_536)
    seeder, _ = seed(swarm, cascade, cf, a, *both, "--max-upload-rate", "512K", "--announce-interval", "0.5")
    first = fetch(swarm, str(cascade), tmp_path / "f1.bin", *both, "--progress-lines")
    first.wait_for_line(r"^progress [1-9]\d* ", timeout=WAIT)
    a.proc.signal(signal.SIGKILL)
    assert a.proc.wait(10) == -signal.SIGKILL
    # The seeder notices (one line about A, naming it) and goes on announcing at B.
    seeder.wait_for_line(rf"tracker {a.addr} unreachable.*still serving", timeout=WAIT)
    # A fetch started now meets A dead at its first listing and finds the swarm through B.
    second = fetch(swarm, str(cascade), tmp_path / "f2.bin", *both)
    assert_complete(first, tmp_path / "f1.bin", tmp_path / "big.bin")
    assert_complete(second, tmp_path / "f2.bin", tmp_path / "big.bin")
    warned = [line for line in second.stderr.splitlines() if a.addr in line]
    assert len(warned) == 1 and "asking the other trackers" in warned[0], second.stderr
    assert seeder.popen.poll() is None
    assert seeder.stderr.count(f"tracker {a.addr} unreachable") == 1, seeder.stderr
    assert b.http not in seeder.stderr, "B never failed"


def test_redis_restarted_under_both_trackers(swarm: Swarm, redis_server: RedisServer, tmp_path: Path) -> None:
    redis_server.stop()
    redis_server.start()  # fresh, and this test's to stop and start again
    a, b = two_trackers(swarm, redis_server.url)
    cascade, cf = make_file(tmp_path, "r.bin", 200_000, 16_384)
    seeder, port = seed(swarm, cascade, cf, a, "--tracker", a.addr, "--tracker", b.http, "--announce-interval", "0.5")
    redis_server.stop()
    # Both trackers answer "unavailable" (not a crash): the seeder hears a refusal from each, and serves on.
    seeder.wait_for_line(rf"tracker {a.addr} refused", timeout=WAIT)
    seeder.wait_for_line(rf"tracker {re.escape(b.http)} refused", timeout=WAIT)
    redis_server.start()  # same port, empty (no persistence): the seeder's next announces refill it
    for t in (a, b):
        swarm.tracker_port = t.port
        deadline = time.monotonic() + WAIT
        while True:  # the tracker refuses ("unavailable") until it has found Redis again
            try:
                swarm.wait_subscribed(cf, port, timeout=WAIT)
                break
            except TrackerRefused:
                assert time.monotonic() < deadline, t.proc.stderr
                time.sleep(0.05)
        t.proc.wait_for_line("is back", timeout=WAIT)
    out_a, out_b = tmp_path / "via_a.bin", tmp_path / "via_b.bin"
    via_a = fetch(swarm, str(cascade), out_a, "--tracker", a.addr)
    via_b = fetch(swarm, str(cascade), out_b, "--tracker", b.http)
    assert_complete(via_a, out_a, tmp_path / "r.bin")
    assert_complete(via_b, out_b, tmp_path / "r.bin")
    assert seeder.popen.poll() is None and "Traceback" not in seeder.stderr
    for t in (a, b):
        assert t.proc.popen.poll() is None, t.proc.stderr


def test_every_tracker_down_is_one_line_naming_each(swarm: Swarm, tmp_path: Path) -> None:
    cascade, _ = make_file(tmp_path, "d.bin", 10_000, 4096)
    binary, http = f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    proc = fetch(swarm, str(cascade), tmp_path / "never.bin", "--tracker", binary, "--tracker", http)
    assert proc.wait(WAIT) == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("peer fetch: error: no tracker answered: ")
    assert f"tracker {binary} unreachable" in lines[0] and f"tracker {http} unreachable" in lines[0]
    assert not (tmp_path / "never.bin.part").exists()


def test_publish_at_a_and_fetch_by_url_from_b(swarm: Swarm, redis_url: str, tmp_path: Path) -> None:
    a, b = two_trackers(swarm, redis_url)
    cascade, cf = make_file(tmp_path, "pub.bin", 150_000, 16_384)
    seed(swarm, cascade, cf, a, "--tracker", a.addr)
    publish = swarm.start("cascade", "publish", str(cascade), "--tracker", a.http)
    assert publish.wait(WAIT) == 0, publish.stderr
    url = publish.stdout.strip()
    assert url == f"{a.http}/cascades/{cf.cascade_hash.hex()}.cascade"
    # Uploading to both: B already has it (one Redis), and each tracker's URL is printed.
    both = swarm.start("cascade", "publish", str(cascade), "--tracker", a.http, "--tracker", b.http)
    assert both.wait(WAIT) == 0, both.stderr
    b_url = f"{b.http}/cascades/{cf.cascade_hash.hex()}.cascade"
    assert both.stdout.split() == [url, b_url]
    assert both.stderr.count("already on the tracker") == 2, both.stderr

    here = tmp_path / "fetcher"
    here.mkdir()
    out = here / "pub.bin"
    proc = swarm.start("peer", "fetch", b_url, "--out", str(out), "--listen", "127.0.0.1:0", cwd=here)
    assert_complete(proc, out, tmp_path / "pub.bin")


def test_stopped_goes_to_every_http_tracker(swarm: Swarm, tmp_path: Path) -> None:
    # Two trackers with stores of their own: each must hear the seeder's "stopped" itself.
    a, b = start_tracker(), start_tracker()
    swarm.procs[:0] = [a.proc, b.proc]
    cascade, cf = make_file(tmp_path, "s.bin", 50_000, 16_384)
    seeder, port = seed(swarm, cascade, cf, a, "--tracker", a.http, "--tracker", b.http)
    swarm.tracker_port = b.port
    swarm.wait_subscribed(cf, port, timeout=WAIT)
    assert seeder.stop() == 0
    for t in (a, b):
        peers = announce(TrackerAddress("127.0.0.1", t.port), TrackerCommand.LIST, cf.cascade_hash, "127.0.0.1", 0)
        assert all(p.port != port for p in peers), (t.http, peers)
