"""One clear line from the real commands (issue 9, sections 5 and 6), and ``cascade demo --keep``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cascade import __version__
from peer.http_client import upload_cascade
from tests.mounts import mounted
from tests.procs import Proc, command_line

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data" / "poem.txt.cascade"  # 128 KiB of data


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command_line(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int, *phrases: str) -> str:
    assert proc.returncode == code, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def published() -> Iterator[str]:
    """The URL of the sample .cascade on a real tracker run with --http-port."""
    tracker = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"])
    try:
        http = int(tracker.wait_for_line(r"tracker http on \S+:(\d+)").group(1))
        yield upload_cascade(SAMPLE, f"http://127.0.0.1:{http}", None, None).url
    finally:
        tracker.stop()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder whatever its mode")
def test_fetch_url_into_an_unwritable_folder(published: str, tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = run("peer", "fetch", published, "--out", str(folder / "poem.txt"), "--listen", "127.0.0.1:0")
    finally:
        folder.chmod(0o755)
    assert_one_line(proc, 1, str(folder / "poem.txt.cascade"), "cannot save the downloaded .cascade file")


def tmpfs(options: str) -> Iterator[Path]:
    """A real 64 KiB tmpfs mounted with ``options`` (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = Path(tempfile.mkdtemp(prefix="cascade-tmpfs-"))
    try:
        command = ["mount", "-t", "tmpfs", "-o", f"size=64k,{options}", "tmpfs", str(mount)]
        with mounted(command, mount, "this machine does not let us mount a tmpfs"):
            yield mount
    finally:
        mount.rmdir()


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    yield from tmpfs("rw")


@pytest.fixture
def read_only_tmpfs() -> Iterator[Path]:
    yield from tmpfs("ro")


def test_fetch_url_into_a_read_only_folder(published: str, read_only_tmpfs: Path) -> None:
    # Root ignores a folder's mode but not a read-only mount.
    out = read_only_tmpfs / "poem.txt"
    proc = run("peer", "fetch", published, "--out", str(out), "--listen", "127.0.0.1:0")
    assert_one_line(proc, 1, f"{out}.cascade: cannot save the downloaded .cascade file: Read-only file system")


def fill(folder: Path) -> None:
    """Write into ``folder`` until its file system is full (at most 1 MiB: the tmpfs holds 64 KiB)."""
    with (folder / "filler").open("wb", buffering=0) as f:
        for _ in range(256):
            try:
                f.write(b"\0" * 4096)
            except OSError:
                return
    raise AssertionError("the file system did not fill up")


def test_fetch_url_into_a_full_disk(published: str, small_tmpfs: Path) -> None:
    fill(small_tmpfs)
    out = small_tmpfs / "poem.txt"
    proc = run("peer", "fetch", published, "--out", str(out), "--listen", "127.0.0.1:0")
    assert_one_line(proc, 1, f"{out}.cascade: disk full: cannot save the downloaded .cascade file")
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler"]  # no partial file left behind


def test_fetch_url_whose_data_does_not_fit(published: str, small_tmpfs: Path) -> None:
    out = small_tmpfs / "poem.txt"  # the .cascade fits in 64 KiB, the 128 KiB of data do not
    proc = run("peer", "fetch", published, "--out", str(out), "--listen", "127.0.0.1:0")
    assert_one_line(proc, 1, f"{out}.part: disk full: cannot reserve space for the output file")


def test_a_fifo_given_as_the_cascade_file_is_refused_at_once(tmp_path: Path) -> None:
    # Opened plainly, a FIFO waits for a writer forever, and peer fetch (which turns
    # SIGTERM into a stop request) could not even be terminated. The timeout bounds a regression.
    fifo = tmp_path / "x.cascade"
    os.mkfifo(fifo)
    for args in (("cascade", "info", str(fifo)), ("peer", "fetch", str(fifo), "--tracker", "127.0.0.1:9")):
        assert_one_line(run(*args, timeout=20), 1, f"{fifo}: not a regular file")
    assert_one_line(run("cascade", "info", str(tmp_path)), 1, f"{tmp_path}: is a directory")


def test_ipv6_listen_is_refused_in_one_line() -> None:
    # A bad command-line value is exit 2 for every command (cascade/command.py).
    for command, code in ((["fetch", str(SAMPLE)], 2), (["seed", str(SAMPLE)], 2)):
        proc = run("peer", *command, "--tracker", "127.0.0.1:9", "--listen", "[::1]:0")
        assert_one_line(proc, code, "cannot listen on IPv6 address ::1", "only IPv4")


def test_versions() -> None:
    for command in ("peer", "tracker", "cascade"):
        proc = run(command, "--version")
        assert proc.returncode == 0 and proc.stdout.strip() == f"{command} {__version__}", proc


def test_create_refuses_an_absurd_block_size_without_force(tmp_path: Path) -> None:
    data = tmp_path / "d.bin"
    data.write_bytes(os.urandom(64 << 10))
    proc = run("cascade", "create", str(data), "--block-size", "3")
    assert_one_line(proc, 2, "21,846 blocks", "--block-size 256KiB", "--force")
    assert not (tmp_path / "d.bin.cascade").exists()
    proc = run("cascade", "create", str(data), "--block-size", "3", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d.bin.cascade").stat().st_size == 64 + 32 * 21_846


def test_server_logs_carry_timestamps() -> None:
    tracker = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0"])
    try:
        tracker.wait_listening()
        first = tracker.stderr.splitlines()[0]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} tracker listening on 127\.0\.0\.1:\d+", first)
    finally:
        tracker.stop()


def children_of(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it exited meanwhile
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for_stdout(proc: Proc, pattern: str, timeout: float) -> re.Match[str]:
    """Poll ``proc``'s stdout (where the demo reports) until a line matches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, proc.stdout)
        if m:
            return m
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} on stdout in {timeout} s:\n{proc.stdout}\n{proc.stderr}")


def test_demo_keep_serves_the_status_page_until_ctrl_c() -> None:
    demo = Proc(["cascade", "demo", "--keep", "--fetchers", "1"])
    children: list[int] = []
    folder = ""
    try:
        m = wait_for_stdout(demo, r"keeps running; status page: (http://\S+)", 60)
        page = requests.get(m.group(1), timeout=5)
        assert page.status_code == 200 and "Cascade tracker" in page.text
        children = children_of(demo.popen.pid)
        assert len(children) == 3, children  # tracker, seeder, one fetcher still seeding
        assert all(alive(pid) for pid in children)
        demo.signal(signal.SIGINT)
        assert demo.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in children)
        folder = wait_for_stdout(demo, r"kept (\S+)", 5).group(1)
    finally:
        demo.stop()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if folder.startswith(tempfile.gettempdir()):
            subprocess.run(["rm", "-rf", folder], timeout=30)
