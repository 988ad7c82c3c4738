"""``peer seed`` as a user and a tracker see it: its log, its errors, signals, timeouts, rate limit, announces."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.errors import UsageError
from cascade.wire import (
    TRACKER_REQUEST_SIZE,
    PeerList,
    TrackerCommand,
    TrackerRequest,
)
from peer.common import announce_ip
from peer.ratelimit import TokenBucket
from peer.tracker_client import TrackerAddress, announce
from tests.procs import Proc, messages
from tests.test_peer_server import (
    TIMEOUT,
    Sample,
    block,
    closed_by_server,
    connect,
    make_sample,
    read_response,
    recv_exact,
    req,
    wait_until,
)


def run_peer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peer", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


class FakeTracker:
    """A loopback tracker double that records every request and answers with no peers.

    Bound at once but listening only after :meth:`serve`, so until then
    connections are refused: a tracker that is down.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[TrackerRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serve(self) -> None:
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    self.requests.append(TrackerRequest.decode(recv_exact(conn, TRACKER_REQUEST_SIZE)))
                    conn.sendall(PeerList(()).encode())
                except (OSError, EOFError):
                    pass

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture
def tracker() -> Iterator[FakeTracker]:
    t = FakeTracker()
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def sample(tmp_path: Path) -> Sample:
    return make_sample(tmp_path, "file.bin", 40 * 4096 + 1, 4096)


def seed(sample: Sample, tracker: str, *extra: str) -> tuple[Proc, int]:
    proc = Proc(["peer", "seed", str(sample.cascade_path), "--tracker", tracker, "--listen", "127.0.0.1:0", *extra])
    try:
        port = proc.wait_listening()
        proc.wait_for_line("blocks verified")
    except BaseException:
        proc.stop()
        raise
    return proc, port


# --- the log and the command line ------------------------------------------------------


@pytest.mark.process
def test_first_line_then_one_line_per_file(tmp_path: Path, tracker: FakeTracker) -> None:
    a = make_sample(tmp_path, "a.bin", 10_000, 1000, seed=1)
    b = make_sample(tmp_path, "b.bin", 5000, 1024, seed=2)
    b.data_path.write_bytes(b.data[:3000])  # blocks 0 and 1 only
    tracker.serve()
    args = [str(a.cascade_path), str(b.cascade_path), "--tracker", tracker.address, "--listen", "127.0.0.1:0"]
    proc = Proc(["peer", "seed", *args])
    try:
        proc.wait_for_line("b.bin.cascade")
        lines = messages(proc.stderr)
        assert lines[0].startswith("peer listening on ")
        assert any(line.startswith("a.bin.cascade: 10/10 blocks verified") for line in lines)
        assert any(line.startswith("b.bin.cascade: 2/5 blocks verified") and "partial" in line for line in lines)
    finally:
        assert proc.stop() == 0


@pytest.mark.process
def test_file_without_blocks_is_not_announced_but_an_empty_file_is(tmp_path: Path, tracker: FakeTracker) -> None:
    junk = make_sample(tmp_path, "junk.bin", 3000, 1000, seed=5)
    junk.data_path.write_bytes(b"\xff" * 3000)  # right size, wrong bytes
    empty = make_sample(tmp_path, "empty.bin", 0, 1000, seed=6)
    tracker.serve()
    args = [str(junk.cascade_path), str(empty.cascade_path), "--tracker", tracker.address, "--listen", "127.0.0.1:0"]
    proc = Proc(["peer", "seed", *args])
    try:
        proc.wait_for_line("empty.bin.cascade: 0/0 blocks verified")
        assert "junk.bin.cascade: 0/3 blocks verified" in proc.stderr
        assert "not announced" in proc.stderr
        wait_until(lambda: len(tracker.requests) >= 1, "a subscribe")
        assert {r.cascade_hash for r in tracker.requests} == {empty.cf.cascade_hash}
    finally:
        assert proc.stop() == 0


@pytest.mark.process
def test_listen_line_has_the_real_port(sample: Sample, tracker: FakeTracker) -> None:
    tracker.serve()
    proc, port = seed(sample, tracker.address)
    try:
        assert messages(proc.stderr)[0] == f"peer listening on 127.0.0.1:{port}"
        status, body, _ = _one(port, req(0, sample.cf.cascade_hash))
        assert (status, body) == (0, block(sample.data, sample.cf, 0))
    finally:
        proc.stop()


@pytest.mark.process
def test_every_file_is_served_once_the_listening_line_is_out(tmp_path: Path) -> None:
    big = make_sample(tmp_path, "big.bin", 24 << 20, 64 << 10, seed=7)
    proc = Proc(["peer", "seed", str(big.cascade_path), "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0"])
    try:
        port = proc.wait_listening()
        last = big.cf.block_count - 1
        assert _one(port, req(last, big.cf.cascade_hash))[:2] == (0, block(big.data, big.cf, last))
    finally:
        proc.stop()


def _one(port: int, raw: bytes) -> tuple[int, bytes, bool]:
    with connect(port) as sock:
        sock.sendall(raw)
        status, body = read_response(sock)
        return status, body, closed_by_server(sock)


@pytest.mark.process
def test_data_option_points_at_another_file(tmp_path: Path, sample: Sample, tracker: FakeTracker) -> None:
    elsewhere = tmp_path / "elsewhere.bin"
    sample.data_path.rename(elsewhere)
    tracker.serve()
    proc, port = seed(sample, tracker.address, "--data", str(elsewhere))
    try:
        last = sample.cf.block_count - 1
        assert _one(port, req(last, sample.cf.cascade_hash))[:2] == (0, block(sample.data, sample.cf, last))
    finally:
        proc.stop()


@pytest.mark.process
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--max-upload-rate", "fast"], "upload rate"),
        (["--listen", "127.0.0.1:99999"], "listen address"),
        (["--announce-ip", "not-an-ip"], "--announce-ip"),
        (["--idle-timeout", "0"], "--idle-timeout"),
    ],
)
def test_bad_option_values_are_one_line(sample: Sample, extra: list[str], needle: str) -> None:
    r = run_peer("seed", str(sample.cascade_path), "--tracker", "127.0.0.1:9", *extra)
    assert r.returncode == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.process
def test_missing_tracker_is_one_line(sample: Sample) -> None:
    r = run_peer("seed", str(sample.cascade_path))
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "--tracker" in r.stderr, r.stderr


@pytest.mark.process
def test_missing_data_file_is_one_line(sample: Sample) -> None:
    sample.data_path.unlink()
    r = run_peer("seed", str(sample.cascade_path), "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "no such data file" in r.stderr, r.stderr
    assert str(sample.data_path) in r.stderr


@pytest.mark.process
def test_malformed_cascade_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cascade"
    bad.write_bytes(b"CASCADE1" + bytes(100))
    r = run_peer("seed", str(bad), "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "bad.cascade" in r.stderr, r.stderr


@pytest.mark.process
def test_data_with_two_files_is_a_usage_error(tmp_path: Path, sample: Sample) -> None:
    other = make_sample(tmp_path, "other.bin", 100, 10, seed=3)
    r = run_peer(
        "seed", str(sample.cascade_path), str(other.cascade_path), "--data", str(sample.data_path), "--tracker", "x:1"
    )
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "--data" in r.stderr, r.stderr


@pytest.mark.process
def test_port_in_use_is_one_line(sample: Sample) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = run_peer("seed", str(sample.cascade_path), "--tracker", "127.0.0.1:9", "--listen", f"127.0.0.1:{port}")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "cannot listen" in r.stderr, r.stderr


# --- signals --------------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_0_even_while_busy(sample: Sample, sig: int) -> None:
    """Held connections do not hold the exit (their idle timeout is 30 s; how soon: bench/server_timing.py)."""
    proc, port = seed(sample, "127.0.0.1:9")  # nothing listens there: the announcer is retrying too
    try:
        idle = [connect(port) for _ in range(20)]
        half = connect(port)
        half.sendall(req(0, sample.cf.cascade_hash)[:30])
        stalled = connect(port)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"".join(req(i % 40, sample.cf.cascade_hash, keep=True) for i in range(400)))
        recv_exact(stalled, 100)
        proc.signal(sig)
        assert proc.wait(5) == 0
        for s in [*idle, half, stalled]:
            s.close()
    finally:
        proc.stop()


# --- timeouts and the rate limit --------------------------------------------------------


@pytest.mark.process
def test_silent_and_half_sent_clients_are_timed_out(sample: Sample) -> None:
    proc, port = seed(sample, "127.0.0.1:9", "--idle-timeout", "0.5")
    try:
        silent = connect(port)
        half = connect(port)
        half.sendall(req(1, sample.cf.cascade_hash)[:40])
        trickle = connect(port)
        trickle.sendall(req(1, sample.cf.cascade_hash, keep=True))
        assert read_response(trickle)[0] == 0
        # Closed well before the 10 s socket timeout (the default idle timeout is 30 s);
        # the deadlines themselves are checked on a virtual clock in test_peer_server_socketpair.py.
        for sock in (silent, half):
            assert closed_by_server(sock)
        # The kept-open connection idles out the same way after its last reply.
        assert closed_by_server(trickle)
        # The server is still fine.
        assert _one(port, req(2, sample.cf.cascade_hash))[0] == 0
        for sock in (silent, half, trickle):
            sock.close()
    finally:
        proc.stop()


@pytest.mark.process
def test_upload_rate_is_a_whole_process_limit(tmp_path: Path) -> None:
    big = make_sample(tmp_path, "big.bin", 3 << 20, 64 << 10, seed=4)
    proc, port = seed(big, "127.0.0.1:9", "--max-upload-rate", "2M")
    try:
        n = big.cf.block_count
        received = [0, 0]

        def pull(k: int) -> None:
            with connect(port) as sock:
                blocks = range(k, n, 2)
                sock.sendall(b"".join(req(i, big.cf.cascade_hash, keep=True) for i in blocks))
                for i in blocks:
                    status, body = read_response(sock)
                    assert status == 0 and body == block(big.data, big.cf, i)
                    received[k] += len(body)

        t = time.monotonic()
        threads = [threading.Thread(target=pull, args=(k,)) for k in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        elapsed = time.monotonic() - t
        assert sum(received) == 3 << 20
        # 3 MiB at 2 MiB/s over two connections: 1.5 s, never 0.2 s. Only this lower bound is
        # asserted, which no load can break: the exact share is checked on a virtual clock
        # (test_peer_server_socketpair.py); here, that --max-upload-rate reaches the server.
        assert elapsed > 1.0, elapsed
    finally:
        proc.stop()


# --- the tracker ------------------------------------------------------------------------


@pytest.mark.process
def test_subscribes_at_start_and_reannounces(sample: Sample, tracker: FakeTracker) -> None:
    tracker.serve()
    proc, port = seed(sample, tracker.address, "--announce-interval", "0.2")
    try:
        wait_until(lambda: len(tracker.requests) >= 3, "three subscribes")
        for r in tracker.requests[:3]:
            assert r.command == TrackerCommand.SUBSCRIBE
            assert r.cascade_hash == sample.cf.cascade_hash
            assert (r.ip, r.port) == ("127.0.0.1", port)
    finally:
        proc.stop()


@pytest.mark.process
def test_announce_ip_option(sample: Sample, tracker: FakeTracker) -> None:
    tracker.serve()
    proc, port = seed(sample, tracker.address, "--announce-ip", "10.1.2.3")
    try:
        wait_until(lambda: len(tracker.requests) >= 1, "a subscribe")
        assert (tracker.requests[0].ip, tracker.requests[0].port) == ("10.1.2.3", port)
    finally:
        proc.stop()


@pytest.mark.process
def test_tracker_down_then_back(sample: Sample, tracker: FakeTracker) -> None:
    proc, port = seed(sample, tracker.address)
    try:
        proc.wait_for_line(r"unreachable.*still serving")
        assert _one(port, req(0, sample.cf.cascade_hash))[0] == 0
        tracker.serve()
        proc.wait_for_line(r"tracker 127\.0\.0\.1:\d+ is back", timeout=TIMEOUT)
        assert tracker.requests and tracker.requests[0].cascade_hash == sample.cf.cascade_hash
        assert proc.stderr.count("unreachable") == 1, "one line when it goes down, however many retries"
    finally:
        proc.stop()


@pytest.mark.process
@pytest.mark.skipif(importlib.util.find_spec("tracker.cli") is None, reason="tracker not built yet")
def test_subscription_visible_at_the_real_tracker(sample: Sample) -> None:
    tracker = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0"])
    try:
        tport = tracker.wait_listening()
        proc, port = seed(sample, f"127.0.0.1:{tport}")
        try:
            where = TrackerAddress("127.0.0.1", tport)

            def listed() -> bool:
                peers = announce(where, TrackerCommand.LIST, sample.cf.cascade_hash, "127.0.0.1", 1, timeout=TIMEOUT)
                return any(p.ip == "127.0.0.1" and p.port == port and p.good for p in peers)

            wait_until(listed, "the seeder in the tracker's list")
        finally:
            proc.stop()
    finally:
        tracker.stop()


@pytest.mark.process
@pytest.mark.skipif(importlib.util.find_spec("tracker.cli") is None, reason="tracker not built yet")
def test_a_refusing_tracker_is_logged_once_and_serving_goes_on(tmp_path: Path, sample: Sample) -> None:
    allow = tmp_path / "allow.txt"
    allow.write_text("ab" * 32 + "\n")
    # -v: the tracker logs every refusal, so the test can wait for the repeats it sends.
    tracker = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--allow", str(allow), "-v"])
    try:
        tport = tracker.wait_listening()
        proc, port = seed(sample, f"127.0.0.1:{tport}", "--announce-interval", "0.1")
        try:
            proc.wait_for_line("refused")
            assert _one(port, req(0, sample.cf.cascade_hash))[0] == 0
            first = tracker.stderr.count("refused")
            wait_until(lambda: tracker.stderr.count("refused") >= first + 3, "three more refused announces")
            assert proc.stderr.count("refused") == 1
        finally:
            proc.stop()
    finally:
        tracker.stop()


def test_a_deleted_data_file_stops_serving_and_announcing_until_it_is_back(
    sample: Sample, tracker: FakeTracker
) -> None:
    tracker.serve()
    proc, port = seed(sample, tracker.address, "--announce-interval", "0.2")
    try:
        wait_until(lambda: len(tracker.requests) >= 1, "the first subscribe")
        sample.data_path.unlink()
        proc.wait_for_line("data file is gone; no longer serving its blocks")
        gone_at = len(tracker.requests)
        assert _one(port, req(0, sample.cf.cascade_hash))[:2] == (2, b"block not present: block 0")
        sample.data_path.write_bytes(sample.data)
        proc.wait_for_line(r"data file is back; 41/41 blocks verified")
        # The watcher looks every 2 s: ten announce intervals without one (but one in flight).
        assert len(tracker.requests) - gone_at <= 1
        back_at = len(tracker.requests)
        wait_until(lambda: len(tracker.requests) > back_at, "subscribing again")
        assert _one(port, req(40, sample.cf.cascade_hash))[:2] == (0, block(sample.data, sample.cf, 40))
        assert proc.stderr.count("data file") == 2
    finally:
        proc.stop()


# --- small pieces, in-process -----------------------------------------------------------


@pytest.mark.unit
def test_announce_ip_rule() -> None:
    assert announce_ip("127.0.0.1") == "127.0.0.1"
    assert announce_ip("0.0.0.0") == "0.0.0.0"
    assert announce_ip("localhost") == "0.0.0.0"
    with pytest.raises(UsageError, match="only IPv4"):
        announce_ip("::")
    assert announce_ip("0.0.0.0", "192.0.2.7") == "192.0.2.7"
    with pytest.raises(UsageError):
        announce_ip("0.0.0.0", "::1")


@pytest.mark.unit
def test_token_bucket_meters_bytes_at_its_rate() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> bool:
        slept.append(seconds)
        now[0] += seconds
        return False

    bucket = TokenBucket(1000, clock=lambda: now[0], sleep=sleep)
    assert bucket.acquire(500)  # starts empty: pay for the first bytes too
    assert slept == [0.5]
    now[0] += 1000  # a long quiet spell refills only up to the burst
    slept.clear()
    assert bucket.acquire(bucket.burst)
    assert slept == []
    assert bucket.acquire(250)
    assert slept == [0.25]
    bucket.close()
    assert not bucket.acquire(1)
