"""The baselines, each run on the same file in the same run as Cascade.

- the raw Python ceiling (``bench/raw_ceiling.py``: sendfile -> recv_into + sha256 + pwrite);
- libtorrent, one process per peer (``bench/lt_peer.py``), peers connected directly on 127.0.0.1;
- aria2 with opentracker, when both are installed.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, Group, free_port

DONE = re.compile(r"^done (\S+)$", re.M)
VERIFIED = re.compile(r"^verified (\S+)$", re.M)
TIMEOUT = 300.0


@dataclass
class RawRun:
    gbps: float  # inside the fetch process, connect to last pwrite
    wall_seconds: float  # fetch process start to exit


def raw_ceiling(group: Group, data: Path, out: Path) -> RawRun:
    size = data.stat().st_size
    server = group.python("raw-serve", ["-m", "bench.raw_ceiling", "serve", str(data)])
    port = server.wait_listening(30)
    client = group.python("raw-fetch", ["-m", "bench.raw_ceiling", "fetch", str(port), str(out), str(size)])
    if client.wait(TIMEOUT) != 0:
        raise BenchError(f"raw fetch failed\n{client.tail()}")
    server.wait(30)
    inner = json.loads(client.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    return RawRun(size / inner["seconds"] / 1e9, client.seconds)


def make_torrent(group: Group, data: Path, torrent: Path, tracker: str | None = None) -> int:
    """Create a v1 .torrent with libtorrent; returns its piece length."""
    args = ["-m", "bench.lt_peer", "mktorrent", str(data), str(torrent)] + ([tracker] if tracker else [])
    child = group.python("lt-mktorrent", args)
    if child.wait(TIMEOUT) != 0:
        raise BenchError(f"libtorrent could not make a torrent\n{child.tail()}")
    m = re.search(r"piece_length (\d+)", child.stdout)
    return int(m.group(1)) if m else 0


@dataclass
class SwarmRun:
    seconds: float  # start of the first fetcher to the last one complete (all pieces hash-checked)
    flushed_seconds: float  # ... and written out of libtorrent's cache


def libtorrent_swarm(
    group: Group, torrent: Path, seed_dir: Path, work: Path, fetchers: int, settle: float = 0.0
) -> SwarmRun:
    """One libtorrent seeder (already holding the data) and ``fetchers`` downloaders, one process each.

    ``settle``: seconds to wait, old outputs deleted, before the downloaders start
    (see ``Bench.cascade_runs``).
    """
    seed_port = free_port()
    seeder = group.python("lt-seed", ["-m", "bench.lt_peer", "seed", str(torrent), str(seed_dir), str(seed_port)])
    seeder.wait_listening(TIMEOUT)
    ports = [free_port() for _ in range(fetchers)]
    dirs = []
    for i in range(fetchers):
        d = work / f"lt-fetch{i}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        dirs.append(d)
    peers = ",".join(str(p) for p in [seed_port, *ports])
    time.sleep(settle)
    t0 = time.time()
    children = [
        group.python(f"lt-fetch{i}", ["-m", "bench.lt_peer", "fetch", str(torrent), str(dirs[i]), str(ports[i]), peers])
        for i in range(fetchers)
    ]
    done = [float(c.wait_for(DONE, TIMEOUT, "out").group(1)) for c in children]
    verified = [float(m.group(1)) for c in children if (m := VERIFIED.search(c.stdout))]
    for c in [*children, seeder]:
        c.stop()
    return SwarmRun(max(verified) - t0, max(done) - t0)


def have_aria2() -> bool:
    return shutil.which("aria2c") is not None and shutil.which("opentracker") is not None


def start_opentracker(group: Group, work: Path, port: int, info_hashes: list[bytes]) -> None:
    """opentracker on 127.0.0.1:PORT (TCP and UDP); the Debian build serves only whitelisted info hashes."""
    whitelist = work / "opentracker-whitelist.txt"
    whitelist.write_text("".join(h.hex() + "\n" for h in info_hashes))
    conf = work / "opentracker.conf"
    conf.write_text(f"access.whitelist {whitelist}\n")
    group.spawn("opentracker", ["opentracker", "-f", str(conf), "-i", "127.0.0.1", "-p", str(port), "-P", str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise BenchError("opentracker did not start listening")


def http_get(port: int, path: str) -> bytes:
    """One HTTP/1.0 GET to 127.0.0.1, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _quote(raw: bytes) -> str:
    return "".join(f"%{b:02X}" for b in raw)


ARIA2_COMMON = [
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=false",
    "--interface=127.0.0.1",
    "--disable-ipv6=true",
    "--console-log-level=warn",
    "--summary-interval=0",
    "--seed-time=1000",
    "--seed-ratio=1000",
    "--follow-torrent=false",
    "--quiet=true",
]


def aria2_swarm(group: Group, data: Path, work: Path, fetchers: int) -> float:
    """aria2 seeder and fetchers announcing to a local opentracker; time until every fetcher completes.

    Completion is aria2's --on-bt-download-complete hook (run once every piece
    is verified, before seeding); finished fetchers keep seeding, as BitTorrent peers do.
    """
    import libtorrent as lt  # only for the info hash of the torrent made by lt_peer

    work.mkdir(parents=True, exist_ok=True)
    torrent = work / "aria2.torrent"
    ot_port = free_port()
    make_torrent(group, data, torrent, f"http://127.0.0.1:{ot_port}/announce")
    info_hash = lt.torrent_info(str(torrent)).info_hash().to_bytes()
    # opentracker cannot bind port 0: free_port() picked a port free a moment ago.
    start_opentracker(group, work, ot_port, [info_hash])
    hook = work / "aria2-done.sh"
    hook.write_text('#!/bin/sh\ndate +%s.%N > "$3.done"\n')
    hook.chmod(0o755)
    seeder = group.spawn(
        "aria2-seed",
        [
            "aria2c",
            *ARIA2_COMMON,
            f"--dir={data.parent}",
            "--check-integrity=true",
            f"--listen-port={free_port()}",
            str(torrent),
        ],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if b"8:completei1e" in http_get(ot_port, f"/scrape?info_hash={_quote(info_hash)}"):
                break
        except OSError:
            pass
        if seeder.poll() is not None:
            raise BenchError(f"the aria2 seeder exited with {seeder.rc}\n{seeder.tail()}")
        time.sleep(0.02)
    else:
        raise BenchError("the aria2 seeder never announced itself as complete")
    outs = []
    for i in range(fetchers):
        d = work / f"aria2-fetch{i}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        outs.append(d / data.name)
    t0 = time.time()
    children = [
        group.spawn(
            f"aria2-fetch{i}",
            [
                "aria2c",
                *ARIA2_COMMON,
                f"--dir={outs[i].parent}",
                f"--listen-port={free_port()}",
                f"--on-bt-download-complete={hook}",
                str(torrent),
            ],
        )
        for i in range(fetchers)
    ]
    marks = [Path(str(o) + ".done") for o in outs]
    while time.monotonic() < deadline and not all(m.exists() and m.read_text().strip() for m in marks):
        for c in children:
            if c.poll() is not None:
                raise BenchError(f"{c.name} exited with {c.rc}\n{c.tail()}")
        time.sleep(0.005)
    if not all(m.exists() for m in marks):
        raise BenchError("aria2 fetchers did not finish in time")
    seconds = max(float(m.read_text()) for m in marks) - t0
    for c in children:
        c.stop()
    return seconds
