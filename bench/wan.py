"""The swarm on emulated LAN hosts, where each host's upload is the limit (issue 11).

    python -m bench.wan                        # 4 scenarios x 3 runs: Cascade (default, 256 KiB), libtorrent, HTTP
    python -m bench.wan --quick                # smoke test: scenario 8x40, 1 run, 8 MiB, no plot kept
    python -m bench.wan --scenario 8x40 --runs 1 --tools cascade,libtorrent --json out.json
    python -m bench --only wan                 # the same with the defaults, as a case of the whole bench

Each scenario gets its own hosts (``bench/netlab.py``: network namespaces on a bridge, each
host's upload shaped by ``htb``): one seeder with the file, N fetchers, plus an unshaped
host for Cascade's tracker. Each upload queues in a plain FIFO, or with ``--queue pfifo_fast``
in Linux's default priority queue. All fetchers start together; finished fetchers keep serving
(``peer fetch --seed``; libtorrent peers keep seeding); every copy is checked by SHA-256
afterwards. Needs root; without it the case says so and is skipped.

Per tool and scenario it prints:

- ``seconds``: from starting the fetchers to the last one holding a verified copy
  (Cascade: its ``--json`` line, timed by the mtime of its stdout file; libtorrent: ``done``,
  every piece hash-checked and flushed; HTTP: curl's exit), and ``x_T_min`` against the
  physical bound ``T_min = max(F/S, N*F/(S + sum U))``; TCP/IP headers make ~1.046 x T_min
  the practical floor. Plain HTTP's own bound is ``N*F/S``.
- ``seeder_copies``: bytes the seeder's htb class sent (``tc -s class show``, headers
  included) from the start until the last fetcher finished, divided by the file size.
- ``status2_per_block``: Cascade only, "not present" replies the fetchers received per block
  they downloaded, summed from each fetcher's ``-v`` end-of-fetch per-peer lines
  ("PEER: N blocks, M not present"); ``null`` when those lines are missing.
- ``cpu_s``: user + system seconds of every process of the tool (tracker, seeder, fetchers or
  HTTP server and curl), from ``wait4`` when each is reaped after the run.
- ``seeder_busy`` / ``fetchers_busy``: bytes sent / (rate x seconds) for the seeder and for
  all fetchers together: where the time goes when the ratio is high.
- ``seeder_start_s`` / ``tail_s``: when the seeder's link had sent the first 1 % of its bytes,
  and how long the last fetcher took after the seeder had sent 99 % of them (both from the
  samples of its class counter). A seeder whose link is full in between spends ``seconds`` on
  the fetchers' start, its own bytes at its rate, and the tail: the last blocks passing from
  fetcher to fetcher.

For the first run of each scenario it draws ``docs/wan-<scenario>.svg`` (``bench/wan_plot.py``):
each host's upload over time and each fetcher's finish, one panel per tool.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cascade_swarm import check_outputs, fetch_args
from bench.data import MiB, loadavg, machine, make_file, sha256_file
from bench.netlab import DEFAULT_QUEUE, QUEUES, Host, Lab, Sampler, have_root, sh
from bench.procs import BenchError, Child, Group
from peer.cascade_command import DEFAULT_BLOCK_SIZE, default_block_size, parse_block_size

# Fixed ports: every host has its own namespace, so nothing else can hold them.
PEER_PORT, TRACKER_PORT, TRACKER_HTTP_PORT, LT_PORT, HTTP_PORT = 6666, 7000, 7001, 6881, 8000
SAMPLE_PERIOD = 0.1  # seconds between upload-counter samples (plots, the seeder's start and tail)
SPAN_SHARE = 0.01  # the seeder's start and tail are read where it sent this share of its bytes, and 1 - it
POLL = 0.02  # seconds between completion checks: small against the >= 3 s runs here
TIMEOUT_FACTOR = 6.0  # a swarm run longer than this x T_min is killed and reported as a timeout
READY_TIMEOUT = 60.0
LT_PIECE = 256 * 1024  # as in the issue's libtorrent column
# TCP/IP headers per payload byte on these links (1448 bytes of payload per 1514 on the wire):
# the ~1.046 x T_min floor of the docstring.
HEADER_FACTOR = 1.046
# A --seed fetcher's log lines start with a timestamp (peer/common.py TIMESTAMP_FORMAT).
NOT_PRESENT = re.compile(r"^(?:\S+ )?\s+\S+: (\d+) blocks, (\d+) not present$", re.M)
DONE = re.compile(r"^done (\S+)$", re.M)
REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    seeder_mbit: float
    fetcher_mbit: tuple[float, ...]
    fetcher_delay: tuple[float, ...] = ()  # seconds after the others each fetcher starts (late joiners); () = all at 0

    @property
    def n(self) -> int:
        return len(self.fetcher_mbit)

    @property
    def slug(self) -> str:
        """The name as a file name part."""
        return self.name.replace("/", "_")

    def delay(self, i: int) -> float:
        return self.fetcher_delay[i] if self.fetcher_delay else 0.0

    def t_min(self, size: int) -> float:
        """The physical bound: the seeder must send F once; all N copies need N*F of upload in total."""
        bits = size * 8
        return max(bits / (self.seeder_mbit * 1e6), self.n * bits / ((self.seeder_mbit + sum(self.fetcher_mbit)) * 1e6))

    def http_bound(self, size: int) -> float:
        """Every copy from the seeder's host: N*F/S."""
        return self.n * size * 8 / (self.seeder_mbit * 1e6)


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("8x40", "1 seeder + 8, every upload 40 Mbit/s", 40, (40,) * 8),
        Scenario("16x40", "1 seeder + 16, every upload 40 Mbit/s", 40, (40,) * 16),
        Scenario("8x100", "seeder 40 Mbit/s, 8 fetchers at 100", 40, (100,) * 8),
        Scenario("4x10+4x40", "seeder 40 Mbit/s, 4 fetchers at 10 and 4 at 40", 40, (10,) * 4 + (40,) * 4),
    )
}
TOOLS = ("cascade", "libtorrent", "http")
SPEC = re.compile(r"(\d+(?:\.\d+)?)/(.+)")
GROUP = re.compile(r"(\d+)x(\d+(?:\.\d+)?)(?:@(\d+(?:\.\d+)?))?")
MAX_FETCHERS = 64  # namespaces and processes on one machine; far beyond what 2 cores run meaningfully


def parse_scenario(text: str) -> Scenario:
    """A named scenario, or ``SEEDER/NxMBIT[@DELAY]+...`` (e.g. ``100/8x10``, ``40/7x40+1x40@8``).

    Raises UsageError for anything else. ``@DELAY`` starts that group's fetchers DELAY seconds
    after the others (late joiners); T_min does not count the delay.
    """
    from cascade.errors import UsageError

    if text in SCENARIOS:
        return SCENARIOS[text]
    m = SPEC.fullmatch(text)
    groups = [GROUP.fullmatch(g) for g in m.group(2).split("+")] if m else []
    if not m or not groups or not all(groups):
        raise UsageError(
            f"--scenario {text!r}: expected one of {', '.join(SCENARIOS)} or SEEDER/NxMBIT[@DELAY]+... (e.g. 100/8x10)"
        )
    rates: list[float] = []
    delays: list[float] = []
    for g in groups:
        assert g is not None
        count, mbit, delay = int(g.group(1)), float(g.group(2)), float(g.group(3) or 0)
        if count < 1 or mbit <= 0:
            raise UsageError(f"--scenario {text!r}: every group needs at least one fetcher and a rate above 0")
        rates += [mbit] * count
        delays += [delay] * count
    seeder = float(m.group(1))
    if seeder <= 0 or len(rates) > MAX_FETCHERS:
        raise UsageError(f"--scenario {text!r}: the seeder's rate must be above 0 and at most {MAX_FETCHERS} fetchers")
    late = f", late joiners at {sorted(set(d for d in delays if d))} s" if any(delays) else ""
    parts = " + ".join(f"{g.group(1)} at {g.group(2)}" for g in groups if g)
    title = f"seeder {seeder:g} Mbit/s, fetchers {parts}{late}"
    return Scenario(text, title, seeder, tuple(rates), tuple(delays) if any(delays) else ())


@dataclass
class Options:
    runs: int = 3
    size: int = 64 * MiB
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    # Cascade's block sizes; empty: cascade create's default for the file's size and 256 KiB
    # (the default for every size under 16 GiB until 2026-12-02), see cascade_blocks.
    block_sizes: tuple[int, ...] = ()
    tools: tuple[str, ...] = TOOLS
    plot: bool = True
    plot_to_docs: bool = True  # False: the plots go to the temporary folder (a smoke test keeps docs/ as is)
    # Every fetcher's upload is limited to this fraction of its host's rate (payload: the rate
    # less TCP/IP headers): Cascade's with --max-upload-rate, libtorrent's with its
    # upload_rate_limit, as a user would leave room on an uplink with a deep queue; None: no
    # limit (the default, what the tables use).
    fetcher_upload: float | None = None
    # The queue in front of each host's upload (the leaf under its htb class): the kernel's
    # default there, a plain FIFO (pfifo), as the tables use; "pfifo_fast" is the default root
    # queue of a Linux host without fq_codel (this VM's), which sends packets of a higher
    # priority first.
    queue: str = DEFAULT_QUEUE

    @classmethod
    def quick(cls) -> Options:
        return cls(runs=1, size=8 * MiB, scenarios=("8x40",), plot_to_docs=False)

    def cascade_blocks(self) -> tuple[int, ...]:
        """The block sizes Cascade runs with: those given, else the size's default, then 256 KiB if that differs."""
        return self.block_sizes or tuple(dict.fromkeys((default_block_size(self.size), DEFAULT_BLOCK_SIZE)))


@dataclass
class ToolRun:
    tool: str
    seconds: float | None = None  # None: timed out or failed
    finish: list[float | None] = field(default_factory=list)  # per fetcher, from the start
    sent: dict[str, int] = field(default_factory=dict)  # bytes per shaped host, start to last finish
    cpu_s: float = 0.0
    status2: int | None = None
    blocks: int | None = None
    error: str = ""
    t0: float = 0.0
    samples: list[tuple[float, list[int]]] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # names of the sampled hosts, in sample order


def block_label(block: int) -> str:
    return f"{block >> 20}M" if block >= MiB and block % MiB == 0 else f"{block >> 10}K"


class Wan:
    """Runs the scenarios; every process and namespace it makes is gone when ``close`` returns."""

    def __init__(self, opts: Options, work: Path) -> None:
        self.opts = opts
        self.work = work
        self.lab: Lab | None = None
        self.group: Group | None = None
        self.seed_dir = work / "seed"
        self.out_dir = work / "out"
        self.data = self.seed_dir / "data.bin"
        self.expected = ""
        self.metas: dict[int, Path] = {}
        self.torrent = self.seed_dir / "data.torrent"

    def close(self) -> None:
        if self.group is not None:
            stop_group(self.group)
            self.group = None
        if self.lab is not None:
            self.lab.close()
            self.lab = None

    # --- preparation -------------------------------------------------------

    def prepare(self) -> None:
        """The data file, one .cascade per block size, and the .torrent (outside any namespace)."""
        self.seed_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        make_file(self.data, self.opts.size)
        self.expected = sha256_file(self.data)
        g = Group(self._logdir("prepare"))
        try:
            if "cascade" in self.opts.tools:
                for block in self.opts.cascade_blocks():
                    meta = self.seed_dir / f"data-{block_label(block)}.cascade"
                    c = g.python(
                        f"create-{block_label(block)}",
                        [
                            "-m",
                            "peer.cascade_command",  # the `cascade` command (moved out of the pure core)
                            "create",
                            str(self.data),
                            "--block-size",
                            str(block),
                            "-o",
                            str(meta),
                            "--force",
                        ],
                    )
                    if c.wait(READY_TIMEOUT) != 0:
                        raise BenchError(f"cascade create failed\n{c.tail()}")
                    self.metas[block] = meta
            if "libtorrent" in self.opts.tools:
                c = g.python(
                    "lt-mktorrent",
                    ["-m", "bench.lt_peer", "mktorrent", str(self.data), str(self.torrent), "-", str(LT_PIECE)],
                )
                if c.wait(READY_TIMEOUT) != 0:
                    raise BenchError(f"libtorrent could not make a torrent (pip install libtorrent?)\n{c.tail()}")
        finally:
            g.stop_all()

    def _logdir(self, name: str) -> Path:
        d = self.work / "logs" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def tool_names(self) -> list[str]:
        names: list[str] = []
        for tool in self.opts.tools:
            if tool == "cascade":
                names += [f"cascade-{block_label(b)}" for b in self.opts.cascade_blocks()]
            else:
                names.append(tool)
        return names

    # --- one scenario --------------------------------------------------------

    def scenario(self, sc: Scenario) -> list[list[ToolRun]]:
        """``runs`` rounds of every tool on fresh hosts; per round, one ToolRun per tool."""
        lab = Lab(f"cwan{os.getpid()}-")
        self.lab = lab
        uploads: list[tuple[str, float | None]] = [("seed", sc.seeder_mbit)]
        uploads += [(f"f{i}", mbit) for i, mbit in enumerate(sc.fetcher_mbit)]
        uploads.append(("tracker", None))
        lab.build(uploads, self.opts.queue)
        rounds = []
        try:
            for rep in range(self.opts.runs):
                rounds.append([self.run_once(sc, tool, rep) for tool in self.tool_names()])
        finally:
            self.lab = None
            lab.close()
        return rounds

    def run_once(self, sc: Scenario, tool: str, rep: int) -> ToolRun:
        """One run of ``tool``; a failure or timeout is recorded in the result, not raised."""
        assert self.lab is not None
        lab = self.lab
        g = self.group = Group(self._logdir(f"{sc.slug}-{tool}-run{rep}"))
        seed = lab.host("seed")
        fetchers = [lab.host(f"f{i}") for i in range(sc.n)]
        shaped = [h for h in lab.hosts if h.mbit is not None]
        run = ToolRun(tool, finish=[None] * sc.n, hosts=[h.name for h in shaped])
        outs: list[Path] = []
        sampler: Sampler | None = None
        try:
            if tool.startswith("cascade-"):
                block = next(b for b in self.opts.cascade_blocks() if block_label(b) == tool.removeprefix("cascade-"))
                start, done_at = self._cascade(g, self.metas[block], seed, fetchers, outs)
            elif tool == "libtorrent":
                start, done_at = self._libtorrent(g, seed, fetchers, outs)
            else:
                start, done_at = self._http(g, seed, fetchers, outs)
            bound = sc.http_bound(self.opts.size) * 1.5 if tool == "http" else sc.t_min(self.opts.size) * TIMEOUT_FACTOR
            before = {h.name: lab.sent_bytes(h) for h in shaped}
            sampler = Sampler(shaped, SAMPLE_PERIOD)
            sampler.start()
            run.t0 = time.time()
            t0_perf = time.perf_counter()
            children: list[Child | None] = [start(i) if sc.delay(i) <= 0 else None for i in range(sc.n)]
            last = max((sc.delay(i) for i in range(sc.n)), default=0.0)
            deadline = time.monotonic() + bound + last + 10.0  # + start-up of N processes on a busy machine
            while None in run.finish and time.monotonic() < deadline:
                for i, c in enumerate(children):
                    if c is None:
                        if time.perf_counter() - t0_perf >= sc.delay(i):
                            children[i] = start(i)  # a late joiner
                    elif run.finish[i] is None:
                        run.finish[i] = done_at(c, run.t0, t0_perf)
                time.sleep(POLL)
            after = {h.name: lab.sent_bytes(h) for h in shaped}
            sampler.stop()
            run.sent = {k: after[k] - before[k] for k in after}
            run.samples = sampler.samples
            missing = sum(f is None for f in run.finish)
            if missing:
                raise BenchError(f"timeout: {missing} of {sc.n} fetchers not done after {bound + last + 10:.0f} s")
            run.seconds = max(f for f in run.finish if f is not None)
        except BenchError as exc:
            run.error = str(exc).splitlines()[0]
            print(f"wan {sc.name} {tool}: {exc}", file=sys.stderr, flush=True)
        finally:
            if sampler is not None:
                sampler.stop()
            stop_group(g)
            self.group = None
        run.cpu_s = sum(c.cpu_seconds for c in g.children)
        if tool.startswith("cascade-"):
            counts = [m for c in g.children if c.name.startswith("fetch") for m in NOT_PRESENT.findall(c.stderr)]
            if counts:
                run.blocks = sum(int(b) for b, _ in counts)
                run.status2 = sum(int(n) for _, n in counts)
        if not run.error:
            try:
                check_outputs(outs, self.expected)
            except (BenchError, OSError) as exc:
                run.error = f"copy check failed: {exc}"
                run.seconds = None
        for out in outs:
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        shutil.rmtree(self.out_dir / "lt", ignore_errors=True)
        return run

    # --- the tools: each starts its servers and returns (start fetchers, "done at" of one fetcher) ---

    def _cascade(
        self, g: Group, meta: Path, seed: Host, fetchers: list[Host], outs: list[Path]
    ) -> tuple[Callable[[int], Child], DoneAt]:
        assert self.lab is not None
        tracker = self.lab.host("tracker")
        t = g.python(
            "tracker",
            [
                "-m",
                "tracker",
                "run",
                "--host",
                tracker.ip,
                "--port",
                str(TRACKER_PORT),
                "--http-port",
                str(TRACKER_HTTP_PORT),
            ],
            tracker.netns,
        )
        t.wait_listening(READY_TIMEOUT)
        taddr = f"{tracker.ip}:{TRACKER_PORT}"
        s = g.python(
            "seed",
            [
                "-m",
                "peer",
                "seed",
                str(meta),
                "--tracker",
                taddr,
                "--listen",
                f"{seed.ip}:{PEER_PORT}",
                "--data",
                str(self.data),
            ],
            seed.netns,
        )
        s.wait_listening(READY_TIMEOUT)
        self._wait_subscribed(tracker, meta, seed)
        outs += [self.out_dir / f"cascade-{i}.bin" for i in range(len(fetchers))]

        def start(i: int) -> Child:
            h = fetchers[i]
            args = fetch_args(meta, outs[i], taddr, f"{h.ip}:{PEER_PORT}", "--seed", "-v")
            cap = self._upload_cap(h)
            if cap:
                args += ["--max-upload-rate", str(cap)]
            return g.python(f"fetch{i}", args, h.netns)

        def done_at(c: Child, t0: float, t0_perf: float) -> float | None:
            text = c.stdout
            if '"complete": true' in text:
                return c.out_path.stat().st_mtime - t0  # when the JSON line was written
            _check_alive(c)
            return None

        return start, done_at

    def _upload_cap(self, h: Host) -> int:
        """Fetcher ``h``'s upload limit in bytes/s under ``--fetcher-upload`` (0: none)."""
        if self.opts.fetcher_upload is None or not h.mbit:
            return 0
        return int(self.opts.fetcher_upload * h.mbit * 1e6 / 8 / HEADER_FACTOR)

    def _wait_subscribed(self, tracker: Host, meta: Path, seed: Host) -> None:
        """Until the tracker lists the seeder (asked through its HTTP API from the tracker's host)."""
        from cascade.metafile import read_cascade

        url = f"http://{tracker.ip}:{TRACKER_HTTP_PORT}/api/v1/swarms/{read_cascade(meta).cascade_hash.hex()}/peers"
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(BenchError):
                reply = sh("ip", "netns", "exec", tracker.netns, "curl", "-sf", "--max-time", "5", url)
                if any(p.get("port") == PEER_PORT for p in json.loads(reply).get("peers", [])):
                    return
            time.sleep(0.05)
        raise BenchError(f"the tracker never listed the seeder at {seed.ip}:{PEER_PORT}")

    def _libtorrent(
        self, g: Group, seed: Host, fetchers: list[Host], outs: list[Path]
    ) -> tuple[Callable[[int], Child], DoneAt]:
        s = g.python(
            "lt-seed",
            ["-m", "bench.lt_peer", "seed", str(self.torrent), str(self.seed_dir), str(LT_PORT), seed.ip],
            seed.netns,
        )
        s.wait_listening(READY_TIMEOUT)
        peers = ",".join(f"{h.ip}:{LT_PORT}" for h in [seed, *fetchers])
        dirs = [self.out_dir / "lt" / f"f{i}" for i in range(len(fetchers))]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        outs += [d / self.data.name for d in dirs]

        def start(i: int) -> Child:
            h = fetchers[i]
            args = ["-m", "bench.lt_peer", "fetch", str(self.torrent), str(dirs[i]), str(LT_PORT), peers, h.ip]
            return g.python(f"lt-fetch{i}", [*args, str(self._upload_cap(h))], h.netns)

        def done_at(c: Child, t0: float, t0_perf: float) -> float | None:
            m = DONE.search(c.stdout)
            if m:
                return float(m.group(1)) - t0
            _check_alive(c)
            return None

        return start, done_at

    def _http(
        self, g: Group, seed: Host, fetchers: list[Host], outs: list[Path]
    ) -> tuple[Callable[[int], Child], DoneAt]:
        server = g.python(
            "http-server",
            ["-m", "http.server", "--bind", seed.ip, "--directory", str(self.seed_dir), str(HTTP_PORT)],
            seed.netns,
        )
        server.wait_for(re.compile(r"Serving HTTP on"), READY_TIMEOUT, "out")
        url = f"http://{seed.ip}:{HTTP_PORT}/{self.data.name}"
        outs += [self.out_dir / f"http-{i}.bin" for i in range(len(fetchers))]

        def start(i: int) -> Child:
            h = fetchers[i]
            return g.spawn(f"curl{i}", ["ip", "netns", "exec", h.netns, "curl", "-sS", "-f", "-o", str(outs[i]), url])

        def done_at(c: Child, t0: float, t0_perf: float) -> float | None:
            rc = c.poll()
            if rc is None:
                return None
            if rc != 0:
                raise BenchError(f"{c.name} exited with {rc}\n{c.tail()}")
            return c.ended - t0_perf

        return start, done_at

    # --- the whole run -------------------------------------------------------

    def run(self) -> Iterator[dict[str, Any]]:
        """Every scenario; yields one summary row per scenario and tool."""
        self.prepare()
        for name in self.opts.scenarios:
            sc = parse_scenario(name)
            rounds = self.scenario(sc)
            rows = summarize(sc, self.opts.size, self.tool_names(), rounds)
            if self.opts.plot and rounds:
                from bench.wan_plot import plot_scenario

                path = (DOCS if self.opts.plot_to_docs else self.work) / f"wan-{sc.slug}.svg"
                plot_scenario(path, sc, self.opts.size, rounds[0])
                if self.opts.plot_to_docs:
                    for row in rows:
                        row["plot"] = str(path.relative_to(REPO))
            yield from rows


DoneAt = Callable[[Child, float, float], "float | None"]


def _check_alive(c: Child) -> None:
    if c.poll() is not None:
        raise BenchError(f"{c.name} exited with {c.rc} before finishing\n{c.tail()}")


def stop_group(g: Group) -> None:
    """SIGTERM every live child at once (they stop in parallel), then stop and reap each by PID."""
    for c in g.children:
        if c.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(c.pid, signal.SIGTERM)
    g.stop_all()


def seeder_span(run: ToolRun, share: float = SPAN_SHARE) -> tuple[float, float] | None:
    """Seconds from the start until the seeder's link had sent ``share`` and ``1 - share`` of its bytes.

    Its bytes are those of ``run.sent`` (start to last finish), counted from the first sample,
    taken as the fetchers start (none has asked the seeder for anything yet); each time is read
    linearly between the two samples of its class counter around it. None without samples of
    the seeder, or when they never reach the second share (a sampler that stopped early).
    """
    total = run.sent.get("seed")
    if not total or "seed" not in run.hosts or not run.samples:
        return None
    k = run.hosts.index("seed")
    base = run.samples[0][1][k]
    marks = (share * total, (1 - share) * total)
    found: list[float] = []
    prev_t, prev_v = run.samples[0][0] - run.t0, 0
    for t_abs, row in run.samples[1:]:
        t, v = t_abs - run.t0, row[k] - base
        while len(found) < len(marks) and v >= marks[len(found)]:
            m = marks[len(found)]  # prev_v < m <= v, so v > prev_v
            found.append(prev_t + (t - prev_t) * (m - prev_v) / (v - prev_v))
        prev_t, prev_v = t, v
    return (found[0], found[1]) if len(found) == len(marks) else None


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def summarize(sc: Scenario, size: int, tools: list[str], rounds: list[list[ToolRun]]) -> list[dict[str, Any]]:
    """One row per tool: medians over the runs that finished, with every run's time."""
    t_min = sc.t_min(size)
    rows = []
    for k, tool in enumerate(tools):
        runs = [r[k] for r in rounds]
        ok = [r for r in runs if r.seconds is not None]
        secs = [r.seconds for r in ok if r.seconds is not None]
        copies = [r.sent["seed"] / size for r in ok]
        seed_busy = [r.sent["seed"] * 8 / (sc.seeder_mbit * 1e6 * r.seconds) for r in ok if r.seconds]
        fetch_cap = sum(sc.fetcher_mbit) * 1e6
        fetch_busy = [
            sum(v for h, v in r.sent.items() if h != "seed") * 8 / (fetch_cap * r.seconds) for r in ok if r.seconds
        ]
        firsts = [min(f for f in r.finish if f is not None) for r in ok]
        spans = [(r.seconds, span) for r in ok if r.seconds is not None and (span := seeder_span(r)) is not None]
        s2 = [r.status2 / r.blocks for r in ok if r.status2 is not None and r.blocks]
        med = _median(secs)
        rows.append(
            {
                "scenario": sc.name,
                "title": sc.title,
                "tool": tool,
                "size_MiB": size >> 20,
                "T_min_s": round(t_min, 3),
                "bound_s": round(sc.http_bound(size) if tool == "http" else t_min, 2),
                "seconds": med,
                "runs_s": [round(r.seconds, 2) if r.seconds is not None else None for r in runs],
                "x_T_min": round(med / t_min, 3) if med is not None else None,
                "seeder_copies": _median(copies),
                "status2_per_block": _median(s2) if tool.startswith("cascade") else "n/a",
                "status2_total": _median([float(r.status2) for r in ok if r.status2 is not None]),
                "cpu_s": _median([r.cpu_s for r in runs]),
                "seeder_busy": _median(seed_busy),
                "fetchers_busy": _median(fetch_busy),
                "first_finish_s": _median(firsts),
                "seeder_start_s": _median([span[0] for _, span in spans]),
                "tail_s": _median([secs - span[1] for secs, span in spans]),
                "errors": [r.error for r in runs if r.error],
            }
        )
    lt = next((r["seconds"] for r in rows if r["tool"] == "libtorrent"), None)
    for r in rows:
        mine = r["seconds"]
        r["vs_libtorrent"] = round(mine / lt, 3) if isinstance(mine, float) and isinstance(lt, float) else None
    return rows


def targets(row: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The issue's targets for Cascade rows: (name, pass, detail)."""
    if not row["tool"].startswith("cascade") or row["seconds"] is None:
        return []
    # Against the time itself, not the ratio rounded for the report: rounded to two places,
    # 15.455 s over 13.422 s (1.1515 x) passed "<= 1.15 x".
    out = [
        ("<= 1.15 x T_min", row["seconds"] <= 1.15 * row["T_min_s"], f"{row['x_T_min']} x"),
        ("seeder <= 1.10 copies", row["seeder_copies"] <= 1.10, f"{row['seeder_copies']} copies"),
    ]
    if row["vs_libtorrent"] is not None:
        out.append(("<= 0.70 x libtorrent", row["vs_libtorrent"] <= 0.70, f"{row['vs_libtorrent']} x"))
    s2 = row["status2_per_block"]
    if isinstance(s2, float):
        out.append(("<= 1 status-2 reply per block", s2 <= 1.0, f"{s2} per block"))
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'scenario':<10} {'tool':<13} {'T s':>7} {'x T_min':>7} {'copies':>6} {'st2/blk':>7}"
        f" {'cpu s':>6} {'seed%':>5} {'fetch%':>6} {'start':>5} {'tail':>5}"
    )
    print(head, file=sys.stderr)
    for r in rows:
        s2 = r["status2_per_block"]

        def f(v: Any, spec: str) -> str:
            return format(v, spec) if isinstance(v, float | int) else str(v)

        print(
            f"{r['scenario']:<10} {r['tool']:<13} {f(r['seconds'], '7.2f'):>7} {f(r['x_T_min'], '7.2f'):>7}"
            f" {f(r['seeder_copies'], '6.2f'):>6} {f(s2, '7.1f'):>7} {f(r['cpu_s'], '6.1f'):>6}"
            f" {f(r['seeder_busy'] and 100 * r['seeder_busy'], '5.0f'):>5}"
            f" {f(r['fetchers_busy'] and 100 * r['fetchers_busy'], '6.0f'):>6}"
            f" {f(r['seeder_start_s'], '5.2f'):>5} {f(r['tail_s'], '5.2f'):>5}"
            + (f"  ({'; '.join(r['errors'])})" if r["errors"] else ""),
            file=sys.stderr,
        )


def run(opts: Options, work: Path) -> list[dict[str, Any]]:
    """Every scenario of ``opts`` with everything torn down at the end; [] (and a line) without root."""
    if not have_root():
        print("wan: needs root (network namespaces and tc); skipped", file=sys.stderr, flush=True)
        return []
    wan = Wan(opts, work)
    atexit.register(wan.close)  # a run stopped by an exception or SIGTERM still deletes its namespaces
    rows: list[dict[str, Any]] = []
    try:
        for row in wan.run():
            rows.append(row)
            print(json.dumps(row), flush=True)
            for name, ok, detail in targets(row):
                print(
                    f"  {'PASS' if ok else 'MISS'}  {row['scenario']} {row['tool']} {name}: {detail}", file=sys.stderr
                )
    finally:
        wan.close()
        atexit.unregister(wan.close)
    return rows


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from cascade.errors import UsageError
    from cascade.units import parse_size

    p = argparse.ArgumentParser(
        prog="python -m bench.wan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke test: scenario 8x40, 1 run, 8 MiB (unless given)")
    p.add_argument("--runs", type=int, help="runs per scenario and tool (3; the median is reported)")
    p.add_argument(
        "--scenario",
        action="append",
        help=f"only this scenario (repeatable): {', '.join(SCENARIOS)}, or SEEDER/NxMBIT[@DELAY]+... such as"
        " 100/8x10 (seeder at 100 Mbit/s, 8 fetchers at 10) or 40/7x40+1x40@8 (one fetcher joins 8 s late)",
    )
    p.add_argument(
        "--block-size",
        default=None,
        help="Cascade block sizes, comma-separated (default: cascade create's for the file size, and 256K)",
    )
    p.add_argument("--size", default=None, help="file size (64M)")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, of {','.join(TOOLS)}")
    p.add_argument("--no-plot", action="store_true", help="do not write docs/wan-*.svg")
    p.add_argument("--json", metavar="PATH", help="also write the rows to PATH")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the temporary data")
    p.add_argument(
        "--fetcher-upload",
        type=float,
        metavar="FRACTION",
        help="every fetcher uploads at most FRACTION (0-1] of its host's rate (Cascade and libtorrent; default: none)",
    )
    p.add_argument(
        "--queue",
        choices=QUEUES,
        help="the queue in front of each host's upload: pfifo (the default) or pfifo_fast (priority bands)",
    )
    args = p.parse_args(argv)
    opts = Options.quick() if args.quick else Options()
    try:
        if args.runs is not None:
            if args.runs < 1:
                raise UsageError("--runs must be at least 1")
            opts.runs = args.runs
        if args.scenario:
            opts.scenarios = tuple(parse_scenario(s).name for s in args.scenario)
        if args.block_size:
            opts.block_sizes = tuple(parse_block_size(b) for b in args.block_size.split(","))
        if args.size is not None:
            opts.size = parse_size(args.size, "--size", nonzero=True)
        tools = tuple(t.strip() for t in args.tools.split(",") if t.strip())
        bad = [t for t in tools if t not in TOOLS]
        if bad or not tools:
            raise UsageError(f"--tools: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(TOOLS)}")
        opts.tools = tools
        if args.fetcher_upload is not None:
            if not 0 < args.fetcher_upload <= 1:
                raise UsageError(f"--fetcher-upload must be in (0, 1], not {args.fetcher_upload:g}")
            opts.fetcher_upload = args.fetcher_upload
        if args.queue is not None:
            opts.queue = args.queue
    except UsageError as exc:
        print(f"bench.wan: {exc}", file=sys.stderr)
        return 2
    opts.plot = not args.no_plot
    signal.signal(signal.SIGTERM, _interrupted)  # a stopped run still stops its children and deletes its namespaces
    work = Path(tempfile.mkdtemp(prefix="cascade-wan-", dir=args.tmp))
    print(json.dumps({"machine": machine(), "loadavg": round(loadavg(), 2), "options": _opts_json(opts)}), flush=True)
    try:
        rows = run(opts, work)
    except KeyboardInterrupt:
        print("bench.wan: interrupted; every process and namespace it made is gone", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench.wan: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rows:
        print_table(rows)
        print(
            f"(1-min load average at the end: {loadavg():.2f}; other work on this machine shares its 2 cores)",
            file=sys.stderr,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if rows or not have_root() else 1


def _opts_json(opts: Options) -> dict[str, Any]:
    return {
        "runs": opts.runs,
        "size": opts.size,
        "scenarios": list(opts.scenarios),
        "block_sizes": list(opts.cascade_blocks()),
        "tools": list(opts.tools),
        "fetcher_upload": opts.fetcher_upload,
        "queue": opts.queue,
    }


if __name__ == "__main__":
    raise SystemExit(main())
