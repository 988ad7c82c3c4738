"""Running Cascade itself for the benchmarks: tracker, ``peer seed`` and ``peer fetch`` processes.

The fetch timing is wall time from starting the ``peer fetch`` process(es) until the
last one exits 0, so it includes Python start-up, the tracker query and the final
whole-file hash check. Outputs are then checked again with hashlib, outside the timing.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError, Child, Group, wait_all
from cascade.metafile import read_cascade
from cascade.wire import (
    BLOCK_RESPONSE_HEADER_SIZE,
    BlockRequest,
    BlockResponseHeader,
    TrackerCommand,
)
from peer.tracker_client import TrackerAddress, announce

READY_TIMEOUT = 120.0
HTTP_LINE = re.compile(r"tracker http on (\S+):(\d+)")


@dataclass
class FetchRun:
    seconds: float  # first start to last exit, all fetchers
    per_fetcher: list[float]
    maxrss_kib: list[int]
    reports: list[dict[str, object]] = field(default_factory=list)
    cpu_s: float = 0.0  # user + system seconds of the fetchers together


def create(group: Group, data: Path, block_size: int, name: str = "create") -> tuple[Path, float]:
    """``cascade create`` with ``--force``; returns the .cascade path and the wall time."""
    meta = data.with_name(data.name + ".cascade")
    args = ["-m", "peer.cascade_command", "create", str(data), "--block-size", str(block_size), "-o", str(meta)]
    child = group.python(name, [*args, "--force"])
    if child.wait(READY_TIMEOUT) != 0:
        raise BenchError(f"cascade create failed\n{child.tail()}")
    return meta, child.seconds


@dataclass(frozen=True)
class Tracker:
    port: int
    http_port: int | None  # the JSON API, used to watch the swarm without joining it


def start_tracker(group: Group) -> Tracker:
    """``tracker run`` on 127.0.0.1, with its HTTP API when this tracker has one."""
    args = ["-m", "tracker", "run", "--host", "127.0.0.1", "--port", "0"]
    child = group.python("tracker", [*args, "--http-port", "0"])
    try:
        port = child.wait_listening(READY_TIMEOUT)
        m = child.wait_for(HTTP_LINE, READY_TIMEOUT)
        return Tracker(port, int(m.group(2)))
    except BenchError:
        if child.poll() is None:
            raise
    child = group.python("tracker-nohttp", args)  # a tracker without --http-port
    return Tracker(child.wait_listening(READY_TIMEOUT), None)


def _swarm_ports(tracker: Tracker, cascade_hash: bytes, probe_port: int) -> set[int]:
    """The ports the tracker lists for a swarm: via the HTTP API, else a list request from ``probe_port``."""
    if tracker.http_port is not None:
        url = f"http://127.0.0.1:{tracker.http_port}/api/v1/swarms/{cascade_hash.hex()}/peers"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return {int(p["port"]) for p in json.load(reply)["peers"]}
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return set()
            raise
    peers = announce(
        TrackerAddress("127.0.0.1", tracker.port), TrackerCommand.LIST, cascade_hash, "127.0.0.1", probe_port, 5.0
    )
    return {p.port for p in peers}


def block_status(port: int, cascade_hash: bytes, index: int) -> int:
    """Ask a peer for one block and return the status (the body is read and dropped)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(BlockRequest(index, cascade_hash).encode())
        head = _recv_exact(sock, BLOCK_RESPONSE_HEADER_SIZE)
        header = BlockResponseHeader.decode(head)
        return header.status


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise BenchError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def start_seeder(
    group: Group, meta: Path, tracker: Tracker, name: str = "seed", data: Path | None = None
) -> tuple[Child, int]:
    """Start ``peer seed``; return it and its port once it serves verified data and the tracker lists it."""
    args = ["-m", "peer", "seed", str(meta), "--tracker", f"127.0.0.1:{tracker.port}", "--listen", "127.0.0.1:0"]
    if data is not None:
        args += ["--data", str(data)]
    seeder = group.python(name, args)
    port = seeder.wait_listening(READY_TIMEOUT)
    cf = read_cascade(meta)
    deadline = time.monotonic() + READY_TIMEOUT
    last = max(0, cf.block_count - 1)
    while block_status(port, cf.cascade_hash, last) != 0:
        if time.monotonic() > deadline or seeder.poll() is not None:
            raise BenchError(f"seeder never served its last block\n{seeder.tail()}")
        time.sleep(0.01)
    # Wait for the subscription. Without the HTTP API the probe has to list, which
    # enrols it: it lists from a bound but never listening port, so a fetcher that
    # tries that entry is refused at once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        probe_port = probe.getsockname()[1]
        while time.monotonic() < deadline:
            if port in _swarm_ports(tracker, cf.cascade_hash, probe_port):
                return seeder, port
            time.sleep(0.01)
    raise BenchError(f"seeder never appeared at the tracker\n{seeder.tail()}")


def fetch_args(meta: Path, out: Path, tracker: str, listen: str, *more: str) -> list[str]:
    """The Python arguments of one ``peer fetch --json`` of ``meta`` into ``out`` (then ``more``)."""
    fetch = ["-m", "peer", "fetch", str(meta), "--out", str(out)]
    return [*fetch, "--tracker", tracker, "--listen", listen, "--json", *more]


def run_fetchers(
    group: Group, meta: Path, outs: list[Path], tracker: Tracker, timeout: float, extra: list[str] | None = None
) -> FetchRun:
    """Start one ``peer fetch --json`` per output path at once; wait for all to exit 0."""
    for out in outs:
        out.unlink(missing_ok=True)
        # A run killed mid-download leaves OUT.part, which the next run would resume.
        out.with_name(out.name + ".part").unlink(missing_ok=True)
    children = [
        group.python(f"fetch{i}", fetch_args(meta, out, f"127.0.0.1:{tracker.port}", "127.0.0.1:0", *(extra or [])))
        for i, out in enumerate(outs)
    ]
    seconds = wait_all(children, timeout)
    bad = [c for c in children if c.rc != 0]
    if bad:
        raise BenchError(f"{bad[0].name} exited with {bad[0].rc}\n{bad[0].tail()}")
    reports: list[dict[str, object]] = []
    for c in children:
        lines = c.stdout.strip().splitlines()
        try:
            reports.append(json.loads(lines[-1]) if lines else {})
        except json.JSONDecodeError:
            reports.append({})
    cpu = sum(c.cpu_seconds for c in children)
    return FetchRun(seconds, [c.seconds for c in children], [c.maxrss_kib for c in children], reports, cpu)


def check_outputs(outs: list[Path], expected_hex: str) -> None:
    """Hash each output with hashlib (not timed); raise if any differs."""
    for out in outs:
        h = hashlib.sha256()
        with open(out, "rb", buffering=0) as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        if h.hexdigest() != expected_hex:
            raise BenchError(f"{out}: wrong SHA-256 after fetch")
