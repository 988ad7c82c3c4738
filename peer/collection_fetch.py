"""``peer fetch DIR.cascade``: download every member of a collection into ``--out``, safely.

The simple form, stated as such: each member is fetched by its own
:class:`peer.fetcher.Fetcher` (the single-file downloader), several at a time
(``CONCURRENT_MEMBERS``), sharing one connection budget (``--max-peers`` split
between them), one block server, one tracker set and what the tracker said:
peers found for one member are offered to the next, so a folder of many small
files asks the tracker once per member only when those peers lack it. Members
do not yet share a connection to a peer (a request names its cascade hash, so
they could; that is the fetch planner's to do).

Writing is where a hostile collection could hurt, so everything is written
relative to a descriptor of ``--out``:

- folders are created one component at a time (``mkdir`` then ``open`` with
  ``O_DIRECTORY | O_NOFOLLOW``, relative to the parent's descriptor); a
  component that exists as a symlink or as a file refuses that member;
- a member is downloaded into ``OUT/.cascade-partial/INDEX-HASH.part``
  (opened with ``O_NOFOLLOW | O_CREAT``) and, once its whole-file hash
  matched, hard-linked to its final name, which fails if anything is there
  (so no file is ever overwritten), then the ``.part`` is unlinked;
- a final name that already holds a file is only accepted when it is already
  complete and verified; anything else there is left alone and that member fails.

A ``.part`` survives a SIGKILL with its verified blocks; a rerun resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cascade.addresses import TrackerAddress
from cascade.collection import Collection, Member
from cascade.command import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from cascade.errors import CascadeError, DataError, ProtocolError, from_os_error
from cascade.metafile import CascadeFile
from cascade.units import format_size
from cascade.wire import (
    BLOCK_RESPONSE_HEADER_SIZE,
    BlockStatus,
    pack_block_request,
    unpack_block_response_header_from,
)
from peer.announcer import Announcer
from peer.collection_local import (
    O_DIRECTORY,
    O_NOFOLLOW,
    MemberMissing,
    open_member,
    raise_file_limit,
    require_safe_tree_io,
)
from peer.fetcher import Fetcher, FetchPolicy, FetchResult, PeerInfo, Progress
from peer.localdata import DataCheck, check_data
from peer.server import BlockServer
from peer.storage import BlockStore
from peer.trackers import TrackerSet

log = logging.getLogger("peer.fetch")

# The folder under --out that holds the incomplete members (a member path may not use it).
PARTIAL_DIR = ".cascade-partial"
# Members downloading at once. Arbitrary: enough that a folder of small files keeps
# the connections busy between one member's end and the next one's start.
CONCURRENT_MEMBERS = 4
LIST_TIMEOUT = 5.0

_DIR_FLAGS = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class MemberRefused(DataError):
    """This member cannot be written where the collection says (a symlink, a foreign file on its way)."""


class OutFolder:
    """``--out``, held open; every member is written relative to it, never by a joined path."""

    def __init__(self, out: Path) -> None:
        self.path = out
        try:
            require_safe_tree_io()
            out.mkdir(mode=0o755, exist_ok=True)
            self.fd = os.open(out, os.O_RDONLY | O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except (FileExistsError, NotADirectoryError) as exc:
            raise DataError(f"{out}: exists and is not a folder; give --out a folder for a collection") from exc
        except OSError as exc:
            raise from_os_error(exc, out, "create the output folder") from exc
        self._lock = threading.Lock()  # folder creation by several members at once
        self.partial_fd = self._folder(self.fd, PARTIAL_DIR, out / PARTIAL_DIR)

    def _folder(self, parent: int, name: str, shown: Path) -> int:
        """Open (creating if needed) folder ``name`` under ``parent``; never through a symlink."""
        with self._lock:
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _refusal(exc, shown) from exc
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass  # made meanwhile; opened below like any other
            except OSError as exc:
                raise from_os_error(exc, shown, "create the folder") from exc
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                raise _refusal(exc, shown) from exc

    def parent_of(self, path: str) -> tuple[int, str]:
        """A descriptor of member ``path``'s folder (created as needed) and its last component."""
        *dirs, name = path.split("/")
        fd = os.dup(self.fd)
        try:
            for i, comp in enumerate(dirs):
                nfd = self._folder(fd, comp, self.path / "/".join(dirs[: i + 1]))
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, name


def _refusal(exc: OSError, shown: Path) -> CascadeError:
    if exc.errno in (errno.ELOOP, errno.EMLINK) or (exc.errno == errno.ENOTDIR and shown.is_symlink()):
        return MemberRefused(f"{shown}: is a symbolic link; Cascade writes nothing through it")
    if exc.errno == errno.ENOTDIR:
        return MemberRefused(f"{shown}: exists and is not a folder; not touching it")
    return from_os_error(exc, shown, "open the folder")


@dataclass(slots=True)
class _Job:
    index: int
    member: Member
    cf: CascadeFile
    result: FetchResult | None = None
    error: str | None = None
    already: bool = False  # complete before this run
    fast: bool = False  # fetched whole over a shared connection (_FastSmall)
    store: BlockStore | None = None
    verified: int = 0  # bytes verified so far (for the one progress bar)
    extra: dict[str, Any] = field(default_factory=dict)


def _part_name(job: _Job) -> str:
    return f"{job.index}-{job.cf.cascade_hash.hex()[:16]}.part"


def _final_state(out: OutFolder, job: _Job) -> BlockStore | None:
    """The member at its final name, complete, as a store to serve; ``None`` when the name is free.

    Raises :class:`MemberRefused` when something else is there (never overwritten).
    """
    shown = out.path / job.member.path
    try:
        fd = open_member(out.fd, job.member.path, shown)
    except MemberMissing:
        return None
    except DataError as exc:
        raise MemberRefused(f"{exc}; not touching it") from exc
    try:
        check = check_data(shown, job.cf, whole_file=True, fd=fd, workers=1)
    except BaseException:
        os.close(fd)
        raise
    if check.complete:
        return BlockStore(job.cf, shown, os.fdopen(fd, "rb", buffering=0), check.valid, writable=False)
    os.close(fd)
    raise MemberRefused(f"{shown}: exists and is not this file; not touching it")


def _open_part(out: OutFolder, job: _Job) -> tuple[BlockStore, bool]:
    """The member's ``.part`` as a writable store (created if needed); and whether this run created it."""
    name = _part_name(job)
    shown = out.path / PARTIAL_DIR / name
    flags = os.O_RDWR | os.O_CREAT | O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        created = False
        try:
            fd = os.open(name, flags | os.O_EXCL, 0o644, dir_fd=out.partial_fd)
            created = True
        except FileExistsError:
            fd = os.open(name, flags, 0o644, dir_fd=out.partial_fd)
    except OSError as exc:
        raise (
            _refusal(exc, shown)
            if exc.errno in (errno.ELOOP, errno.EMLINK)
            else from_os_error(exc, shown, "open the partial file")
        ) from exc
    f = os.fdopen(fd, "r+b", buffering=0)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{shown}: not a regular file")
        check = (
            DataCheck(bytearray(job.cf.block_count), 0, 0, False)
            if created
            else check_data(shown, job.cf, whole_file=False, fd=fd, workers=1)
        )
        if st.st_size < job.cf.data_length:
            os.ftruncate(fd, job.cf.data_length)
    except OSError as exc:
        f.close()
        raise from_os_error(exc, shown, "reserve space for the partial file") from exc
    except BaseException:
        f.close()
        raise
    assert isinstance(f, io.FileIO)
    return BlockStore(job.cf, shown, f, bytearray(check.valid), writable=True), created


def _place(out: OutFolder, job: _Job) -> None:
    """Give a complete ``.part`` its final name: a hard link that fails if the name is taken, then unlink."""
    parent, name = out.parent_of(job.member.path)
    try:
        try:
            os.link(_part_name(job), name, src_dir_fd=out.partial_fd, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError as exc:
            raise MemberRefused(f"{out.path / job.member.path}: appeared while it downloaded; not touching it") from exc
        except OSError as exc:
            raise from_os_error(exc, out.path / job.member.path, "give the downloaded file its name") from exc
        os.unlink(_part_name(job), dir_fd=out.partial_fd)
    finally:
        os.close(parent)


def _empty(out: OutFolder, job: _Job) -> None:
    """An empty member: created exclusively (no peer needed), never through a symlink."""
    parent, name = out.parent_of(job.member.path)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, 0o644, dir_fd=parent)
        os.close(fd)
    except OSError as exc:
        raise from_os_error(exc, out.path / job.member.path, "create the empty file") from exc
    finally:
        os.close(parent)


def fetch_collection(
    args: argparse.Namespace,
    coll: Collection,
    out_path: Path,
    trackers: TrackerSet,
    server: BlockServer,
    my_ip: str,
    policy: FetchPolicy,
    stop_event: threading.Event,
    stores: list[BlockStore],
) -> tuple[list[_Job], float]:
    """Fetch every member of ``coll`` into ``out_path``; returns the jobs (each with its result or error).

    Every store opened (and served by ``server``) is appended to ``stores``, for the
    caller to close once the server stopped. Raises :class:`DataError` when ``out_path``
    cannot be used at all; a member's failure is in its job.
    """
    for m in coll.members:
        if m.path.split("/", 1)[0].casefold() == PARTIAL_DIR:
            raise DataError(f"the collection holds {m.path!r}, a name Cascade keeps for partial downloads")
    raise_file_limit(len(coll.members))
    out = OutFolder(out_path)
    started = time.monotonic()
    jobs = [_Job(i, m, m.cascade_file()) for i, m in enumerate(coll.members)]
    known: dict[tuple[str, int], PeerInfo] = {}
    known_lock = threading.Lock()
    bar = _Bar(coll.total_length, out_path.name, args.progress_lines)
    port = server.address[1]
    per_member = max(1, args.max_peers // CONCURRENT_MEMBERS)

    def list_for(cf: CascadeFile) -> list[PeerInfo]:
        records = trackers.list_peers(cf.cascade_hash, my_ip, port, LIST_TIMEOUT)
        infos: list[PeerInfo] = [(r.ip, r.port, r.good, r.last_seen) for r in records]
        with known_lock:
            for info in infos:
                known[(info[0], info[1])] = info
        return infos

    def one(job: _Job) -> None:
        if stop_event.is_set():
            return
        try:
            done = _final_state(out, job)
            if done is not None:
                job.already, job.store = True, done
                stores.append(done)
                server.add_store(done)
                job.verified = job.cf.data_length
                bar.add(job.cf.data_length)
                return
            if job.cf.block_count == 0:
                _empty(out, job)
                return
            store, created = _open_part(out, job)
            job.store = store
            stores.append(store)
            job.verified = store.verified_count * job.cf.block_size
            bar.add(min(job.verified, job.cf.data_length))
            server.add_store(store)
            fetcher = Fetcher(
                store,
                lambda: list_for(job.cf),
                policy=FetchPolicy(
                    max_peers=per_member,
                    stall_timeout=policy.stall_timeout,
                    max_download_rate=policy.max_download_rate,
                ),
                my_port=port,
            )
            with known_lock:
                shared = list(known.values())
            if shared:
                fetcher.add_peers(shared)  # peers of the members before: they likely hold this one too
            else:
                fetcher.add_peers(list_for(job.cf))

            def tick(p: Progress) -> None:
                if stop_event.is_set():
                    fetcher.stop()
                bar.add(p.verified_bytes - job.verified)
                job.verified = p.verified_bytes

            result = fetcher.run(on_tick=tick)
            job.result = result
            if result.complete:
                _place(out, job)
            elif created and store.verified_count == 0:
                os.unlink(_part_name(job), dir_fd=out.partial_fd)
        except CascadeError as exc:
            job.error = str(exc)

    try:
        small = [j for j in jobs if j.cf.block_count == 1] if policy.max_download_rate is None else []
        if small and not stop_event.is_set():
            try:
                peers = list_for(small[0].cf)
            except CascadeError as exc:
                log.debug("no listing for the small files: %s", exc)
                peers = []
            fast = _FastSmall(out, bar, stop_event, port, args.max_peers)
            fast.run([j for j in small if fast.eligible(j)], peers)
            if fast.done:
                log.debug("%d small files over shared connections", fast.done)
        with ThreadPoolExecutor(max_workers=CONCURRENT_MEMBERS, thread_name_prefix="member") as pool:
            for _ in pool.map(one, [j for j in jobs if not j.fast]):
                pass
        if args.seed:  # the small files fetched above are served (and announced) too
            for j in jobs:
                if j.fast:
                    done = _final_state(out, j)
                    if done is not None:
                        j.store = done
                        stores.append(done)
                        server.add_store(done)
    finally:
        bar.close()
        seconds = time.monotonic() - started
        with contextlib.suppress(OSError):  # ENOTEMPTY: a partial member keeps it for the rerun
            os.rmdir(PARTIAL_DIR, dir_fd=out.fd)
        out_fd, partial_fd = out.fd, out.partial_fd
        os.close(partial_fd)
        os.close(out_fd)
    return jobs, seconds


# Requests in flight on one shared connection (arbitrary: 64 small files a round trip).
FAST_DEPTH = 64
FAST_TIMEOUT = 10.0  # a peer silent this long on a shared connection is left to the regular path


class _FastSmall:
    """Members of one block, fetched whole over one kept-open, pipelined connection per peer.

    A request names its cascade hash (PROTOCOL.md section 3), so one connection carries
    requests for any number of members; this is what makes a folder of thousands of
    small files cost about what one file of the same size does. Each body is checked
    against its block hash (which, for one block, is the whole-file check too) and
    written to a new ``.part`` (``O_EXCL``), then linked into place as any member.
    Anything that goes wrong (a peer lacking the file, a bad block, a closed or silent
    connection, a ``.part`` already there) leaves the member to the regular path.
    """

    def __init__(self, out: OutFolder, bar: _Bar, stop: threading.Event, my_port: int, max_peers: int) -> None:
        self.out = out
        self.bar = bar
        self.stop = stop
        self.my_port = my_port
        self.max_peers = max(1, max_peers)
        self.done = 0
        self._queue: deque[_Job] = deque()
        # Guards the queue and _busy; notified when requests go back to the queue.
        self._cond = threading.Condition()
        # Connections with requests in flight: while any has, an idle one waits for what
        # it may give back (a liar can take the whole queue and then fail).
        self._busy = 0

    def eligible(self, job: _Job) -> bool:
        """Not at its final name and no ``.part`` (a resumed member takes the regular path)."""
        try:
            os.stat(_part_name(job), dir_fd=self.out.partial_fd, follow_symlinks=False)
            return False
        except FileNotFoundError:
            pass
        except OSError:
            return False
        try:
            os.stat(job.member.path, dir_fd=self.out.fd, follow_symlinks=False)
            return False
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def run(self, jobs: list[_Job], peers: list[PeerInfo]) -> None:
        addrs = [(p[0], p[1]) for p in sorted(peers, key=lambda p: not p[2])]
        addrs = [a for a in addrs if a[1] != 0 and not (a[1] == self.my_port and a[0].startswith("127."))]
        if not jobs or not addrs:
            return
        self._queue.extend(jobs)
        threads = [
            threading.Thread(target=self._connection, args=(a,), name="fast-small", daemon=True)
            for a in addrs[: self.max_peers]
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._queue.clear()  # what no connection could take is left to the regular path

    def _connection(self, addr: tuple[str, int]) -> None:
        try:
            sock = socket.create_connection(addr, timeout=FAST_TIMEOUT)
        except OSError as exc:
            log.debug("fast path: cannot connect to %s:%d: %s", *addr, exc)
            return
        inflight: deque[_Job] = deque()
        busy = False
        try:
            with sock:
                while not self.stop.is_set():
                    batch: list[bytes] = []
                    with self._cond:
                        if busy and not inflight:  # idle now: others must not wait for this one
                            busy = False
                            self._busy -= 1
                        while not inflight and not self._queue and self._busy and not self.stop.is_set():
                            self._cond.wait(0.1)  # bounded: the busy ones time out within FAST_TIMEOUT
                        while self._queue and len(inflight) < FAST_DEPTH:
                            job = self._queue.popleft()
                            inflight.append(job)
                            batch.append(pack_block_request(0, job.cf.cascade_hash, keep_open=True))
                        if bool(inflight) != busy:
                            busy = bool(inflight)
                            self._busy += 1 if busy else -1
                    if batch:
                        sock.sendall(b"".join(batch))
                    if not inflight:
                        return
                    job = inflight.popleft()
                    status, length = unpack_block_response_header_from(_recv_exact(sock, BLOCK_RESPONSE_HEADER_SIZE))
                    if status != BlockStatus.OK:
                        if status != BlockStatus.NOT_PRESENT:
                            return  # the server closes after any other status
                        continue
                    if length != job.cf.data_length:
                        return  # not what we asked for: leave this peer to the regular path
                    body = _recv_exact(sock, length)
                    if hashlib.sha256(body).digest() != job.cf.block_hash(0):
                        return
                    try:
                        self._write(job, body)
                    except CascadeError as exc:
                        job.error = str(exc)
                        job.fast = True  # failed for good (a foreign file, a symlink): not retried
                        continue
                    job.fast = True
                    self.done += 1
                    self.bar.add(length)
        except (OSError, ProtocolError) as exc:
            log.debug("fast path: %s:%d: %s", *addr, exc)
        finally:
            # Requests not answered go back for another connection (or the regular path).
            with self._cond:
                self._queue.extendleft(reversed(inflight))
                if busy:
                    self._busy -= 1
                self._cond.notify_all()

    def _write(self, job: _Job, body: bytes) -> None:
        name = _part_name(job)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        shown = self.out.path / PARTIAL_DIR / name
        try:
            fd = os.open(name, flags, 0o644, dir_fd=self.out.partial_fd)
        except OSError as exc:
            raise from_os_error(exc, shown, "create the partial file") from exc
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            os.close(fd)
            os.unlink(name, dir_fd=self.out.partial_fd)
            raise from_os_error(exc, shown, "write") from exc
        os.close(fd)
        try:
            _place(self.out, job)
        except CascadeError:
            os.unlink(name, dir_fd=self.out.partial_fd)
            raise


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes; raises :class:`ProtocolError` when the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ProtocolError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class _Bar:
    """One progress bar for the whole set (bytes verified over all members), on a terminal."""

    def __init__(self, total: int, name: str, lines: bool) -> None:
        self.total = total
        self.done = 0
        self.lines = lines
        self.last = 0.0
        self._lock = threading.Lock()
        self.bar: Any = None
        if sys.stderr.isatty() and not lines:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, unit="iB", unit_scale=True, unit_divisor=1024, file=sys.stderr, desc=name, leave=False
            )

    def add(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif self.lines:
                now = time.monotonic()
                if now - self.last >= 0.1 or self.done >= self.total:
                    self.last = now
                    print(f"progress {self.done} {self.total} 0", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_collection(
    args: argparse.Namespace,
    coll: Collection,
    out_path: Path,
    trackers: TrackerSet,
    tracker_addrs: list[TrackerAddress],
    server: BlockServer,
    my_ip: str,
    policy: FetchPolicy,
    stop_event: threading.Event,
    stop_wait: Any,
    stores: list[BlockStore],
) -> int:
    """Fetch, report (one line per failed member, one for the whole; ``--json`` per file and overall), seed."""
    jobs, seconds = fetch_collection(args, coll, out_path, trackers, server, my_ip, policy, stop_event, stores)
    failed = [j for j in jobs if j.error is not None or (j.result is not None and not j.result.complete)]
    downloaded = sum(j.result.bytes_downloaded for j in jobs if j.result is not None)
    for j in failed[:20]:
        print(f"peer fetch: {j.error or f'{out_path / j.member.path}: incomplete'}", file=sys.stderr, flush=True)
    if len(failed) > 20:
        print(f"peer fetch: ... and {len(failed) - 20} more files failed", file=sys.stderr, flush=True)
    count = len(jobs)
    rate = downloaded / seconds if seconds > 0 else 0.0
    if stop_event.is_set():
        summary = f"peer fetch: interrupted; verified blocks are kept in {out_path / PARTIAL_DIR}, rerun to resume"
    elif failed:
        summary = f"peer fetch: error: {out_path}: {count - len(failed)} of {count} files complete"
    else:
        summary = (
            f"peer fetch: {out_path.name}/ complete: {count} files, {format_size(downloaded)} in {seconds:.2f} s "
            f"({format_size(rate)}/s)"
        )
    print(summary, file=sys.stderr, flush=True)
    if args.json:
        import json

        files = []
        for j in jobs:
            doc: dict[str, object] = {"path": j.member.path, "cascade_hash": j.cf.cascade_hash.hex()}
            if j.result is not None:
                doc.update(j.result.as_json())
            else:
                doc["complete"] = j.error is None and not stop_event.is_set()
                doc["bytes_downloaded"] = 0
            if j.error is not None:
                doc["complete"] = False
                doc["error"] = j.error
            files.append(doc)
        overall = {
            "complete": not failed and not stop_event.is_set(),
            "collection_hash": coll.collection_hash.hex(),
            "count": count,
            "complete_files": count - len(failed),
            "bytes_downloaded": downloaded,
            "seconds": round(seconds, 4),
            "files": files,
        }
        print(json.dumps(overall), flush=True)
    if stop_event.is_set():
        return EXIT_INTERRUPTED
    if failed:
        return EXIT_FAILED
    if args.seed:
        announcer = Announcer(tracker_addrs, my_ip, server.address[1])
        for j in jobs:
            announcer.add(j.cf.cascade_hash)
        announcer.start()
        log.info("seeding %s; stop with Ctrl-C", out_path.name)
        try:
            stop_wait()
        finally:
            announcer.stop()
    return EXIT_OK
