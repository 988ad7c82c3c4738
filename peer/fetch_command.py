"""``peer fetch``: download one ``.cascade``'s data from the swarm, verified and resumable.

The data is written to ``OUT.part`` and renamed to ``OUT`` only once every
block and the whole-file hash verified, so ``OUT`` always means complete. A
rerun resumes ``OUT.part`` from its verified blocks. The command serves its
verified blocks on ``--listen`` while it downloads, and only with ``--seed``
subscribes (as a seeder) and keeps serving until SIGINT/SIGTERM. Every
failure is one line on stderr and the exit code of :mod:`cascade.command`:
1 when the fetch failed, 2 for a bad command-line value, 130 when interrupted.

Its parser lives in :mod:`peer.cli`. What only some runs need (``json``, the
HTTP code for a URL, the collection code, the announcer for ``--seed``, ``tqdm``
on a terminal) is imported where it is used: every fetch pays for its start-up
(``tests/test_startup_imports.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cascade.addresses import TrackerAddress, parse_hostport
from cascade.command import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, exit_code
from cascade.errors import CascadeError, DataError, UsageError, from_os_error
from cascade.metafile import CascadeFile, default_data_path
from cascade.units import format_size
from cascade.wire import PeerRecord
from peer.common import DEFAULT_LISTEN, Interrupted, StopSignal, announce_ip, setup_logging
from peer.fetcher import Fetcher, FetchPolicy, FetchResult, PeerInfo, Progress
from peer.localdata import DataCheck, check_data
from peer.metafiles import read_metafile
from peer.ratelimit import parse_rate
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from peer.trackers import TrackerSet, parse_trackers, peer_infos

if TYPE_CHECKING:
    from cascade.collection import Collection

log = logging.getLogger("peer.fetch")

LIST_TIMEOUT = 5.0
# The name of an incomplete download is OUT + this (as browsers do); no ':' or
# other character that Windows rejects.
PART_SUFFIX = ".part"


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose, timestamps=args.seed)  # with --seed it runs as a server
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
        return exc.code


def _print_json(doc: dict[str, object]) -> None:
    import json

    print(json.dumps(doc), flush=True)


class _Failed(Exception):
    """The run failed: its one line, its exit code, and the fetcher if one ran (for --json)."""

    def __init__(self, message: str, fetcher: Fetcher | None = None, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.fetcher = fetcher
        self.code = code


def _fetch(args: argparse.Namespace, stop: StopSignal) -> int:
    try:
        cascade_file, tracker_texts = args.cascade_file, list(args.tracker or ())
        trackers = parse_trackers(tracker_texts)  # a bad --tracker is refused before any download
        if cascade_file.startswith(("http://", "https://")):  # peer.http_client.is_url, without its import
            from peer.http_client import download_cascade

            saved, base = download_cascade(cascade_file, args.out)
            log.debug("downloaded %s", saved)
            # The tracker serving the URL is one more tracker of the swarm (unless already given).
            cascade_file, trackers = str(saved), parse_trackers([*tracker_texts, base])
        if not trackers:
            raise UsageError("--tracker is required unless FILE is a http://HOST:PORT/cascades/HASH.cascade URL")
        listen_given = args.listen is not None
        host, port = parse_hostport(args.listen or DEFAULT_LISTEN, "--listen", default_host="0.0.0.0")
        my_ip = announce_ip(host, args.announce_ip)
        if args.max_peers < 1:
            raise UsageError(f"--max-peers must be at least 1, not {args.max_peers}")
        if not args.timeout > 0:
            raise UsageError(f"--timeout must be positive, not {args.timeout:g}")
        download_rate = parse_rate(args.max_download_rate, "--max-download-rate")
        upload_rate = parse_rate(args.max_upload_rate, "--max-upload-rate")
        # A collection's members are all fetched: each one's .cascade is parsed once, not again.
        read = read_metafile(cascade_file, keep_files=True)
        out = Path(args.out) if args.out else default_data_path(cascade_file)
        if not isinstance(read, CascadeFile):  # a collection (whose code only then is imported)
            if not args.out:  # a folder named by a stranger (the file's or the tracker's name)
                from peer.collection_local import refuse_foreign_folder

                refuse_foreign_folder(out, read)
            return _fetch_collection(args, stop, read, out, trackers, host, port, my_ip, download_rate, upload_rate)
        cf = read
        target = _plan_output(cf, out, args.force)
    except CascadeError as exc:
        raise _Failed(str(exc), code=exit_code(exc)) from exc

    server = BlockServer(host, port, BlockServerConfig(upload_rate=upload_rate))
    try:
        server.start()
    except OSError as exc:
        if listen_given or exc.errno != errno.EADDRINUSE:
            raise _Failed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        # The default port is taken (a seeder on this machine): any free port will do.
        server = BlockServer(host, 0, BlockServerConfig(upload_rate=upload_rate))
        server.start()
    session = _Session(TrackerSet(trackers), cf, my_ip)
    store: BlockStore | None = None
    done = False
    try:
        bound_host, session.port = server.address
        # Said once the output is open: a run that fails before (tracker down, disk
        # full) prints its one error line and nothing else.
        listening = f"peer listening on {bound_host}:{session.port}"
        if target.complete:
            # check_data verified every block and the whole-file hash just now.
            store = _open_store(cf, out, target)
            server.add_store(store)
            log.info("%s", listening)
            n = cf.block_count
            result = FetchResult(True, 0, 0, n, n, 0.0, {}, [])
        else:
            # Nothing is created on disk until the tracker has answered: a rerun after
            # an unreachable tracker or a refused hash finds things as they were.
            # (An empty file, or a .part holding every block, needs no peer.)
            first = _first_listing(session) if target.check.valid_count < cf.block_count else []
            stop.check()
            store = _open_store(cf, out, target)
            server.add_store(store)
            log.info("%s", listening)
            result = _download(args, session, store, first, stop, download_rate)
            # The whole-file hash matched: only now does the data take its final name.
            store.move_to(out)
            server.add_store(store)  # where the OS cannot rename an open file, it was reopened
        done = True
        name = out.name
        rate = result.bytes_downloaded / result.seconds if result.seconds > 0 else 0.0
        banned = f", banned {len(result.banned)}" if result.banned else ""
        print(
            f"peer fetch: {name} complete: {format_size(result.bytes_downloaded)} in {result.seconds:.2f} s "
            f"({format_size(rate)}/s) from {_peers(len(result.sources))}{banned}",
            file=sys.stderr,
            flush=True,
        )
        if args.json:
            _print_json(result.as_json())
        if args.seed:
            from peer.announcer import Announcer

            # Subscribed (listed as a seeder) only while it serves; the announcer
            # says "stopped" to an HTTP tracker when it stops.
            announcer = Announcer(trackers, my_ip, session.port)
            announcer.add(cf.cascade_hash)
            announcer.start()
            session.listed = False  # the announcer speaks for this peer from now on
            log.info("seeding %s; stop with Ctrl-C", name)
            try:
                stop.wait()
            finally:
                announcer.stop()
        return EXIT_OK
    except DataError as exc:  # opening or renaming the output (a full disk says so itself)
        raise _Failed(str(exc)) from exc
    finally:
        server.stop()
        if store is not None:
            store.close()
        if not done:
            _drop_empty_part(target, store)
        session.say_stopped()


def _fetch_collection(
    args: argparse.Namespace,
    stop: StopSignal,
    coll: Collection,
    out: Path,
    trackers: tuple[TrackerAddress, ...],
    host: str,
    port: int,
    my_ip: str,
    download_rate: int | None,
    upload_rate: int | None,
) -> int:
    """``peer fetch DIR.cascade``: every member into the folder ``out`` (:mod:`peer.collection_fetch`)."""
    from peer.collection_fetch import run_collection

    server = BlockServer(host, port, BlockServerConfig(upload_rate=upload_rate))
    try:
        server.start()
    except OSError as exc:
        if args.listen is not None or exc.errno != errno.EADDRINUSE:
            raise _Failed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        server = BlockServer(host, 0, BlockServerConfig(upload_rate=upload_rate))
        server.start()
    listening = "peer listening on {}:{}".format(*server.address)
    policy = FetchPolicy(max_peers=args.max_peers, stall_timeout=args.timeout, max_download_rate=download_rate)
    # What the served members need (their folder, held open) is let go once the server stopped.
    # The listening line comes once the output is open, as for one file: a run that fails
    # before (tracker down, --out a file) prints its one error line and nothing else.
    with contextlib.ExitStack() as cleanup:
        try:
            return run_collection(
                args,
                coll,
                out,
                TrackerSet(trackers),
                list(trackers),
                server,
                my_ip,
                policy,
                stop.event,
                stop.wait,
                cleanup,
                lambda: log.info("%s", listening),
            )
        except CascadeError as exc:
            raise _Failed(str(exc), code=exit_code(exc)) from exc
        finally:
            server.stop()


class _Target:
    """Where the data goes: ``part`` while incomplete, ``out`` once verified."""

    def __init__(self, out: Path, part: Path, check: DataCheck, complete: bool) -> None:
        self.out = out
        self.part = part
        self.check = check
        self.complete = complete
        # Set once this run created the .part file (it is removed again if no block arrived).
        self.created = False


def part_path(out: Path) -> Path:
    """The name of the incomplete download of ``out``: ``OUT.part`` (valid on every OS)."""
    return out.with_name(out.name + PART_SUFFIX)


def _plan_output(cf: CascadeFile, out: Path, force: bool) -> _Target:
    """Decide where the download goes; nothing is created or written, but a finished
    ``OUT.part`` takes its final name and a partial ``OUT`` becomes ``OUT.part``.

    Raises :class:`DataError` for a directory, a foreign file without ``force``,
    or data whose blocks verify but whose whole-file hash does not.
    """
    if out.is_dir():
        raise DataError(f"{out}: is a directory; give --out a file path")
    part = part_path(out)
    check = check_data(out, cf)
    if out.exists():
        if check.complete:
            return _Target(out, part, check, complete=True)
        if check.valid_count == cf.block_count and check.size == cf.data_length:
            raise DataError(f"{out}: every block verifies but the whole-file SHA-256 does not match the .cascade file")
        if check.size > 0 and check.valid_count == 0 and cf.block_count > 0 and not force:
            raise DataError(
                f"{out} exists and holds none of this file's blocks; not touching it (use --force to overwrite)"
            )
    if part.is_dir():
        raise DataError(f"{part}: is a directory")
    if part.exists():
        # Ours, whatever it holds: resumed without --force.
        part_check = check_data(part, cf)
        if part_check.complete:
            # Interrupted between the last block and the rename.
            _rename(part, out)
            return _Target(out, part, part_check, complete=True)
        if part_check.valid_count == cf.block_count and part_check.size == cf.data_length:
            raise DataError(
                f"{part}: every block verifies but the whole-file SHA-256 does not match the .cascade file;"
                " delete it to start again"
            )
        return _Target(out, part, part_check, complete=False)
    if check.valid_count > 0:
        # A partial OUT (from an older version, or cut short by a power failure):
        # resume it under the incomplete name, so the final name means complete.
        _rename(out, part)
        log.info("%s holds %d of %d blocks: resuming it as %s", out, check.valid_count, cf.block_count, part.name)
        return _Target(out, part, check, complete=False)
    return _Target(out, part, DataCheck(bytearray(cf.block_count), 0, 0, False), complete=False)


def _rename(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError as exc:
        raise from_os_error(exc, src, f"rename it to {dest.name}") from exc


def _open_store(cf: CascadeFile, out: Path, target: _Target) -> BlockStore:
    if target.complete:
        return BlockStore.open_for_fetching(cf, out, target.check)
    target.created = not target.part.exists()
    try:
        return BlockStore.open_for_fetching(cf, target.part, target.check)
    except DataError:
        _drop_empty_part(target, None)  # e.g. a disk too full to reserve the space: free what was taken
        raise


def _drop_empty_part(target: _Target, store: BlockStore | None) -> None:
    """Remove a ``.part`` this run created when it never received a block: a failed
    or interrupted fetch that got nothing leaves nothing behind."""
    if not target.created or (store is not None and store.verified_count > 0):
        return
    try:
        target.part.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("could not remove %s: %s", target.part, exc)


class _Session:
    """This peer's standing at its trackers for one file: who it is, and where it
    has enrolled (and so should say "stopped" when it leaves)."""

    def __init__(self, trackers: TrackerSet, cf: CascadeFile, my_ip: str) -> None:
        self.trackers = trackers
        self.cf = cf
        self.my_ip = my_ip
        self.port = 0
        self.listed = False

    def list_peers(self) -> tuple[PeerRecord, ...]:
        """One list request to every tracker, merged. Raises :class:`CascadeError` when none answered."""
        records = self.trackers.list_peers(self.cf.cascade_hash, self.my_ip, self.port, LIST_TIMEOUT)
        self.listed = True
        return records

    def say_stopped(self) -> None:
        """Tell each HTTP tracker that listed this peer that it left the swarm (the binary
        protocol cannot: its TTL decides)."""
        if not self.listed:
            return
        from peer.http_tracker import announce_stopped

        for tracker in self.trackers.live:  # a tracker that went away would only cost a timeout
            if tracker.url is None:
                continue
            try:
                announce_stopped(tracker, self.cf.cascade_hash, self.my_ip, self.port)
            except CascadeError as exc:
                log.debug("could not tell the tracker this peer stopped: %s", exc)


def _first_listing(session: _Session) -> list[PeerInfo]:
    try:
        return peer_infos(session.list_peers())
    except CascadeError as exc:  # the tracker client's messages name the tracker already
        raise _Failed(str(exc)) from exc


def _download(
    args: argparse.Namespace,
    session: _Session,
    store: BlockStore,
    first: list[PeerInfo],
    stop: StopSignal,
    download_rate: int | None = None,
) -> FetchResult:
    def list_peers() -> list[PeerInfo]:
        return peer_infos(session.list_peers())

    cf = session.cf
    policy = FetchPolicy(max_peers=args.max_peers, stall_timeout=args.timeout, max_download_rate=download_rate)
    fetcher = Fetcher(store, list_peers, policy=policy, my_port=session.port)
    fetcher.add_peers(first)
    stop_watch = _StopWatch(stop, fetcher)
    bar = _ProgressBar(cf, store, args.progress_lines)

    def on_tick(progress: Progress) -> None:
        stop_watch.check()
        bar.update(progress)

    try:
        return fetcher.run(on_tick=on_tick)
    except CascadeError as exc:
        stop.check()
        raise _Failed(str(exc), fetcher) from exc  # a full disk is a DiskFullError that says so
    finally:
        bar.close()


def _peers(n: int) -> str:
    return "1 peer" if n == 1 else f"{n} peers"


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
                unit="iB",  # with the 1024 divisor: KiB, MiB, as in the summary line
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
            self.bar.set_postfix_str(_peers(p.peers), refresh=False)
        elif self.lines:
            now = time.monotonic()
            if now - self.last_line >= 0.1 or p.verified_bytes == p.total_bytes:
                self.last_line = now
                print(f"progress {p.verified_bytes} {p.total_bytes} {p.peers}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
