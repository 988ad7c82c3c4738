"""``peer seed``: verify each data file, serve its verified blocks, subscribe it at the tracker.

:mod:`peer.cli` imports this module only when ``peer seed`` runs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cascade.addresses import parse_hostport
from cascade.collection import Collection
from cascade.errors import DataError, StartError, UsageError
from cascade.metafile import CascadeFile, default_data_path
from cascade.units import format_size, parse_size
from peer.announcer import Announcer
from peer.collection_local import HeldFolder, MemberCheck, check_members, raise_file_limit
from peer.common import Interrupted, StopSignal, announce_ip, setup_logging
from peer.datawatch import DataWatcher
from peer.localdata import check_data
from peer.metafiles import read_metafile
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore, DiskSignature, MemberStore, VerifiedBlocks, disk_signature
from peer.trackers import parse_trackers

log = logging.getLogger("peer")


@dataclass(frozen=True, slots=True)
class _SeedFile:
    cascade_path: Path
    data_path: Path
    cf: CascadeFile


def parse_rate(text: str | None) -> int | None:
    """``--max-upload-rate`` as bytes per second; ``None`` or 0 means no limit."""
    if text is None:
        return None
    rate = parse_size(text.removesuffix("/s"), "upload rate")
    return rate or None


def bind_server(listen: str, config: BlockServerConfig) -> BlockServer:
    """Start a :class:`BlockServer` on ``--listen`` (``HOST:PORT``, default host 0.0.0.0).

    Raises :class:`UsageError` for a bad address and :class:`StartError` when binding fails.
    """
    host, port = parse_hostport(listen, "listen address", default_host="0.0.0.0")
    server = BlockServer(host, port, config)
    try:
        server.start()
    except OSError as exc:
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return server


def log_listening(server: BlockServer) -> None:
    """The first log line of a peer: ``peer listening on HOST:PORT`` with the real port."""
    bound_host, bound_port = server.address
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("peer listening on %s:%d", shown, bound_port)


@dataclass(frozen=True, slots=True)
class _SeedCollection:
    cascade_path: Path
    folder: Path
    collection: Collection


def _seed_files(paths: Sequence[str], data: str | None) -> list[_SeedFile | _SeedCollection]:
    if data is not None and len(paths) != 1:
        raise UsageError("--data works only with a single .cascade file")
    files: list[_SeedFile | _SeedCollection] = []
    seen: set[bytes] = set()
    for raw in paths:
        path = Path(raw)
        read = read_metafile(path)
        if isinstance(read, Collection):
            folder = Path(data) if data is not None else default_data_path(path)
            if not folder.is_dir():
                what = "no such folder" if not folder.exists() else "not a folder"
                raise DataError(f"{folder}: {what} (the files of {path}; use --data to point elsewhere)")
            files.append(_SeedCollection(path, folder, read))
            continue
        cf = read
        data_path = Path(data) if data is not None else default_data_path(path)
        if not data_path.is_file():
            what = "no such data file" if not data_path.exists() else "not a regular file"
            raise DataError(f"{data_path}: {what} (the data for {path}; use --data to point elsewhere)")
        if cf.cascade_hash not in seen:  # the same file named twice is served once
            seen.add(cf.cascade_hash)
            files.append(_SeedFile(path, data_path, cf))
    return files


# Members that are partial or missing are named one line each up to this many (arbitrary).
_MEMBER_LINES = 20


def _seed_collection(
    f: _SeedCollection,
    server: BlockServer,
    watcher: DataWatcher,
    announcer: Announcer,
    folders: list[HeldFolder],
    served: set[bytes],
    stop: StopSignal,
) -> list[str]:
    """Verify every member of a collection (several at a time), serve and announce those with blocks.

    No member stays open: the server opens one when a request needs it, relative
    to the folder held open here (added to ``folders``, for the caller to close),
    and checks it is still the file verified. Returns the log lines to print once
    listening: one for the collection, one per member that is partial or missing (the first few).
    """
    lines: list[str] = []
    complete = blocks = have_blocks = 0
    problems = 0
    held = HeldFolder(f.folder)
    folders.append(held)
    # The same file twice (one cascade hash) is served once, from the copy with the most
    # valid blocks: the first one met could be damaged where a later one is whole.
    best: dict[bytes, tuple[MemberCheck, DiskSignature]] = {}
    for mc, _ in check_members(
        f.folder, f.collection, whole_file=False, progress=lambda _n: stop.check(), root_fd=held.fd
    ):
        cf, check = mc.cf, mc.check
        blocks += cf.block_count
        have_blocks += check.valid_count
        if mc.seen is None:  # missing
            if cf.block_count:
                problems += 1
                if problems <= _MEMBER_LINES:
                    lines.append(f"{mc.problem or f'{f.folder / mc.member.path}: missing'}: not served")
            continue
        if check.valid_count == cf.block_count and check.size == cf.data_length:
            complete += 1
        elif check.valid_count == cf.block_count:
            # Every block verifies, so all of it is served; but it is not the file the
            # collection names, as cascade verify says (a file that grew since create).
            problems += 1
            if problems <= _MEMBER_LINES:
                lines.append(
                    f"{f.folder / mc.member.path}: {check.valid_count}/{cf.block_count} blocks verified, but the file"
                    f" is {check.size} bytes, expected {cf.data_length}: its blocks are served"
                )
        else:
            problems += 1
            if problems <= _MEMBER_LINES:
                lines.append(f"{f.folder / mc.member.path}: {check.valid_count}/{cf.block_count} blocks verified")
        if cf.cascade_hash in served:  # served for an earlier file given
            continue
        kept = best.get(cf.cascade_hash)
        if kept is None or check.valid_count > kept[0].check.valid_count:
            best[cf.cascade_hash] = (mc, mc.seen)
    for mc, seen in best.values():
        cf, check = mc.cf, mc.check
        served.add(cf.cascade_hash)
        store = MemberStore(cf, check.valid, held, mc.member.path, verified=seen)
        server.add_store(store, watcher.wake)
        watcher.add(store, seen)
        if check.valid_count or not cf.block_count:
            announcer.add(cf.cascade_hash)
    if problems > _MEMBER_LINES:
        lines.append(f"... and {problems - _MEMBER_LINES} more files partial or missing")
    count = len(f.collection.members)
    size = format_size(f.collection.total_length)
    lines.insert(
        0,
        f"{f.cascade_path.name}: {complete}/{count} files complete, {have_blocks}/{blocks} blocks verified ({size})",
    )
    return lines


def run(args: argparse.Namespace) -> int:
    """``peer seed``: verify each data file, serve its verified blocks, subscribe it at the tracker."""
    setup_logging(args.verbose, timestamps=True)
    stop = StopSignal().install()
    trackers = parse_trackers(args.tracker, "tracker address")
    rate = parse_rate(args.max_upload_rate)
    host, _ = parse_hostport(args.listen, "listen address", default_host="0.0.0.0")
    ip = announce_ip(host, args.announce_ip)
    files = _seed_files(args.files, args.data)

    # Bind first, so a taken port fails at once, not after minutes of hashing. The
    # listening line comes once every file is verified and served: a client that
    # waits for it never meets a seeder that does not know its files yet.
    server = bind_server(args.listen, BlockServerConfig(upload_rate=rate, idle_timeout=args.idle_timeout))
    announcer = Announcer(trackers, ip, server.address[1], interval=args.announce_interval)

    def changed(store: VerifiedBlocks, before: int, after: int) -> None:
        # A file with no valid block left is not announced; one that has some again is.
        if before and not after:
            announcer.discard(store.cascade_hash)
        elif after and not before:
            announcer.add(store.cascade_hash)

    watcher = DataWatcher(on_change=changed)
    stores: list[BlockStore] = []
    folders: list[HeldFolder] = []
    try:
        lines: list[str] = []
        if any(isinstance(f, _SeedCollection) for f in files):
            # Members are opened on demand, at most max_open_files while no reply holds more.
            raise_file_limit(server.config.max_open_files)
        served: set[bytes] = set()
        for f in files:
            if isinstance(f, _SeedCollection):
                lines += _seed_collection(f, server, watcher, announcer, folders, served, stop)
                continue
            if f.cf.cascade_hash in served:
                continue
            served.add(f.cf.cascade_hash)
            seen = disk_signature(f.data_path)
            check = check_data(f.data_path, f.cf, whole_file=False, progress=lambda _n: stop.check())
            store = BlockStore.open_for_seeding(f.cf, f.data_path, check)
            stores.append(store)
            server.add_store(store, watcher.wake)
            watcher.add(store, seen)
            count, have = f.cf.block_count, check.valid_count
            if have == count:
                note = ""
            elif have:
                note = ", partial"
            else:
                note = f", none in {f.data_path}: not announced"
            size = format_size(f.cf.data_length)
            lines.append(f"{f.cascade_path.name}: {have}/{count} blocks verified ({size}{note})")
            if have or not count:
                announcer.add(f.cf.cascade_hash)
        log_listening(server)
        for line in lines:
            log.info("%s", line)
        announcer.start()
        watcher.start()
        stop.wait()
    except Interrupted:
        pass
    finally:
        watcher.stop(0.5)
        announcer.stop(0.5)
        server.stop(1.0)
        for store in stores:
            store.close()
        for held in folders:
            held.close()
    log.info("peer stopped")
    return 0
