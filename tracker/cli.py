"""``tracker run``: the command line of the tracker process.

Start-up order: read the allow list, open the ``--store`` (load ``--state``), bind, log
``tracker listening on HOST:PORT``, serve until SIGINT/SIGTERM, then stop
accepting, let parked connections finish, write the state and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from cascade import __version__
from cascade.command import EXIT_FAILED, EXIT_OK, OneLineErrorParser, run_command
from cascade.errors import StartError, UsageError
from oscompat import stop_signals
from tracker.allowlist import load_allow_file
from tracker.server import ServerConfig, TrackerServer
from tracker.store import StoreSpec, open_backend, parse_store_spec
from tracker.swarms import SwarmLimits

log = logging.getLogger("tracker")

# Every log line starts with the local time, to the millisecond (a server's log is read afterwards).
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(message)s"
LOG_DATEFMT = "%Y-%m-%dT%H:%M:%S"

_DEFAULT_LIMITS = SwarmLimits()
_DEFAULT_SERVER = ServerConfig()


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, not {value}")
    return value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tracker run`` (separate so other front ends can add theirs)."""

    def number(flag: str, parse: Callable[[str], object], default: object, metavar: str, help: str) -> None:
        p.add_argument(flag, type=parse, default=default, metavar=metavar, help=help)

    p.add_argument("--host", default=_DEFAULT_SERVER.host, help="address to listen on (default %(default)s)")
    p.add_argument(
        "--port", type=_port, default=_DEFAULT_SERVER.port, help="TCP port; 0 picks a free one (default %(default)s)"
    )
    number(
        "--peer-ttl",
        _positive_float,
        _DEFAULT_LIMITS.peer_ttl,
        "SECONDS",
        "forget a peer not seen for this long (default %(default)g)",
    )
    number(
        "--max-peers", _int_at_least(0), _DEFAULT_LIMITS.max_peers, "N", "peer records per reply (default %(default)s)"
    )
    number(
        "--max-swarms",
        _int_at_least(1),
        _DEFAULT_LIMITS.max_swarms,
        "N",
        "cascade hashes tracked at once; new ones beyond it are refused (default %(default)s)",
    )
    number(
        "--max-swarm-peers",
        _int_at_least(1),
        _DEFAULT_LIMITS.max_peers_per_swarm,
        "N",
        "peers kept per swarm; a stale, else a random one makes room (default %(default)s)",
    )
    number(
        "--max-total-peers",
        _int_at_least(1),
        _DEFAULT_LIMITS.max_total_peers,
        "N",
        "peers kept in all swarms; new ones beyond it are refused (default %(default)s)",
    )
    p.add_argument(
        "--allow", metavar="FILE", help="serve only these cascade hashes (hex, or .cascade paths, one per line)"
    )
    p.add_argument(
        "--store",
        metavar="SPEC",
        help="where the swarms live: memory (default), sqlite:PATH, or redis://HOST:PORT/DB (shared by trackers)",
    )
    p.add_argument("--state", metavar="PATH", help="same as --store sqlite:PATH")
    number(
        "--max-connections",
        _int_at_least(1),
        _DEFAULT_SERVER.max_connections,
        "N",
        "connections waiting for their request at once; more are closed (default %(default)s)",
    )
    number("--workers", _int_at_least(1), _DEFAULT_SERVER.workers, "N", "event-loop threads (default %(default)s)")
    number(
        "--read-timeout",
        _positive_float,
        _DEFAULT_SERVER.read_timeout,
        "SECONDS",
        "drop a client that has not sent its whole request by then (default %(default)g)",
    )
    p.add_argument(
        "--http-port",
        type=_port,
        metavar="PORT",
        help="also serve the HTTP API and status page on this port; 0 picks a free one (default: off)",
    )
    p.add_argument("--api-token", metavar="TOKEN", help="uploads over HTTP need 'Authorization: Bearer TOKEN'")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="tracker", description="The Cascade tracker.")
    parser.add_argument("--version", action="version", version=f"tracker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the tracker", description="Run the tracker until SIGINT or SIGTERM.")
    add_run_arguments(run)
    return parser


def _raise_fd_limit() -> None:
    """Let the tracker hold as many sockets as the hard limit allows."""
    try:
        import resource  # POSIX only: Windows has no descriptor limit to raise
    except ImportError:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def _store_spec(args: argparse.Namespace) -> StoreSpec:
    """``--store``, or ``--state PATH`` (its older synonym); raises :class:`UsageError` when both disagree."""
    if args.state is not None and not args.state:
        raise UsageError("--state needs a path")
    if args.store is None:
        return StoreSpec("sqlite", args.state) if args.state else StoreSpec("memory")
    spec = parse_store_spec(args.store)
    if args.state is not None and spec != StoreSpec("sqlite", args.state):
        raise UsageError("--state PATH is the same as --store sqlite:PATH; give one of them")
    return spec


def run(args: argparse.Namespace) -> int:
    allowed = load_allow_file(args.allow) if args.allow else None
    limits = SwarmLimits(
        peer_ttl=args.peer_ttl,
        max_peers=args.max_peers,
        max_swarms=args.max_swarms,
        max_peers_per_swarm=args.max_swarm_peers,
        max_total_peers=args.max_total_peers,
    )
    backend = open_backend(_store_spec(args), limits, allowed)
    registry = backend.swarms
    config = ServerConfig(
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_connections=args.max_connections,
        read_timeout=args.read_timeout,
        verbose=args.verbose,
    )
    _raise_fd_limit()
    server = TrackerServer(registry, config)
    try:
        host, port = server.bind()
    except OSError as exc:
        raise StartError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    http = None
    if args.http_port is not None:
        from tracker.http_api import open_http  # only when asked for

        http = open_http(
            registry,
            host=args.host,
            port=args.http_port,
            token=args.api_token,
            files=backend.open_files,
            verbose=args.verbose,
        )
    elif args.api_token is not None:
        raise UsageError("--api-token needs --http-port")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in stop_signals():  # SIGINT and SIGTERM; Ctrl-C and Ctrl-Break on Windows
        signal.signal(signum, on_signal)
    backend.start()
    log.info("tracker listening on %s:%d", host, port)
    if args.verbose and backend.spec.kind != "memory":
        log.info("store %s:%s (%d peers loaded)", backend.spec.kind, backend.spec.target, backend.loaded)
    server.start()
    if http is not None:
        log.info("tracker http on %s:%d", *http.address)
        http.start()
    ok = True
    while not stop.wait(1.0):
        if not server.alive:
            log.error("tracker: every worker stopped; exiting")
            ok = False
            break
    server.shutdown()
    if http is not None:
        http.stop()
    ok = backend.close() and ok
    log.info("tracker stopped")
    return EXIT_OK if ok else EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=LOG_FORMAT,
        datefmt=LOG_DATEFMT,
        stream=sys.stderr,
    )
    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tracker`` command; returns the exit code (:mod:`cascade.command`).

    Its error lines start ``tracker: error:`` (it has one subcommand); a
    Ctrl-C even during start-up stops a server, which is a success.
    """
    return run_command("tracker", build_parser(), argv, _run, name_subcommand=False, interrupted=EXIT_OK)
