"""``cascade demo``: a whole swarm on this machine, with no flags needed.

It writes a random sample file into a temporary folder, starts a tracker on a
free loopback port, one seeder (upload-limited, so the file has to cascade
through the swarm) and a few fetchers started together, draws one progress
bar per fetcher, checks every result against the ``.cascade`` file, prints
where each fetcher got its blocks, and stops every process it started by PID.
With ``keep``, the fetchers go on seeding and the whole swarm, with its status
page, runs until Ctrl-C; the folder with the files and logs is kept too.

The processes are the real commands, started as ``python -m tracker|peer``
with the current interpreter, so the demo works after a plain ``pip install .``
from any folder. This module only starts and watches processes: it imports
no server or fetcher code and opens no socket. The fetchers' pipes are read by
one small thread per pipe into a queue (as :meth:`subprocess.Popen.communicate`
does on Windows), because select() on pipes is POSIX only.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from cascade.errors import CascadeError
from cascade.metafile import parse_cascade
from cascade.units import format_size, parse_size
from peer.localdata import check_data, create_metafile

DEFAULT_SIZE = "8M"
DEFAULT_BLOCK_SIZE = 64 << 10
DEFAULT_FETCHERS = 4
# The seeder's upload limit: low enough that most blocks must come from other fetchers.
DEFAULT_SEED_RATE = "4M"
START_TIMEOUT = 15.0
RUN_TIMEOUT = 120.0
# How long the children get to stop on SIGTERM (all together) before SIGKILL. Arbitrary:
# a stopping peer says goodbye to its tracker, which answers in milliseconds.
STOP_GRACE = 3.0
# How long a wait for output may block before Ctrl-C is looked at again (a blocked
# queue wait is not interrupted by Ctrl-C on every platform). Arbitrary, well below a second.
POLL = 0.2
LISTENING = re.compile(r"listening on (\S+):(\d+)")
HTTP_LISTENING = re.compile(r"tracker http on (\S+):(\d+)")


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen[bytes]
    err_path: Path | None = None
    port: int = 0
    lines: list[str] = field(default_factory=list)
    partial: bytes = b""
    stdout: bytes = b""
    readers: list[threading.Thread] = field(default_factory=list)

    def stderr_text(self) -> str:
        if self.err_path is not None:
            return self.err_path.read_text(errors="replace")
        return "\n".join(self.lines)


class _Demo:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.children: list[_Child] = []

    def spawn(self, name: str, args: list[str], *, pipe: bool = False) -> _Child:
        """Start ``python -m ARGS``; stderr goes to a file, or to a pipe we read (``pipe``)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if pipe:
            popen = subprocess.Popen(
                [sys.executable, "-m", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            child = _Child(name, popen)
        else:
            err_path = self.folder / f"{name}.log"
            with err_path.open("wb") as err:
                popen = subprocess.Popen(
                    [sys.executable, "-m", *args],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                )
            child = _Child(name, popen, err_path)
        self.children.append(child)
        return child

    def wait_for(self, child: _Child, pattern: re.Pattern[str]) -> re.Match[str]:
        """Poll ``child``'s log until a line matches; fail if it exits or takes too long."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            m = pattern.search(child.stderr_text())
            if m:
                return m
            if child.popen.poll() is not None:
                raise CascadeError(f"the {child.name} exited early:\n{child.stderr_text().strip()}")
            time.sleep(0.02)
        raise CascadeError(f"the {child.name} did not start within {START_TIMEOUT:g} s")

    def stop_all(self) -> None:
        """SIGTERM every child at once, SIGKILL what is left after STOP_GRACE; the whole bounded."""
        for child in reversed(self.children):
            p = child.popen
            if p.poll() is None:
                p.terminate()
        # One deadline for all: the children stop in parallel, so the waits must not add up
        # (one wait per child, then per reader, could add up past 30 s before Ctrl-C returned).
        deadline = time.monotonic() + STOP_GRACE
        for child in reversed(self.children):
            p = child.popen
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(3)
        readers_by = time.monotonic() + STOP_GRACE
        for child in reversed(self.children):
            p = child.popen
            # The process is gone, so its pipes are at end of file and their readers end.
            for reader in child.readers:
                reader.join(max(0.0, readers_by - time.monotonic()))
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()


def run(
    *,
    size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    fetchers: int = DEFAULT_FETCHERS,
    seed_rate: str = DEFAULT_SEED_RATE,
    keep: bool = False,
    out: IO[str] | None = None,
) -> int:
    """Run the demo; returns 0 when every fetcher got a complete, verified file.

    Raises :class:`CascadeError` when a process cannot be started.
    """
    say = out or sys.stdout
    length = size if size is not None else parse_size(DEFAULT_SIZE)
    folder = Path(tempfile.mkdtemp(prefix="cascade-demo-"))
    demo = _Demo(folder)
    try:
        data = folder / "sample.bin"
        with data.open("wb") as f:
            for off in range(0, length, 1 << 20):
                f.write(os.urandom(min(1 << 20, length - off)))
        cascade = folder / "sample.bin.cascade"
        cascade.write_bytes(create_metafile(data, block_size))
        cf = parse_cascade(cascade.read_bytes(), str(cascade))
        print(
            f"cascade demo: {format_size(length)} sample file in {cf.block_count} blocks of "
            f"{format_size(block_size)}, in {folder}",
            file=say,
        )

        tracker = demo.spawn("tracker", ["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"])
        tracker_port = int(demo.wait_for(tracker, LISTENING).group(2))
        http_port = int(demo.wait_for(tracker, HTTP_LISTENING).group(2))
        tracker_addr = f"127.0.0.1:{tracker_port}"
        seeder = demo.spawn(
            "seeder",
            ["peer", "seed", str(cascade), "--tracker", tracker_addr, "--listen", "127.0.0.1:0"]
            + (["--max-upload-rate", seed_rate] if seed_rate else []),
        )
        seeder.port = int(demo.wait_for(seeder, LISTENING).group(2))
        demo.wait_for(seeder, re.compile(r"blocks verified"))
        print(
            f"tracker on {tracker_addr}, seeder on 127.0.0.1:{seeder.port}"
            + (f" (upload limited to {seed_rate}/s)" if seed_rate else ""),
            file=say,
        )
        print(f"status page: http://127.0.0.1:{http_port}/", file=say, flush=True)

        started = time.monotonic()
        workers: list[_Child] = []
        for n in range(1, fetchers + 1):
            target = folder / f"fetcher{n}" / "sample.bin"
            target.parent.mkdir()
            args = ["peer", "fetch", str(cascade), "--out", str(target), "--tracker", tracker_addr]
            args += ["--listen", "127.0.0.1:0", "--json", "--progress-lines"] + (["--seed"] if keep else [])
            workers.append(demo.spawn(f"fetcher {n}", args, pipe=True))
        print(f"started {fetchers} fetchers together", file=say, flush=True)
        output = _watch(workers, length, seeding=keep)
        elapsed = time.monotonic() - started

        names = {seeder.port: "seeder"} | {w.port: w.name for w in workers if w.port}
        ok = True
        print(file=say)
        for n, w in enumerate(workers, 1):
            ok &= _report(w, folder / f"fetcher{n}" / "sample.bin", cf, names, say)
        verdict = "every fetcher has a verified copy" if ok else "FAILED"
        print(f"\n{verdict}; all {fetchers} done in {elapsed:.2f} s", file=say, flush=True)
        if output is not None:
            print(
                f"the swarm keeps running; status page: http://127.0.0.1:{http_port}/ (Ctrl-C stops it)",
                file=say,
                flush=True,
            )
            _serve_until_interrupted(output, workers)
        return 0 if ok else 1
    finally:
        demo.stop_all()
        if keep:
            print(f"kept {folder}", file=say)
        else:
            shutil.rmtree(folder, ignore_errors=True)


# What a pipe reader hands over: (fetcher index, "out" or "err", bytes; b"" at end of file).
_Chunk = tuple[int, str, bytes]


class _Output:
    """The fetchers' stdout and stderr, read by one thread per pipe into one queue."""

    def __init__(self, workers: list[_Child]) -> None:
        self.chunks: queue.SimpleQueue[_Chunk] = queue.SimpleQueue()
        self.open_pipes = 0
        for i, w in enumerate(workers):
            for kind, stream in (("err", w.popen.stderr), ("out", w.popen.stdout)):
                assert stream is not None
                t = threading.Thread(target=self._read, args=(i, kind, stream), name=f"demo-{kind}-{i}", daemon=True)
                w.readers.append(t)
                self.open_pipes += 1
                t.start()

    def _read(self, i: int, kind: str, stream: IO[bytes]) -> None:
        # Ends at end of file, which comes when the fetcher exits or is stopped.
        while True:
            try:
                chunk = os.read(stream.fileno(), 65536)
            except (OSError, ValueError):  # closed under us at shutdown
                chunk = b""
            self.chunks.put((i, kind, chunk))
            if not chunk:
                return

    def get(self, timeout: float) -> list[_Chunk]:
        """What arrived within ``timeout`` seconds (waiting for the first chunk only)."""
        try:
            got = [self.chunks.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                got.append(self.chunks.get_nowait())
            except queue.Empty:
                return got


def _watch(workers: list[_Child], total: int, seeding: bool = False) -> _Output | None:
    """Read every fetcher's stderr and stdout until they finish, drawing one bar each.

    A fetcher finishes when it exits or, when ``seeding``, once it printed its
    JSON summary; the readers are then returned, to keep draining the seeding
    fetchers' output.
    """
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    bars = [
        tqdm(
            total=total,
            desc=w.name,
            position=i,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=not tty,
            leave=True,
        )
        for i, w in enumerate(workers)
    ]
    output = _Output(workers)
    closed = [0] * len(workers)

    def finished(i: int) -> bool:
        return closed[i] == 2 or (seeding and b"\n" in workers[i].stdout)

    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not all(finished(i) for i in range(len(workers))) and time.monotonic() < deadline:
            for i in _pump(output, workers, bars, POLL):
                closed[i] += 1
    finally:
        for bar in bars:
            bar.close()
    if seeding:
        return output
    for w in workers:
        try:
            w.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.popen.kill()
            w.popen.wait(3)
    return None


def _pump(output: _Output, workers: list[_Child], bars: list[Any], timeout: float) -> list[int]:
    """One round of reading the fetchers' output; returns the index of each stream that closed."""
    closed: list[int] = []
    for i, kind, chunk in output.get(timeout):
        w = workers[i]
        if not chunk:
            output.open_pipes -= 1
            closed.append(i)
            continue
        if kind == "out":
            w.stdout += chunk
            continue
        text = w.partial + chunk
        *complete, w.partial = text.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            parts = line.split()
            if len(parts) == 4 and parts[0] == "progress":
                if bars:
                    bars[i].n = int(parts[1])
                    bars[i].set_postfix_str(f"{parts[3]} peer{'' if parts[3] == '1' else 's'}", refresh=False)
                    bars[i].refresh()
                continue
            m = LISTENING.search(line)
            if m and not w.port:
                w.port = int(m.group(2))
            w.lines.append(line)
    return closed


def _serve_until_interrupted(output: _Output, workers: list[_Child]) -> None:
    """Keep draining the seeding fetchers' output (a full pipe would stall them) until Ctrl-C.

    SIGTERM ends the wait the same way, so the caller still stops every process by PID.
    """

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        while output.open_pipes:
            _pump(output, workers, [], POLL)
        # Every fetcher exited (killed from outside?); the tracker and seeder still serve.
        while True:
            time.sleep(POLL)  # only Ctrl-C (SIGINT) or SIGTERM ends the wait
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(w: _Child, path: Path, cf: Any, names: dict[int, str], say: IO[str]) -> bool:
    lines = w.stdout.decode(errors="replace").strip().splitlines()
    doc: dict[str, Any] = {}
    if lines:
        try:
            doc = json.loads(lines[-1])
        except ValueError:
            doc = {}
    check = check_data(path, cf)
    # A fetcher told to --seed is still running (returncode None) once complete.
    good = w.popen.poll() in (0, None) and doc.get("complete") is True and check.complete
    if not good:
        errors = [line for line in w.lines if "error" in line] or w.lines[-3:]
        print(f"{w.name}: FAILED (exit {w.popen.returncode}): {' / '.join(errors)}", file=say)
        return False
    sources: dict[str, int] = doc.get("sources", {})
    parts = []
    for addr, blocks in sorted(sources.items(), key=lambda kv: -kv[1]):
        port = int(addr.rpartition(":")[2])
        parts.append(f"{blocks} from {names.get(port, addr)}")
    seconds = float(doc.get("seconds", 0.0)) or 1e-9
    got = int(doc.get("bytes_downloaded", 0))
    print(
        f"{w.name}: verified {format_size(got)} in {seconds:.2f} s ({format_size(got / seconds)}/s): "
        + ", ".join(parts),
        file=say,
    )
    return True
