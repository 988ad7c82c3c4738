"""`peer fetch`: the downloader in-process against test doubles, and the command's contract as a process."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.errors import CascadeTimeout, DataError
from cascade.metafile import CascadeFile, encode_cascade, parse_cascade
from peer.fetcher import Fetcher, FetchPolicy
from peer.localdata import DataCheck, check_data
from peer.server import BlockServer
from peer.storage import BlockStore
from tests.doubles import REPO, DoubleServer, Swarm, fetch_complete, last_json, make_file, sha256_file, started
from tests.procs import command_line

FAST = FetchPolicy(first_response_timeout=1.0, stall_timeout=10.0, backoff_min=0.05)


def fetch_in_process(cf: CascadeFile, out: Path, servers: list[DoubleServer], policy: FetchPolicy = FAST) -> Fetcher:
    peers = [(s.address[0], s.address[1], True) for s in servers]
    return fetch_complete(cf, out, lambda: peers, policy, add=peers)[0]


@contextlib.contextmanager
def doubles(cf: CascadeFile, data: Path, *modes: str) -> Iterator[list[DoubleServer]]:
    """One started DoubleServer per mode, serving ``data``; every one is stopped on leaving."""
    with contextlib.ExitStack() as stack:
        yield started(stack, (DoubleServer(mode, cf, data) for mode in modes))


# --- the engine, in-process ---------------------------------------------------------


@pytest.mark.loopback
def test_one_connection_per_request_with_a_closing_server(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 300_000, 4096)
    with doubles(cf, tmp_path / "d.bin", "close") as servers:
        fetcher = fetch_in_process(cf, tmp_path / "out", servers)
    # Only the very first connection carried pipelined requests; no block was lost to the closes.
    assert fetcher.partial_result(0).blocks_downloaded == cf.block_count
    assert servers[0].requests <= cf.block_count + 8


@pytest.mark.loopback
def test_server_that_answers_one_request_per_connection(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    with doubles(cf, tmp_path / "d.bin", "once") as servers:
        fetcher = fetch_in_process(cf, tmp_path / "out", servers)
    # One first-response timeout (1 s here) to learn it, then one connection per request: the
    # planner's record of the peer says so, and the peer was never dropped for being slow.
    # (How long it takes is a bench matter, not a test's: see README "Tests".)
    (peer,) = fetcher.planner.peers.values()
    assert peer.keepopen is False and peer.failures == 0
    assert fetcher.partial_result(0).blocks_downloaded == cf.block_count


@pytest.mark.loopback
def test_server_that_rejects_the_keepopen_marker(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 100_000, 4096)
    with doubles(cf, tmp_path / "d.bin", "strict") as servers:
        fetcher = fetch_in_process(cf, tmp_path / "out", servers)
    assert fetcher.partial_result(0).sources == {f"127.0.0.1:{servers[0].address[1]}": cf.block_count}


@pytest.mark.loopback
def test_silent_peer_holds_no_block_hostage(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 200_000, 4096)
    with doubles(cf, tmp_path / "d.bin", "silent", "close") as servers:
        fetcher = fetch_in_process(cf, tmp_path / "out", servers, FetchPolicy(first_response_timeout=30.0))
    # The endgame re-asks the blocks the silent peer sits on; nobody waits for its 30 s timeout:
    # the download completed with the silent peer never timed out (no failure counted).
    silent_addr = servers[0].address[:2]
    silent = f"127.0.0.1:{silent_addr[1]}"
    assert silent not in fetcher.partial_result(0).sources
    assert fetcher.planner.peers[("127.0.0.1", silent_addr[1])].failures == 0


@pytest.mark.loopback
def test_corrupt_peer_is_dropped_then_banned_and_nothing_reaches_the_disk(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 100_000, 2048)
    out = tmp_path / "out"
    with doubles(cf, tmp_path / "d.bin", "corrupt") as [bad]:
        store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
        peers = [(bad.address[0], bad.address[1], True)]
        fetcher = Fetcher(store, lambda: peers, policy=FetchPolicy(stall_timeout=1.5, backoff_min=0.05))
        try:
            fetcher.add_peers(peers)
            with pytest.raises(CascadeTimeout):
                fetcher.run()
        finally:
            store.close()
    result = fetcher.partial_result(0)
    assert result.banned == [f"127.0.0.1:{bad.address[1]}"]
    assert result.blocks_downloaded == 0
    # Two offences, two connections: it was not asked again once banned.
    assert bad.requests <= 2 * FetchPolicy().max_depth
    assert check_data(out, cf, whole_file=False).valid_count == 0


@pytest.mark.loopback
def test_blocks_larger_than_the_hashing_buffer(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 11 << 20, 5 << 20)
    with doubles(cf, tmp_path / "d.bin", "close") as servers:
        fetch_in_process(cf, tmp_path / "out", servers)


@pytest.mark.loopback
def test_whole_file_hash_mismatch_is_an_error(tmp_path: Path) -> None:
    _, good = make_file(tmp_path, "d.bin", 50_000, 4096)
    # Right block hashes, wrong whole-file hash: every block verifies, the file must not.
    cf = parse_cascade(encode_cascade(good.data_length, good.block_size, bytes(32), good.block_hashes))
    with doubles(cf, tmp_path / "d.bin", "close") as servers, pytest.raises(DataError, match="whole-file SHA-256"):
        fetch_in_process(cf, tmp_path / "out", servers)


@pytest.mark.loopback
def test_everything_a_partial_peer_holds_is_fetched(tmp_path: Path) -> None:
    data = tmp_path / "d.bin"
    _, cf = make_file(tmp_path, "d.bin", 200 * 1024, 1024)
    # The only peer holds every third block, starting with block 2 (so never the next one in order).
    valid = bytearray(1 if i % 3 == 2 else 0 for i in range(cf.block_count))
    seeding = BlockStore.open_for_seeding(cf, data, DataCheck(valid, valid.count(1), cf.data_length, None))
    server = BlockServer("127.0.0.1", 0)
    server.start()
    out = tmp_path / "out"
    store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
    try:
        server.add_store(seeding)
        peers = [("127.0.0.1", server.address[1], False)]
        fetcher = Fetcher(store, lambda: peers, policy=FetchPolicy(stall_timeout=1.0))
        fetcher.add_peers(peers)
        with pytest.raises(CascadeTimeout):
            fetcher.run()
    finally:
        store.close()
        server.stop()
        seeding.close()
    assert bytes(check_data(out, cf, whole_file=False).valid) == bytes(valid)


@pytest.mark.loopback
def test_no_peers_is_a_timeout(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 10_000, 1024)
    store = BlockStore.open_for_fetching(cf, tmp_path / "out", check_data(tmp_path / "out", cf))
    try:
        fetcher = Fetcher(store, list, policy=FetchPolicy(stall_timeout=0.3))
        with pytest.raises(CascadeTimeout, match="no peers"):
            fetcher.run()
    finally:
        store.close()


# --- the command --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.process
def test_unreachable_tracker_is_one_line_and_non_zero(swarm: Swarm, tmp_path: Path) -> None:
    cascade, _ = make_file(tmp_path, "d.bin", 10_000, 1024)
    proc = swarm.start(
        "peer", "fetch", str(cascade), "--out", str(tmp_path / "o"), "--tracker", f"127.0.0.1:{free_port()}",
        "--listen", "127.0.0.1:0", "--json",
    )  # fmt: skip
    assert proc.wait(20) == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "unreachable" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert last_json(proc)["complete"] is False


@pytest.mark.process
def test_complete_file_downloads_nothing(swarm: Swarm, tmp_path: Path) -> None:
    cascade, _ = make_file(tmp_path, "d.bin", 100_000, 4096)
    proc = swarm.fetcher(cascade, tmp_path / "d.bin")
    assert proc.wait(20) == 0, proc.stderr
    doc = last_json(proc)
    assert doc["complete"] is True and doc["blocks_downloaded"] == 0 and doc["bytes_downloaded"] == 0


@pytest.mark.process
def test_empty_file(swarm: Swarm, tmp_path: Path) -> None:
    cascade, _ = make_file(tmp_path, "empty", 0, 1024)
    out = tmp_path / "o"
    proc = swarm.fetcher(cascade, out)
    assert proc.wait(20) == 0, proc.stderr
    assert out.read_bytes() == b""


@pytest.mark.process
def test_bad_values_are_usage_errors(swarm: Swarm, tmp_path: Path) -> None:
    cascade, _ = make_file(tmp_path, "d.bin", 1000, 1024)
    for extra in (["--max-peers", "0"], ["--listen", "nonsense"]):
        proc = swarm.fetcher(cascade, tmp_path / "o", *extra)
        assert proc.wait(20) != 0
        assert "Traceback" not in proc.stderr and proc.stderr.strip(), extra
    missing = swarm.fetcher(tmp_path / "nope.cascade", tmp_path / "o")
    assert missing.wait(20) == 1 and "no such file" in missing.stderr


@pytest.mark.process
def test_seed_keeps_serving_after_completion(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 500_000, 8192)
    seeder, _ = swarm.seeder(cascade, cf)
    first = swarm.fetcher(cascade, tmp_path / "a", "--seed")
    first.wait_for_line("seeding")
    seeder.stop()
    second = swarm.fetcher(cascade, tmp_path / "b")
    assert second.wait(20) == 0, second.stderr
    assert sha256_file(tmp_path / "b") == cf.file_hash
    first.signal(signal.SIGTERM)
    assert first.wait(5) == 0


def run_in_pty(args: list[str], timeout: float = 30.0) -> tuple[int, str]:
    """Run ``python -m ARGS`` on a pseudo-terminal 100 columns wide; return (exit status, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.chdir(REPO)
        os.execv(sys.executable, command_line(args))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    out = bytearray()
    deadline = time.monotonic() + timeout
    reaped = (0, 0)
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(fd)
        wait_until = time.monotonic() + 5
        while (reaped := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < wait_until:
            time.sleep(0.02)
        if reaped == (0, 0):
            os.kill(pid, signal.SIGKILL)
            reaped = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(reaped[1]), out.decode(errors="replace")


@pytest.mark.process
def test_progress_bar_on_a_terminal_only(swarm: Swarm, tmp_path: Path) -> None:
    cascade, cf = make_file(tmp_path, "d.bin", 2 << 20, 16 << 10)
    swarm.seeder(cascade, cf, "--max-upload-rate", "4M")
    code, output = run_in_pty(
        ["peer", "fetch", str(cascade), "--out", str(tmp_path / "tty"), "--tracker", swarm.tracker,
         "--listen", "127.0.0.1:0"]
    )  # fmt: skip
    assert code == 0, output
    assert "%|" in output and " peer" in output and "B/s" in output
    assert "complete: 2.0 MiB" in output
    plain = swarm.fetcher(cascade, tmp_path / "plain")
    assert plain.wait(20) == 0
    assert "%|" not in plain.stderr and "complete: 2.0 MiB" in plain.stderr
