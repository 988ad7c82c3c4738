"""Peers and `cascade publish` against the tracker's HTTP API, as real processes on loopback."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests

from cascade.collection import MAX_COLLECTION_SIZE
from cascade.errors import CascadeError, TrackerUnreachable
from cascade.metafile import MAX_METAFILE_SIZE, encode_cascade
from cascade.wire import TrackerCommand
from peer.http_client import HTTP_BACKOFF, RETRIES, download_cascade
from peer.tracker_client import TrackerRefused, announce, parse_tracker
from tests.procs import Proc, command_line

pytestmark = pytest.mark.process

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"
TOKEN = "t0ken"
RUN_TIMEOUT = 60


class Tracker:
    def __init__(self, *extra: str) -> None:
        self.proc = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", *extra])
        try:
            self.port = self.proc.wait_listening()
            self.http = int(self.proc.wait_for_line(r"tracker http on (\S+):(\d+)").group(2))
        except BaseException:
            self.proc.stop()
            raise
        self.url = f"http://127.0.0.1:{self.http}"
        self.addr = f"127.0.0.1:{self.port}"

    def peers(self, cascade_hash: str) -> list[tuple[str, int, bool]]:
        r = requests.get(f"{self.url}/api/v1/swarms/{cascade_hash}/peers", timeout=5)
        if r.status_code == 404:
            return []
        return [(p["ip"], p["port"], p["good"]) for p in r.json()["peers"]]


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    t = Tracker("--api-token", TOKEN)
    try:
        yield t
    finally:
        assert t.proc.stop() == 0
        assert "Traceback" not in t.proc.stderr


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """A private copy of sample_data (the tests must not write into the repository)."""
    folder = tmp_path / "samples"
    shutil.copytree(SAMPLES, folder)
    return folder


def chash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command_line(args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def seed(cascade: Path, tracker: str) -> Proc:
    proc = Proc(["peer", "seed", str(cascade), "--tracker", tracker, "--listen", "127.0.0.1:0"])
    try:
        proc.wait_for_line(r"blocks verified")
    except BaseException:
        proc.stop()
        raise
    return proc


def wait_for_peers(t: Tracker, cascade_hash: str, count: int) -> list[tuple[str, int, bool]]:
    deadline = time.monotonic() + 10
    while True:
        peers = t.peers(cascade_hash)
        if len(peers) >= count or time.monotonic() > deadline:
            return peers
        time.sleep(0.05)


def one_error_line(stderr: str, prefix: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    errors = [line for line in lines if line.startswith(prefix)]
    assert len(errors) == 1, stderr
    return errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_http_and_binary_peers_find_each_other(tracker: Tracker, samples: Path, tmp_path: Path) -> None:
    noise = samples / "noise.bin.cascade"
    poem = samples / "poem.txt.cascade"
    http_seeder = seed(noise, tracker.url)  # announces over HTTP
    tcp_seeder = seed(poem, tracker.addr)  # announces over the binary protocol
    try:
        assert [good for _, _, good in wait_for_peers(tracker, chash(noise), 1)] == [True]
        assert [good for _, _, good in wait_for_peers(tracker, chash(poem), 1)] == [True]
        # A binary-protocol fetcher finds the seeder that announced over HTTP...
        out1 = tmp_path / "a" / "noise.bin"
        out1.parent.mkdir()
        r = run("peer", "fetch", str(noise), "--tracker", tracker.addr, "--out", str(out1), "--listen", "127.0.0.1:0")
        assert r.returncode == 0, r.stderr
        assert out1.read_bytes() == (samples / "noise.bin").read_bytes()
        # ...and an HTTP fetcher finds the one that announced over the binary protocol.
        out2 = tmp_path / "b" / "poem.txt"
        out2.parent.mkdir()
        r = run("peer", "fetch", str(poem), "--tracker", tracker.url, "--out", str(out2), "--listen", "127.0.0.1:0")
        assert r.returncode == 0, r.stderr
        assert out2.read_bytes() == (samples / "poem.txt").read_bytes()
        # Neither fetcher (no --seed) subscribed: the seeders are the only good peers. The
        # binary-protocol fetcher stays listed as a plain peer until its TTL; the HTTP one said
        # "stopped" on exit and is gone already.
        assert sorted(good for _, _, good in tracker.peers(chash(noise))) == [False, True]
        assert [good for _, _, good in tracker.peers(chash(poem))] == [True]
        # And the binary protocol sees the HTTP seeder directly.
        known = {port for _, port, _ in tracker.peers(chash(noise))}
        records = announce(parse_tracker(tracker.addr), TrackerCommand.LIST, bytes.fromhex(chash(noise)), "10.9.9.9", 1)
        assert {r.port for r in records} == known
    finally:
        http_seeder.stop()
        tcp_seeder.stop()
    assert "Traceback" not in http_seeder.stderr + tcp_seeder.stderr


def test_publish_then_fetch_by_url(tracker: Tracker, samples: Path, tmp_path: Path) -> None:
    noise = samples / "noise.bin.cascade"
    seeder = seed(noise, tracker.addr)
    try:
        r = run("cascade", "publish", str(noise), "--tracker", tracker.url, "--token", TOKEN)
        assert r.returncode == 0, r.stderr
        url = r.stdout.strip().splitlines()[-1]
        assert url == f"{tracker.url}/cascades/{chash(noise)}.cascade"
        assert "uploaded" in r.stderr
        r = run("cascade", "publish", str(noise), "--tracker", tracker.url, "--token", TOKEN)
        assert r.returncode == 0 and r.stdout.strip() == url and "already" in r.stderr

        # No --tracker: the URL's tracker (over HTTP); the name comes from the tracker.
        here = tmp_path / "dl"
        here.mkdir()
        r = run("peer", "fetch", url, "--listen", "127.0.0.1:0", cwd=here)
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines()[0].startswith("peer listening on ")
        assert (here / "noise.bin").read_bytes() == (samples / "noise.bin").read_bytes()
        assert (here / "noise.bin.cascade").read_bytes() == noise.read_bytes()
        # Again: the .cascade already there (same bytes) is kept, the data is complete.
        r = run("peer", "fetch", url, "--listen", "127.0.0.1:0", cwd=here)
        assert r.returncode == 0, r.stderr

        # With --out and an explicit binary --tracker.
        out = tmp_path / "elsewhere" / "copy.bin"
        out.parent.mkdir()
        r = run("peer", "fetch", url, "--out", str(out), "--tracker", tracker.addr, "--listen", "127.0.0.1:0")
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == (samples / "noise.bin").read_bytes()
        assert (out.parent / "copy.bin.cascade").read_bytes() == noise.read_bytes()
    finally:
        seeder.stop()


class _Liar(BaseHTTPRequestHandler):
    """Serves the same (valid) .cascade bytes whatever hash the URL names."""

    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("X-Cascade-Name", "liar.bin")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_fetch_by_url_refuses_a_file_that_does_not_match_its_hash(samples: Path, tmp_path: Path) -> None:
    _Liar.body = (samples / "poem.txt.cascade").read_bytes()
    server = HTTPServer(("127.0.0.1", 0), _Liar)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        want = chash(samples / "noise.bin.cascade")
        url = f"http://127.0.0.1:{server.server_address[1]}/cascades/{want}.cascade"
        r = run("peer", "fetch", url, "--listen", "127.0.0.1:0", cwd=tmp_path)
        assert r.returncode == 1
        line = one_error_line(r.stderr, "peer fetch: error:")
        assert "SHA-256" in line and want in line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]  # nothing saved, not even a partial file
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_fetch_by_url_names_the_url_of_a_hostile_collection_and_saves_nothing(tmp_path: Path) -> None:
    # The right hash, so the bytes are what the URL names; its content is refused, naming
    # the URL (not the temporary file it was received in, which is gone by then).
    hello = encode_cascade(6, 6, hashlib.sha256(b"hello\n").digest(), hashlib.sha256(b"hello\n").digest())
    path = b"../evil.txt"
    _Liar.body = b"CASCCOLL" + (1).to_bytes(4, "big") * 2 + len(path).to_bytes(2, "big") + path
    _Liar.body += len(hello).to_bytes(4, "big") + hello
    server = HTTPServer(("127.0.0.1", 0), _Liar)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cascades/{hashlib.sha256(_Liar.body).hexdigest()}.cascade"
        r = run("peer", "fetch", url, "--listen", "127.0.0.1:0", "--out", str(tmp_path / "out"), cwd=tmp_path)
        assert r.returncode == 1
        line = one_error_line(r.stderr, "peer fetch: error:")
        assert line == f"peer fetch: error: {url}: member 1 of 1: path '../evil.txt' has a '..' component"
        assert list(tmp_path.iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class _Claims(BaseHTTPRequestHandler):
    """Announces a body of ``length`` bytes, sends 8 of them, and hangs up."""

    length = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(self.length))
        self.end_headers()
        self.wfile.write(b"CASCCOLL")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("length", "refused_by_size"),
    [(MAX_COLLECTION_SIZE + 1, True), (MAX_METAFILE_SIZE + 1, False)],
    ids=["over-any-metafile", "a-collection-over-the-cascade-limit"],
)
def test_fetch_by_url_takes_a_collection_up_to_its_own_limit(
    tmp_path: Path, length: int, refused_by_size: bool
) -> None:
    """A collection may be 1 GiB, a .cascade 512 MiB: the download stops only past the larger."""
    _Claims.length = length
    server = HTTPServer(("127.0.0.1", 0), _Claims)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cascades/{'ab' * 32}.cascade"
        with pytest.raises(CascadeError) as caught:
            download_cascade(url, folder=str(tmp_path))
        assert ("larger than any valid" in str(caught.value)) == refused_by_size, caught.value
        assert list(tmp_path.iterdir()) == []  # nothing saved, not even a partial file
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_fetch_by_url_errors(tracker: Tracker, tmp_path: Path) -> None:
    missing = f"{tracker.url}/cascades/{'ab' * 32}.cascade"
    r = run("peer", "fetch", missing, "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert r.returncode == 1
    assert "no .cascade file with hash" in one_error_line(r.stderr, "peer fetch: error:")
    r = run("peer", "fetch", f"http://127.0.0.1:{free_port()}/cascades/{'ab' * 32}.cascade", cwd=tmp_path)
    assert r.returncode == 1
    assert "cannot download" in one_error_line(r.stderr, "peer fetch: error:")
    r = run("peer", "fetch", f"{tracker.url}/files/x.cascade", cwd=tmp_path)
    assert r.returncode == 2  # bad usage
    assert "invalid .cascade URL" in one_error_line(r.stderr, "peer fetch: error:")
    r = run("peer", "fetch", str(SAMPLES / "poem.txt.cascade"), "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert r.returncode == 2
    assert "--tracker is required" in one_error_line(r.stderr, "peer fetch: error:")
    assert list(tmp_path.iterdir()) == []


def test_publish_errors(tracker: Tracker, samples: Path) -> None:
    noise = str(samples / "noise.bin.cascade")
    # 1: the upload failed; 2: bad usage (cascade/command.py).
    cases = [
        (["--tracker", tracker.url], "Bearer", 1),
        (["--tracker", tracker.url, "--token", "wrong"], "wrong API token", 1),
        (["--tracker", f"http://127.0.0.1:{free_port()}", "--token", TOKEN], "unreachable", 1),
        (["--tracker", "127.0.0.1:8888"], "expected http://HOST:PORT", 2),
    ]
    for extra, message, code in cases:
        r = run("cascade", "publish", noise, *extra)
        assert r.returncode == code, r.stderr
        assert message in one_error_line(r.stderr, "cascade publish:")
        assert r.stdout == ""
    r = run("cascade", "publish", str(samples / "poem.txt"), "--tracker", tracker.url, "--token", TOKEN)
    assert r.returncode == 1
    assert "not a .cascade file" in one_error_line(r.stderr, "cascade publish:")


def test_http_announce_errors_are_cascade_errors(tracker: Tracker) -> None:
    h = bytes(32)
    with pytest.raises(TrackerUnreachable, match="unreachable"):
        announce(parse_tracker(f"http://127.0.0.1:{free_port()}"), TrackerCommand.LIST, h, "127.0.0.1", 1, 2.0)
    # Quick to say so: a refused connect fails at once, and the retries wait under a second
    # in all (a value, not a wall-clock bound).
    assert sum(HTTP_BACKOFF.delay(n) for n in range(1, RETRIES + 1)) < 1.0
    # A server that is not a tracker: a 404 with a readable message.
    with pytest.raises(TrackerRefused, match="404"):
        announce(parse_tracker(tracker.url + "/nothing"), TrackerCommand.LIST, h, "127.0.0.1", 1, 2.0)
    records = announce(parse_tracker(tracker.url + "/"), TrackerCommand.SUBSCRIBE, h, "127.0.0.1", 5, 2.0)
    assert records == ()
    assert str(parse_tracker(tracker.url + "/")) == tracker.url
