"""Run every benchmark case side by side and fill BENCHMARKS.md.

    python -m bench                  # the full run (several minutes), writes BENCHMARKS.md
    python -m bench --quick          # under a minute: the key cases at reduced sizes
    python -m bench --only transfer swarm --no-write

Each result prints as one JSON line; each target prints PASS or MISS.
Cases: transfer, swarm, small, tracker, verify, memory, faults (see BENCHMARKS.md for what each compares;
faults is bench/faults.py, also runnable alone as ``python -m bench.faults``), and wan, only when named
(--only wan): it needs root, builds emulated LAN hosts and takes ~46 min (see bench/wan.py).
Data goes to a temporary folder (``--tmp``), removed at the end; every process is
stopped by its PID; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import baselines, report
from bench import cascade_swarm as cs
from bench.data import GiB, MiB, loadavg, machine, make_file, sha256_file, tmp_free_bytes
from bench.procs import BenchError, Group, free_port
from peer.cascade_command import default_block_size

CASES = ("transfer", "swarm", "small", "tracker", "verify", "memory", "faults", "wan")
DEFAULT_CASES = CASES[:-1]  # wan runs only when named: it needs root and takes ~46 min
FETCH_TIMEOUT = 600.0


@dataclass(frozen=True)
class Plan:
    """Sizes and repeats of one mode."""

    quick: bool
    repeat: int
    transfer: tuple[tuple[int, int], ...]  # (file size, block size)
    swarm_size: int
    swarm_fetchers: tuple[int, ...]
    swarm_blocks: tuple[int, ...]
    swarm_settle: float  # idle seconds before each timed swarm run (both tools): see Bench.cascade_runs
    aria2: bool
    tracker_seconds: float
    tracker_threads: tuple[int, ...]
    verify_size: int
    memory_fetch_size: int
    memory_seed_seconds: float


FULL = Plan(
    quick=False,
    repeat=3,
    transfer=((256 * MiB, default_block_size(256 * MiB)), (256 * MiB, MiB), (GiB, default_block_size(GiB)), (GiB, MiB)),
    swarm_size=256 * MiB,
    swarm_fetchers=(4, 8),
    swarm_blocks=(default_block_size(256 * MiB),),
    swarm_settle=8.0,
    aria2=True,
    tracker_seconds=3.0,
    tracker_threads=(4, 32),
    verify_size=GiB,
    memory_fetch_size=4 * GiB,
    memory_seed_seconds=5.0,
)
QUICK = Plan(
    quick=True,
    repeat=2,
    transfer=((256 * MiB, default_block_size(256 * MiB)),),
    swarm_size=256 * MiB,
    swarm_fetchers=(4,),
    swarm_blocks=(default_block_size(256 * MiB),),
    swarm_settle=0.0,
    aria2=False,
    tracker_seconds=1.0,
    tracker_threads=(4, 32),
    verify_size=256 * MiB,
    memory_fetch_size=512 * MiB,
    memory_seed_seconds=2.0,
)


@dataclass
class Result:
    case: str
    variant: str
    values: dict[str, Any]
    targets: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def target(self, name: str, ok: bool, detail: str) -> None:
        self.targets.append({"target": name, "pass": ok, "detail": detail})

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "variant": self.variant,
            **self.values,
            "targets": self.targets,
            "note": self.note,
            "loadavg": round(loadavg(), 2),
        }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rnd(x: float, n: int = 3) -> float:
    return round(x, n)


class Bench:
    def __init__(self, plan: Plan, work: Path) -> None:
        self.plan = plan
        self.work = work
        self.results: list[Result] = []
        self._files: dict[int, tuple[Path, str]] = {}

    # --- shared pieces ---------------------------------------------------

    def datafile(self, size: int) -> tuple[Path, str]:
        """A random data file of ``size`` bytes in its own folder, and its SHA-256 (cached)."""
        if size not in self._files:
            d = self.work / f"data-{size >> 20}M"
            d.mkdir(exist_ok=True)
            path = d / "data.bin"
            make_file(path, size)
            self._files[size] = (path, sha256_file(path))  # also brings it into the page cache
        return self._files[size]

    def drop(self, size: int) -> None:
        if size in self._files:
            shutil.rmtree(self._files.pop(size)[0].parent, ignore_errors=True)

    def emit(self, result: Result) -> None:
        self.results.append(result)
        print(json.dumps(result.as_dict()), flush=True)
        for t in result.targets:
            print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['detail']}", file=sys.stderr, flush=True)

    def group(self, name: str) -> Group:
        logdir = self.work / "logs" / name
        logdir.mkdir(parents=True, exist_ok=True)
        return Group(logdir)

    def cascade_runs(
        self, name: str, meta: Path, fetchers: int, expected: str, settle: float = 0.0, extra: list[str] | None = None
    ) -> list[cs.FetchRun]:
        """``repeat`` runs of ``fetchers`` fetchers started together.

        Each run gets a fresh tracker and seeder: the fetchers of an earlier run
        stay listed at a tracker (until its TTL), and a fetch that
        sees those dead peers behaves as in a swarm, not as 1 + N.

        ``settle``: seconds to wait, outputs already deleted, before the fetchers
        start. This VM hands freed memory back to its host within seconds, and
        page cache on memory touched for the first time costs ~2.3 ms/MiB (1 GiB
        of output: ~1.3 s of CPU). Without the wait a run reuses the memory the
        previous run's outputs just freed, so only the first run pays that; with
        it every run (and every libtorrent run) starts cold, as a single run does.
        ``extra``: more ``peer fetch`` arguments (``-v`` for ``bench.swarm_runs``).
        """
        runs = []
        outs = [self.work / "out" / f"fetch{i}.bin" for i in range(fetchers)]
        outs[0].parent.mkdir(exist_ok=True)
        for rep in range(self.plan.repeat):
            g = self.group(f"{name}-run{rep}")
            try:
                tracker = cs.start_tracker(g)
                cs.start_seeder(g, meta, tracker)
                for out in outs:
                    out.unlink(missing_ok=True)
                time.sleep(settle)
                run = cs.run_fetchers(g, meta, outs, tracker, FETCH_TIMEOUT, extra)
                cs.check_outputs(outs, expected)
                runs.append(run)
            finally:
                g.stop_all()
                for out in outs:
                    out.unlink(missing_ok=True)
                    out.with_name(out.name + ".part").unlink(missing_ok=True)  # a failed run's download
        return runs

    def aria2(self, g: Group, data: Path, fetchers: int) -> tuple[float | None, str]:
        """One aria2 + opentracker run (full mode, when installed); (seconds or None, note)."""
        if not self.plan.aria2:
            return None, "aria2/opentracker not run in --quick"
        if not baselines.have_aria2():
            return None, "aria2c or opentracker not installed"
        try:
            return baselines.aria2_swarm(g, data, self.work / "aria2", fetchers), ""
        except BenchError as exc:  # a baseline failing must not hide Cascade's figures
            return None, f"aria2 failed: {str(exc).splitlines()[0]}"

    def libtorrent(
        self, g: Group, data: Path, fetchers: int, expected: str, settle: float = 0.0
    ) -> tuple[list[float], int]:
        torrent = data.parent / "data.torrent"
        piece = baselines.make_torrent(g, data, torrent)
        times = []
        for _ in range(self.plan.repeat):
            run = baselines.libtorrent_swarm(g, torrent, data.parent, self.work / "lt", fetchers, settle)
            times.append(run.seconds)
        for i in range(fetchers):
            out = self.work / "lt" / f"lt-fetch{i}" / data.name
            if sha256_file(out) != expected:
                raise BenchError(f"libtorrent fetcher {i} wrote a wrong file")
        shutil.rmtree(self.work / "lt", ignore_errors=True)
        return times, piece

    # --- cases -----------------------------------------------------------

    def transfer(self) -> None:
        lt_by_size: dict[int, tuple[float, int]] = {}
        aria2_by_size: dict[int, tuple[float | None, str]] = {}
        for size, block in self.plan.transfer:
            data, expected = self.datafile(size)
            g = self.group(f"transfer-{size >> 20}M-{block >> 10}K")
            try:
                meta, _ = cs.create(g, data, block)
                casc = [r.seconds for r in self.cascade_runs(g.logdir.name, meta, 1, expected)]
                raws = [baselines.raw_ceiling(g, data, self.work / "raw.out") for _ in range(self.plan.repeat)]
                if size not in lt_by_size:
                    times, piece = self.libtorrent(g, data, 1, expected)
                    lt_by_size[size] = (median(times), piece)
                    aria2_by_size[size] = self.aria2(g, data, 1)
            finally:
                g.stop_all()
                shutil.rmtree(self.work / "aria2", ignore_errors=True)
            lt_s, piece = lt_by_size[size]
            aria2_s, aria2_note = aria2_by_size[size]
            c_s = median(casc)
            raw_gbps = median([r.gbps for r in raws])
            c_gbps = size / c_s / 1e9
            raw_wall = median([r.wall_seconds for r in raws])
            raw_wall_gbps = size / raw_wall / 1e9
            r = Result(
                "transfer",
                f"1+1 {size >> 20} MiB, {block_label(block)} blocks",
                {
                    "cascade_s": rnd(c_s),
                    "cascade_runs_s": [rnd(x) for x in casc],
                    "cascade_GBps": rnd(c_gbps),
                    "raw_wall_s": rnd(raw_wall),
                    "raw_wall_GBps": rnd(raw_wall_gbps),
                    "raw_inprocess_GBps": rnd(raw_gbps),
                    "libtorrent_s": rnd(lt_s),
                    "libtorrent_piece_KiB": piece >> 10,
                    "vs_libtorrent": rnd(c_s / lt_s),
                    "vs_raw_wall": rnd(c_gbps / raw_wall_gbps),
                    "vs_raw_inprocess": rnd(c_gbps / raw_gbps),
                    "aria2_s": rnd(aria2_s) if aria2_s is not None else None,
                },
                note="cascade, raw_wall, libtorrent and aria2: whole processes, start-up included"
                + (f"; {aria2_note}" if aria2_note else ""),
            )
            if size == 256 * MiB and block == default_block_size(size):
                r.target(
                    "transfer <= 0.5x libtorrent",
                    c_s <= 0.5 * lt_s,
                    f"{c_s:.3f} s vs {lt_s:.3f} s = {c_s / lt_s:.2f}x",
                )
                r.target(
                    "transfer >= 60% of raw ceiling",
                    c_gbps >= 0.6 * raw_wall_gbps,
                    f"{c_gbps:.3f} vs {raw_wall_gbps:.3f} GB/s = {100 * c_gbps / raw_wall_gbps:.0f}% (both whole "
                    f"processes; against the in-process ceiling {raw_gbps:.3f} GB/s: {100 * c_gbps / raw_gbps:.0f}%)",
                )
            self.emit(r)
        for size in {s for s, _ in self.plan.transfer}:
            if size != self.plan.swarm_size:
                self.drop(size)

    def swarm(self) -> None:
        size = self.plan.swarm_size
        data, expected = self.datafile(size)
        for n, block in ((n, b) for n in self.plan.swarm_fetchers for b in self.plan.swarm_blocks):
            g = self.group(f"swarm-{n}-{block >> 10}K")
            try:
                meta, _ = cs.create(g, data, block)
                settle = self.plan.swarm_settle
                casc = [r.seconds for r in self.cascade_runs(g.logdir.name, meta, n, expected, settle)]
                g.stop_all()
                lt_times, piece = self.libtorrent(g, data, n, expected, settle)
                aria2_s, aria2_note = self.aria2(g, data, n)
            finally:
                g.stop_all()
                shutil.rmtree(self.work / "aria2", ignore_errors=True)
            c_s, lt_s = median(casc), median(lt_times)
            r = Result(
                "swarm",
                f"1+{n} {size >> 20} MiB, {block_label(block)} blocks",
                {
                    "cascade_s": rnd(c_s),
                    "cascade_runs_s": [rnd(x) for x in casc],
                    "libtorrent_s": rnd(lt_s),
                    "libtorrent_runs_s": [rnd(x) for x in lt_times],
                    "libtorrent_piece_KiB": piece >> 10,
                    "aria2_s": rnd(aria2_s) if aria2_s is not None else None,
                    "vs_libtorrent": rnd(c_s / lt_s),
                },
                note=aria2_note,
            )
            r.target(
                f"swarm 1+{n} <= 1.0x libtorrent",
                c_s <= lt_s,
                f"{c_s:.3f} s vs {lt_s:.3f} s = {c_s / lt_s:.2f}x"
                f" (moonshot 0.7x: {'yes' if c_s <= 0.7 * lt_s else 'no'})",
            )
            self.emit(r)

    def small(self) -> None:
        size, block = 5 * MiB, 1024
        d = self.work / "small"
        d.mkdir(exist_ok=True)
        data = d / "small.bin"
        make_file(data, size)
        expected = sha256_file(data)
        g = self.group("small")
        try:
            meta, _ = cs.create(g, data, block)
            runs = self.cascade_runs("small", meta, 1, expected)
        finally:
            g.stop_all()
            shutil.rmtree(d, ignore_errors=True)
        blocks = size // block
        wall = median([r.seconds for r in runs])
        inner = [float(str(r.reports[0].get("seconds", 0) or 0)) for r in runs]
        r = Result(
            "small",
            "1+1 5 MiB, 1 KiB blocks (5,120 blocks)",
            {
                "cascade_s": rnd(wall),
                "blocks_per_s": round(blocks / wall),
                "fetch_reported_s": rnd(median(inner)) if any(inner) else None,
                "blocks_per_s_excl_startup": round(blocks / median(inner)) if any(inner) else None,
            },
            note="blocks_per_s counts the whole fetch process, start-up included",
        )
        r.target("small blocks >= 10,000 blocks/s", blocks / wall >= 10_000, f"{blocks / wall:,.0f} blocks/s")
        self.emit(r)

    def tracker(self) -> None:
        secs = str(self.plan.tracker_seconds)
        ours: dict[int, dict[str, Any]] = {}
        ot: dict[int, dict[str, Any]] = {}
        g = self.group("tracker")
        try:
            for n in self.plan.tracker_threads:
                c = g.python(
                    f"tracker-bench-{n}",
                    ["-m", "bench.tracker_bench", "--threads", str(n), "--seconds", secs, "--peers", "100"],
                )
                if c.wait(120) != 0:
                    raise BenchError(f"tracker_bench failed\n{c.tail()}")
                ours[n] = json.loads(c.stdout.strip().splitlines()[-1])
            if shutil.which("opentracker"):
                from bench.http_announce_bench import INFO_HASH

                port = free_port()
                baselines.start_opentracker(g, self.work, port, [INFO_HASH])
                for n in self.plan.tracker_threads:
                    c = g.python(
                        f"ot-bench-{n}",
                        [
                            "-m",
                            "bench.http_announce_bench",
                            "--port",
                            str(port),
                            "--threads",
                            str(n),
                            "--seconds",
                            secs,
                            "--peers",
                            "100",
                        ],
                    )
                    if c.wait(120) != 0:
                        raise BenchError(f"http_announce_bench failed\n{c.tail()}")
                    ot[n] = json.loads(c.stdout.strip().splitlines()[-1])
                    if ot[n]["errors"]:
                        raise BenchError(f"opentracker answered {ot[n]['errors']} requests with an error")
        finally:
            g.stop_all()
        for n in self.plan.tracker_threads:
            o = ours[n]
            b = ot.get(n)
            r = Result(
                "tracker",
                f"{n} client threads, list, swarm of 100",
                {
                    "req_per_s": o["req_per_s"],
                    "p50_ms": o["p50_ms"],
                    "p99_ms": o["p99_ms"],
                    "errors": o["errors"],
                    "opentracker_req_per_s": b["req_per_s"] if b else None,
                    "opentracker_errors": b["errors"] if b else None,
                    "opentracker_p50_ms": b["p50_ms"] if b else None,
                    "opentracker_p99_ms": b["p99_ms"] if b else None,
                },
                note="" if b else "opentracker not installed",
            )
            if n == 4:
                r.target(
                    "tracker >= 10,000 req/s (4 threads)", o["req_per_s"] >= 10_000, f"{o['req_per_s']:,.0f} req/s"
                )
                if b:
                    ratio = o["req_per_s"] / b["req_per_s"]
                    r.target("tracker >= 0.45x opentracker", ratio >= 0.45, f"{ratio:.2f}x")
            self.emit(r)
        self.tracker_on_redis()

    def tracker_on_redis(self) -> None:
        """One tracker on Redis, and two on one Redis (clients split between them), at each thread count."""
        if shutil.which("redis-server") is None:
            self.emit(Result("tracker", "redis", {}, note="redis-server not installed: Redis variants not run"))
            return
        secs = str(self.plan.tracker_seconds)
        g = self.group("tracker-redis")
        runs: dict[tuple[int, int], dict[str, Any]] = {}
        try:
            for trackers in (1, 2):
                for n in self.plan.tracker_threads:
                    c = g.python(
                        f"tracker-bench-redis{trackers}-{n}",
                        [
                            *("-m", "bench.tracker_bench", "--redis", "--trackers", str(trackers), "--threads", str(n)),
                            *("--seconds", secs, "--peers", "100"),
                        ],
                    )
                    if c.wait(120) != 0:
                        raise BenchError(f"tracker_bench --redis failed\n{c.tail()}")
                    runs[(trackers, n)] = json.loads(c.stdout.strip().splitlines()[-1])
        finally:
            g.stop_all()
        for (trackers, n), o in runs.items():
            where = "one tracker on Redis" if trackers == 1 else "two trackers on one Redis"
            r = Result(
                "tracker",
                f"{n} client threads, list, swarm of 100, {where}",
                {k: o[k] for k in ("req_per_s", "p50_ms", "p99_ms", "errors")},
                note="Redis, the trackers and the client threads share the machine's cores",
            )
            if trackers == 1 and n == 4:
                rate = o["req_per_s"]
                r.target("tracker on Redis >= 6,000 req/s (4 threads)", rate >= 6_000, f"{rate:,.0f} req/s")
            self.emit(r)

    def verify(self) -> None:
        size = self.plan.verify_size
        data, _ = self.datafile(size)
        g = self.group("verify")
        try:
            meta, _ = cs.create(g, data, MiB, "create0")
            creates: list[float] = []
            verifies: list[float] = []
            base1: list[tuple[float, float]] = []
            base2: list[tuple[float, float]] = []
            for i in range(self.plan.repeat):
                creates.append(cs.create(g, data, MiB, f"create{i + 1}")[1])
                v = g.python(f"verify{i}", ["-m", "peer.cascade_command", "verify", str(meta), "--data", str(data)])
                if v.wait(300) != 0:
                    raise BenchError(f"cascade verify failed\n{v.tail()}")
                verifies.append(v.seconds)
                for args, out in (([str(data)], base1), ([str(data), str(MiB)], base2)):
                    b = g.python(f"hash{i}-{len(args)}", ["-m", "bench.hash_baseline", *args])
                    if b.wait(300) != 0:
                        raise BenchError(f"hash baseline failed\n{b.tail()}")
                    out.append((b.seconds, json.loads(b.stdout.strip().splitlines()[-1])["seconds"]))
        finally:
            g.stop_all()
        gb = size / 1e9
        v_s, c_s = median(verifies), median(creates)
        b1_wall, b1_in = median([x[0] for x in base1]), median([x[1] for x in base1])
        b2_wall = median([x[0] for x in base2])
        r = Result(
            "verify",
            f"{size >> 20} MiB in page cache, 1 MiB blocks",
            {
                "verify_s": rnd(v_s),
                "verify_GBps": rnd(gb / v_s),
                "create_s": rnd(c_s),
                "create_GBps": rnd(gb / c_s),
                "hashlib_1pass_GBps": rnd(gb / b1_wall),
                "hashlib_1pass_inprocess_GBps": rnd(gb / b1_in),
                "hashlib_2pass_GBps": rnd(gb / b2_wall),
                "vs_hashlib": rnd(b1_wall / v_s),
                "vs_hashlib_2pass": rnd(b2_wall / v_s),
            },
            note="all timed as whole processes (start-up included); 1pass = one sha256 over the file on one core; "
            "2pass = the work verify must do (block hashes + whole-file hash) on one core",
        )
        r.target(
            "verify >= 1.5x single-core hashlib",
            gb / v_s >= 1.5 * gb / b1_wall,
            f"{gb / v_s:.2f} vs {gb / b1_wall:.2f} GB/s = {b1_wall / v_s:.2f}x",
        )
        self.emit(r)
        if not self.plan.quick or size != self.plan.swarm_size:
            self.drop(size)

    def wan(self) -> None:
        """The swarm on emulated hosts with shaped uploads (bench/wan.py; skipped without root)."""
        from bench import wan

        opts = wan.Options.quick() if self.plan.quick else wan.Options(runs=self.plan.repeat)
        for row in wan.run(opts, self.work / "wan"):
            values = {k: v for k, v in row.items() if k not in ("scenario", "tool", "title", "errors", "plot")}
            r = Result("wan", f"{row['scenario']} {row['tool']}", values, note="; ".join(row["errors"]))
            for name, ok, detail in wan.targets(row):
                r.target(f"wan {row['scenario']} {name}", ok, detail)
            self.results.append(r)  # wan.run printed the row and its targets already

    def memory(self) -> None:
        size = self.plan.memory_fetch_size
        if tmp_free_bytes(self.work) < 2 * size + GiB:
            raise BenchError(f"not enough space in {self.work} for 2 x {size >> 20} MiB")
        data, expected = self.datafile(size)
        g = self.group("memory")
        try:
            meta, _ = cs.create(g, data, MiB)
            tracker = cs.start_tracker(g)
            seeder, port = cs.start_seeder(g, meta, tracker)
            out = self.work / "out" / "memory.bin"
            out.parent.mkdir(exist_ok=True)
            run = cs.run_fetchers(g, meta, [out], tracker, FETCH_TIMEOUT)
            cs.check_outputs([out], expected)
            out.unlink()
            fetch_kib = run.maxrss_kib[0]
            fetch_s = run.seconds
            g.stop_all()
            self.drop(size)
            seed_data, _ = self.datafile(256 * MiB)
            meta2, _ = cs.create(g, seed_data, MiB, "create-seed")
            tracker = cs.start_tracker(g)
            seeder, port = cs.start_seeder(g, meta2, tracker)
            before_kib = seeder.vm_hwm_kib()
            from cascade.metafile import read_cascade

            cf = read_cascade(meta2)
            load = g.python(
                "load",
                [
                    "-m",
                    "bench.load_client",
                    str(port),
                    cf.cascade_hash.hex(),
                    str(cf.block_count),
                    "200",
                    str(self.plan.memory_seed_seconds),
                ],
            )
            if load.wait(self.plan.memory_seed_seconds + 120) != 0:
                raise BenchError(f"load client failed\n{load.tail()}")
            seeder.stop()
            seed_kib = seeder.maxrss_kib
            stats = json.loads(load.stdout.strip().splitlines()[-1])
        finally:
            g.stop_all()
        r = Result(
            "memory",
            f"peer fetch of {size >> 20} MiB",
            {"peak_rss_MiB": rnd(fetch_kib / 1024, 1), "fetch_s": rnd(fetch_s)},
        )
        r.target(f"fetch of {size / GiB:g} GiB < 64 MiB RSS", fetch_kib < 64 * 1024, f"{fetch_kib / 1024:.1f} MiB")
        self.emit(r)
        mbps = stats["bytes"] / stats["seconds"] / 1e6
        r = Result(
            "memory",
            "peer seed, 200 connections downloading at once",
            {
                "peak_rss_MiB": rnd(seed_kib / 1024, 1),
                "peak_rss_before_load_MiB": rnd(before_kib / 1024, 1),
                "blocks_served": stats["blocks"],
                "served_MBps": round(mbps),
                "reopened": stats["reopened"],
                "errors": stats["errors"],
            },
            note="256 MiB file, 1 MiB blocks, one process with 200 kept-open connections",
        )
        r.target("seed with 200 downloaders < 128 MiB RSS", seed_kib < 128 * 1024, f"{seed_kib / 1024:.1f} MiB")
        self.emit(r)

    def faults(self) -> None:
        """bench/faults.py: kills and reruns, hostile peers, dead peers, a connection flood, as counts."""
        from bench import faults

        folder = self.work / "faults"
        folder.mkdir(exist_ok=True)
        for doc in faults.run(folder, self.plan.quick, echo=False):
            # The table has no room for the per-row detail of the hostile part (the rows that failed stand
            # for it) nor for the single runs of the fetch scenarios (their maxima stand for them).
            values = {k: v for k, v in doc.items() if k not in ("case", "variant", "rows", "runs")}
            if "rows" in doc:
                values["failed_rows"] = [name for name, row in doc["rows"].items() if not row["ok"]]
            r = Result("faults", str(doc["variant"]), values)
            if "error" in doc:
                r.target(f"faults {doc['variant']} runs", False, str(doc["error"]))
            else:
                r.target(
                    f"faults {doc['variant']}: nothing failed, lost or wrong",
                    not (doc["failed"] or doc["blocks_lost"] or doc["bytes_wrong"]),
                    f"{doc['failed']} of {doc['tried']} failed, {doc['blocks_lost']} blocks lost, "
                    f"{doc['bytes_wrong']} bytes wrong",
                )
            if "dead_peer_cost_seconds" in doc:
                # Arbitrary budget: a few connect timeouts' worth, far below the stall timeout.
                cost = doc["dead_peer_cost_seconds"]
                r.target("dead peers add < 5 s to the fetch", cost < 5.0, f"{cost:.2f} s")
            if "max_wall_s" in doc:
                # Issue 9 section 3: beside dead or trickling peers, a fetch completes within 15 s of its start.
                wall = doc["max_wall_s"]
                r.target("peer fetch done < 15 s from its start", wall < 15.0, f"{wall:.2f} s")
            self.emit(r)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def block_label(block: int) -> str:
    """``1 MiB``, ``256 KiB``: a block size as the result variants name it."""
    return f"{block >> 20} MiB" if block >= MiB and not block % MiB else f"{block >> 10} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="reduced sizes, two repeats, under 60 s")
    p.add_argument("--only", nargs="+", choices=CASES, metavar="CASE", help=f"run only these: {', '.join(CASES)}")
    p.add_argument("--repeat", type=int, help="runs per measurement (median is reported)")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument(
        "--block-size",
        metavar="SIZES",
        help="transfer and swarm with these Cascade block sizes instead (comma-separated, e.g. 256K,1M)",
    )
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the temporary data")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.repeat:
        plan = replace(plan, repeat=args.repeat)
    if args.block_size:
        from cascade.errors import UsageError
        from peer.cascade_command import parse_block_size  # cascade create's own limits

        try:
            sizes = tuple(parse_block_size(b) for b in args.block_size.split(","))
        except UsageError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        files = dict.fromkeys(size for size, _ in plan.transfer)
        plan = replace(plan, transfer=tuple((f, b) for f in files for b in sizes), swarm_blocks=sizes)
    cases = args.only or list(DEFAULT_CASES)
    signal.signal(signal.SIGTERM, _interrupted)  # so a stopped bench still stops its children and cleans up
    work = Path(tempfile.mkdtemp(prefix="cascade-bench-", dir=args.tmp))
    work.chmod(0o755)  # opentracker drops to user nobody and must read its whitelist here
    started = time.time()
    start_load = round(loadavg(), 2)
    bench = Bench(plan, work)
    print(
        json.dumps(
            {
                "machine": machine(),
                "mode": "quick" if plan.quick else "full",
                "cases": cases,
                "loadavg": round(loadavg(), 2),
                "tmp": str(work),
            }
        ),
        flush=True,
    )
    failed = []
    try:
        for name in cases:
            run: Callable[[], None] = getattr(bench, name)
            try:
                run()
            except (BenchError, OSError, ValueError, KeyError) as exc:
                failed.append(name)
                print(json.dumps({"case": name, "error": str(exc).splitlines()[0]}), flush=True)
                print(f"bench {name}: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - started
    targets = [t for r in bench.results for t in r.targets]
    print(
        json.dumps(
            {
                "seconds": round(elapsed, 1),
                "targets_pass": sum(t["pass"] for t in targets),
                "targets_miss": sum(not t["pass"] for t in targets),
                "failed_cases": failed,
            }
        ),
        flush=True,
    )
    if not args.no_write and bench.results:
        command = (
            "python -m bench"
            + (" --quick" if plan.quick else "")
            + (f" --repeat {args.repeat}" if args.repeat else "")
            + (f" --only {' '.join(cases)}" if args.only else "")
        )
        report.update(
            Path(__file__).resolve().parent.parent / "BENCHMARKS.md",
            "quick" if plan.quick else "full",
            [r.as_dict() for r in bench.results],
            machine(),
            command,
            elapsed,
            start_load,
            complete=not args.only,
        )
    return 1 if failed else 0
