"""Many runs of the bench's Cascade swarm alone, each fetcher's time, and the logs kept.

``python -m bench.swarm_runs [--fetchers 8] [--runs 5] [--size SIZE] [--block-size SIZE] [--verbose] [--logs DIR]``

The same code path as the ``swarm`` case of ``python -m bench`` (a 256 MiB file unless ``--size`` says, blocks of
``cascade create``'s default size unless ``--block-size`` says, a fresh tracker and seeder per
run, the idle ``swarm_settle`` before each run), without
libtorrent, so that a run that stalls can be read afterwards: each run's tracker, seeder and
fetcher logs are copied to ``--logs`` (with ``--verbose`` the fetchers run with ``-v`` and
print their per-peer counts). Written to find the 1+8 stall (BENCHMARKS.md); prints one line
per run: the run's seconds and every fetcher's, sorted.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from bench import cascade_swarm as cs
from bench.run import FULL, Bench
from cascade.errors import UsageError
from cascade.units import parse_size
from peer.cascade_command import default_block_size, parse_block_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetchers", type=int, default=8, help="fetchers per run (default 8)")
    parser.add_argument("--runs", type=int, default=5, help="runs (default 5)")
    parser.add_argument("--size", help="file size, like 64M (default: the bench's, 256 MiB)")
    parser.add_argument("--block-size", help="block size, like 128K (default: cascade create's for the size)")
    parser.add_argument("--verbose", action="store_true", help="fetchers log with -v")
    parser.add_argument("--logs", type=Path, default=Path("swarm-runs-logs"), help="where the logs go")
    args = parser.parse_args(argv)
    for name, value in (("--fetchers", args.fetchers), ("--runs", args.runs)):
        if value < 1:
            parser.error(f"{name} must be at least 1, not {value}")
    try:
        block = parse_block_size(args.block_size) if args.block_size is not None else None
        size = parse_size(args.size, "file size", nonzero=True) if args.size is not None else FULL.swarm_size
    except UsageError as exc:
        parser.error(str(exc))
    work = Path(tempfile.mkdtemp(prefix="cascade-swarm-runs-"))
    block = default_block_size(size) if block is None else block
    plan = replace(FULL, repeat=args.runs, swarm_size=size, swarm_blocks=(block,))
    bench = Bench(plan, work)
    extra = ["-v"] if args.verbose else []
    try:
        data, expected = bench.datafile(plan.swarm_size)
        group = bench.group("create")
        try:
            meta, _ = cs.create(group, data, plan.swarm_blocks[0])
        finally:
            group.stop_all()
        runs = bench.cascade_runs("swarm", meta, args.fetchers, expected, plan.swarm_settle, extra)
        for k, run in enumerate(runs):
            each = ", ".join(f"{s:.2f}" for s in sorted(run.per_fetcher))
            print(f"run {k}: {run.seconds:.2f} s (fetchers: {each}; fetchers' CPU {run.cpu_s:.1f} s)", flush=True)
    finally:
        if (work / "logs").is_dir():
            shutil.copytree(work / "logs", args.logs, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"logs in {args.logs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
