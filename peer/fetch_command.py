"""``peer fetch``: download one ``.cascade``'s data from the swarm, verified and resumable.

The command resumes from what ``--out`` already holds, serves its verified
blocks on ``--listen`` while it downloads, subscribes at the tracker once the
file is complete, and with ``--seed`` keeps serving until SIGINT/SIGTERM.
Every failure is one line on stderr and a non-zero exit.

Its parser lives in :mod:`peer.cli`. What only some runs need (``json``, the
HTTP code for a URL, the announcer for ``--seed``, ``tqdm`` on a terminal) is
imported where it is used: every fetch pays for its start-up.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cascade.addresses import parse_hostport
from cascade.errors import CascadeError, DataError, TrackerUnreachable, UsageError
from cascade.localdata import check_data
from cascade.metafile import CascadeFile, default_data_path, read_cascade
from cascade.units import format_size
from cascade.wire import TrackerCommand
from peer.common import DEFAULT_LISTEN, Interrupted, StopSignal, announce_ip, setup_logging
from peer.fetcher import Fetcher, FetchPolicy, FetchResult, PeerInfo, Progress
from peer.ratelimit import parse_rate
from peer.server import BlockServer
from peer.storage import BlockStore
from peer.tracker_client import TrackerAddress, TrackerRefused, announce, parse_tracker

log = logging.getLogger("peer.fetch")

LIST_TIMEOUT = 5.0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    stop = StopSignal().install()
    started = time.monotonic()
    fetcher: Fetcher | None = None
    try:
        return _fetch(args, stop)
    except (Interrupted, KeyboardInterrupt):
        print("peer fetch: interrupted; verified blocks are kept, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Failed as exc:
        fetcher = exc.fetcher
        print(f"peer fetch: error: {exc}", file=sys.stderr)
        if args.json:
            result = fetcher.partial_result(time.monotonic() - started) if fetcher else None
            doc: dict[str, object] = result.as_json() if result else {"complete": False}
            doc["error"] = str(exc)
            _print_json(doc)
        return EXIT_FAILED


def _print_json(doc: dict[str, object]) -> None:
    import json

    print(json.dumps(doc), flush=True)


class _Failed(Exception):
    def __init__(self, message: str, fetcher: Fetcher | None = None) -> None:
        super().__init__(message)
        self.fetcher = fetcher


def _fetch(args: argparse.Namespace, stop: StopSignal) -> int:
    try:
        cascade_file, tracker_text = args.cascade_file, args.tracker
        if cascade_file.startswith(("http://", "https://")):  # cascade.publish.is_url, without its import
            from cascade.publish import download_cascade

            saved, base = download_cascade(cascade_file, args.out)
            log.debug("downloaded %s", saved)
            cascade_file, tracker_text = str(saved), tracker_text or base
        if tracker_text is None:
            raise UsageError("--tracker is required unless FILE is a http://HOST:PORT/cascades/HASH.cascade URL")
        tracker = parse_tracker(tracker_text, "--tracker")
        listen_given = args.listen is not None
        host, port = parse_hostport(args.listen or DEFAULT_LISTEN, "--listen", default_host="0.0.0.0")
        my_ip = announce_ip(host, args.announce_ip)
        if args.max_peers < 1:
            raise UsageError(f"--max-peers must be at least 1, not {args.max_peers}")
        if not args.timeout > 0:
            raise UsageError(f"--timeout must be positive, not {args.timeout:g}")
        download_rate = parse_rate(args.max_download_rate, "--max-download-rate")
        upload_rate = parse_rate(args.max_upload_rate, "--max-upload-rate")
        cf = read_cascade(cascade_file)
        out = Path(args.out) if args.out else default_data_path(cascade_file)
        store, already_complete = _open_output(cf, out, args.force)
    except CascadeError as exc:
        raise _Failed(str(exc)) from exc

    server = BlockServer(host, port, upload_rate=upload_rate)
    try:
        server.start()
    except OSError as exc:
        if listen_given or exc.errno != errno.EADDRINUSE:
            store.close()
            raise _Failed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        # The default port is taken (a seeder on this machine): any free port will do.
        server = BlockServer(host, 0, upload_rate=upload_rate)
        server.start()
    try:
        server.add_store(store)
        bound_host, my_port = server.address
        log.info("peer listening on %s:%d", bound_host, my_port)
        if already_complete:
            # check_data verified every block and the whole-file hash just now.
            n = cf.block_count
            result = FetchResult(True, 0, 0, n, n, 0.0, {}, [])
        else:
            result = _download(args, cf, store, tracker, my_ip, my_port, stop, download_rate)
        _subscribe(tracker, cf, my_ip, my_port)
        name = out.name
        rate = result.bytes_downloaded / result.seconds if result.seconds > 0 else 0.0
        banned = f", banned {len(result.banned)}" if result.banned else ""
        print(
            f"peer fetch: {name} complete: {format_size(result.bytes_downloaded)} in {result.seconds:.2f} s "
            f"({format_size(rate)}/s) from {len(result.sources)} peers{banned}",
            file=sys.stderr,
            flush=True,
        )
        if args.json:
            _print_json(result.as_json())
        if args.seed:
            from peer.announcer import Announcer

            announcer = Announcer(tracker, my_ip, my_port)
            announcer.add(cf.cascade_hash)
            announcer.start()
            log.info("seeding %s; stop with Ctrl-C", name)
            try:
                stop.wait()
            finally:
                announcer.stop()
        return 0
    finally:
        server.stop()
        store.close()


def _open_output(cf: CascadeFile, out: Path, force: bool) -> tuple[BlockStore, bool]:
    """Open ``out`` for the download; True when it already holds the complete, verified file."""
    if out.is_dir():
        raise DataError(f"{out}: is a directory; give --out a file path")
    check = check_data(out, cf)
    if check.size > 0 and check.valid_count == 0 and cf.block_count > 0 and not force:
        raise DataError(
            f"{out} exists and holds none of this file's blocks; not touching it (use --force to overwrite)"
        )
    if out.exists() and check.valid_count == cf.block_count and check.size == cf.data_length and not check.complete:
        raise DataError(f"{out}: every block verifies but the whole-file SHA-256 does not match the .cascade file")
    complete = out.exists() and check.complete
    return BlockStore.open_for_fetching(cf, out, check), complete


def _download(
    args: argparse.Namespace,
    cf: CascadeFile,
    store: BlockStore,
    tracker: TrackerAddress,
    my_ip: str,
    my_port: int,
    stop: StopSignal,
    download_rate: int | None = None,
) -> FetchResult:
    def list_peers() -> list[PeerInfo]:
        records = announce(tracker, TrackerCommand.LIST, cf.cascade_hash, my_ip, my_port, LIST_TIMEOUT)
        return [(r.ip, r.port, r.good, r.last_seen) for r in records]

    policy = FetchPolicy(max_peers=args.max_peers, stall_timeout=args.timeout, max_download_rate=download_rate)
    fetcher = Fetcher(store, list_peers, policy=policy, my_port=my_port)
    if not store.complete:
        # The first listing decides between "tracker unreachable" and a download.
        try:
            fetcher.add_peers(list_peers())
        except (TrackerUnreachable, TrackerRefused) as exc:
            raise _Failed(str(exc), fetcher) from exc
        except CascadeError as exc:
            raise _Failed(f"tracker {tracker}: {exc}", fetcher) from exc
    stop_watch = _StopWatch(stop, fetcher)
    bar = _ProgressBar(cf, store, args.progress_lines)

    def on_tick(progress: Progress) -> None:
        stop_watch.check()
        bar.update(progress)

    try:
        return fetcher.run(on_tick=on_tick)
    except CascadeError as exc:
        stop.check()
        raise _Failed(_disk_message(exc), fetcher) from exc
    finally:
        bar.close()


def _disk_message(exc: CascadeError) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {exc}"
    return str(exc)


def _subscribe(tracker: TrackerAddress, cf: CascadeFile, my_ip: str, my_port: int) -> None:
    try:
        announce(tracker, TrackerCommand.SUBSCRIBE, cf.cascade_hash, my_ip, my_port, LIST_TIMEOUT)
    except CascadeError as exc:
        log.warning("could not subscribe at the tracker: %s", exc)


class _StopWatch:
    """Turns a SIGINT/SIGTERM into a stop of the fetcher, from its tick callback."""

    def __init__(self, stop: StopSignal, fetcher: Fetcher) -> None:
        self.stop = stop
        self.fetcher = fetcher

    def check(self) -> None:
        if self.stop.stopped:
            self.fetcher.stop()


class _ProgressBar:
    """A tqdm bar on stderr when it is a terminal (bytes, rate, ETA, peers)."""

    def __init__(self, cf: CascadeFile, store: BlockStore, lines: bool) -> None:
        self.lines = lines
        self.last_line = 0.0
        self.bar: Any = None
        self.done = 0
        if sys.stderr.isatty() and not lines:
            from tqdm import tqdm

            self.done = min(cf.data_length, store.verified_count * cf.block_size)
            self.bar = tqdm(
                total=cf.data_length,
                initial=self.done,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                desc=Path(str(store.path)).name,
                leave=False,
                dynamic_ncols=True,
            )

    def update(self, p: Progress) -> None:
        if self.bar is not None:
            self.bar.update(p.verified_bytes - self.done)
            self.done = p.verified_bytes
            self.bar.set_postfix_str(f"{p.peers} peers", refresh=False)
        elif self.lines:
            now = time.monotonic()
            if now - self.last_line >= 0.1 or p.verified_bytes == p.total_bytes:
                self.last_line = now
                print(f"progress {p.verified_bytes} {p.total_bytes} {p.peers}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
