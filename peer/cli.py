"""The ``peer`` command: ``peer seed`` serves files, ``peer fetch`` downloads them.

Start-up time counts (a fetch of a few hundred MiB takes well under a second),
so this module holds only the argument parsers: each subcommand's module
(:mod:`peer.seed_command`, :mod:`peer.fetch_command`) is imported once that
subcommand is chosen, and the two never import each other.
"""

from __future__ import annotations

import argparse
import gc
import importlib
from collections.abc import Sequence
from typing import Any

from cascade import __version__
from cascade.command import EXIT_OK, OneLineErrorParser, run_command
from peer.common import (
    DEFAULT_ANNOUNCE_INTERVAL,
    DEFAULT_FETCH_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_MAX_PEERS,
    BlockServerConfig,
)

_SERVER = BlockServerConfig()
_GC_THRESHOLD = 50_000


def positive_seconds(text: str) -> float:
    """An argparse type for a duration: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, not {text!r}")
    return value


def _verbosity(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more detail (dropped peers, timings); -vv also logs every block request served",
    )


def _add_seed_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "seed",
        help="serve the verified blocks of one or more files",
        description="Verify each FILE.cascade's data, serve its verified blocks and subscribe it at the tracker.",
    )
    p.add_argument("files", nargs="+", metavar="FILE.cascade", help="the .cascade files to seed")
    p.add_argument(
        "--tracker",
        required=True,
        action="append",
        metavar="HOST:PORT",
        help="a tracker to subscribe at (or http://HOST:PORT); give it again to subscribe at several",
    )
    p.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address for the block server (default {DEFAULT_LISTEN}; port 0 picks a free port)",
    )
    p.add_argument(
        "--data", metavar="PATH", help="the data file (only with a single .cascade; default: NAME beside NAME.cascade)"
    )
    p.add_argument(
        "--announce-ip",
        metavar="IP",
        help="IPv4 address to announce (default: the listen host if specific, else 0.0.0.0 = as the tracker sees us)",
    )
    p.add_argument(
        "--max-upload-rate", metavar="RATE", help="whole-process upload limit in bytes/s, like 5M (default: none)"
    )
    p.add_argument(
        "--idle-timeout",
        type=positive_seconds,
        default=_SERVER.idle_timeout,
        metavar="SECONDS",
        help="close connections idle this long (default %(default)g)",
    )
    p.add_argument(
        "--announce-interval",
        type=positive_seconds,
        default=DEFAULT_ANNOUNCE_INTERVAL,
        metavar="SECONDS",
        help=f"re-subscribe at the tracker this often (default {DEFAULT_ANNOUNCE_INTERVAL:.0f})",
    )
    _verbosity(p)
    p.set_defaults(module="peer.seed_command")


def _add_fetch_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="download a file from the swarm, verified block by block",
        description=(
            "Download the data of FILE.cascade from the peers the tracker knows, many at once. "
            "Each block is checked against its SHA-256 before it is written; a killed download "
            "resumes where it stopped. Verified blocks are served to other peers meanwhile."
        ),
    )
    p.add_argument(
        "cascade_file",
        metavar="FILE.cascade",
        help="the .cascade file describing the data, or its URL http://HOST:PORT/cascades/HASH.cascade",
    )
    p.add_argument(
        "--out",
        metavar="PATH",
        help="where the data goes once complete and verified; PATH.part until then (default: FILE beside FILE.cascade)",
    )
    p.add_argument(
        "--tracker",
        action="append",
        metavar="HOST:PORT",
        help="a tracker to ask for peers, or http://HOST:PORT; may be given several times "
        "(for a URL, the tracker serving it is one of them)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"where to serve verified blocks to other peers (default {DEFAULT_LISTEN}; port 0 = any free port)",
    )
    p.add_argument("--announce-ip", metavar="IP", help="IPv4 address to announce to the tracker")
    p.add_argument("--seed", action="store_true", help="keep serving, as a seeder, after the download completes")
    p.add_argument(
        "--max-peers",
        type=int,
        default=DEFAULT_MAX_PEERS,
        metavar="N",
        help=f"peers to download from at once ({DEFAULT_MAX_PEERS})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_FETCH_TIMEOUT,
        metavar="SECONDS",
        help=f"give up when no block arrives for this long ({DEFAULT_FETCH_TIMEOUT:g})",
    )
    p.add_argument(
        "--max-download-rate", metavar="RATE", help="whole-download limit in bytes/s, like 5M (default: none)"
    )
    p.add_argument(
        "--max-upload-rate", metavar="RATE", help="limit for serving other peers meanwhile, like 1M (default: none)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line of stdout")
    p.add_argument("--force", action="store_true", help="overwrite an --out file that holds none of the blocks")
    _verbosity(p)
    # For `cascade demo`: machine-readable progress lines on stderr.
    p.add_argument("--progress-lines", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(module="peer.fetch_command")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="peer", description="A Cascade peer: seed files and fetch them.")
    parser.add_argument("--version", action="version", version=f"peer {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_seed_parser(subparsers)
    _add_fetch_parser(subparsers)
    return parser


def _run(args: argparse.Namespace) -> int:
    # Each subcommand module has run(args) -> exit status; it sets up its own logging.
    command = importlib.import_module(args.module)
    code: int = command.run(args)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``peer`` command; returns the exit code (:mod:`cascade.command`).

    ``peer fetch`` reports its own interruption (130, its verified blocks
    kept); a stop that reaches the boundary ends a server, which is a success.
    """
    process = argv is None  # the process's own command line: this call is the whole process
    if process:
        # Collections make tens of objects per member that live as long as the command: the
        # default gen-0 threshold (700) would scan them hundreds of times. Arbitrary: 10,000
        # members' objects are a few collections (mypy's main does the same).
        gc.set_threshold(_GC_THRESHOLD, *gc.get_threshold()[1:])
    code = run_command("peer", build_parser(), argv, _run, interrupted=EXIT_OK)
    if process:
        # What is left is freed by the process's end: the interpreter's last full collection
        # of a 10,000-member fetch costs ~80 ms and gives nothing back to anyone (the files,
        # sockets and logs are closed and flushed already, stdout and stderr at exit).
        gc.freeze()
    return code
