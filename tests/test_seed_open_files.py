"""Seeding a collection with a bounded number of member files open (issue 13).

A block server with a small cap on open member files (4) serves a collection of
20 members to real fetchers with at most the cap open; a reply to a slow reader
keeps its descriptor while other members come and go; a member changed on disk
while it was closed is never served under the old hash and is re-verified with
one line, as a single file is. In-process servers on 127.0.0.1 and socketpairs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cascade.collection import parse_collection
from cascade.wire import BLOCK_RESPONSE_HEADER_SIZE
from peer.collection_local import HeldFolder, check_members, create_collection, walk_tree
from peer.datawatch import DataWatcher
from peer.fetcher import Fetcher
from peer.localdata import check_data
from peer.planner import FetchPolicy
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore, MemberStore
from tests.test_peer_server import TIMEOUT, connect, read_response, recv_exact, req, wait_until

pytestmark = pytest.mark.loopback

CAP = 4
WORKERS = 2
BLOCK = 1024


@dataclass
class Seeded:
    root: Path
    server: BlockServer
    watcher: DataWatcher
    stores: dict[str, MemberStore]
    data: dict[str, bytes]
    changes: list[tuple[int, int]]


def make_tree(root: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    rng = random.Random(13)
    data = {}
    for rel, size in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        data[rel] = rng.randbytes(size)
        (root / rel).write_bytes(data[rel])
    return data


@contextlib.contextmanager
def seeding(root: Path, data: dict[str, bytes], block_size: int = BLOCK) -> Iterator[Seeded]:
    """Serve the tree at ``root`` as ``peer seed`` does: members opened on demand, at most CAP at once.

    The watcher's thread is not started: a test runs its looks itself (``check_once``).
    """
    coll = parse_collection(create_collection(root, walk_tree(root), block_size))
    held = HeldFolder(root)
    changes: list[tuple[int, int]] = []
    watcher = DataWatcher(on_change=lambda _s, before, after: changes.append((before, after)))
    server = BlockServer("127.0.0.1", 0, BlockServerConfig(max_workers=WORKERS, max_open_files=CAP))
    try:
        stores = {}
        for mc, _ in check_members(root, coll, whole_file=False, root_fd=held.fd):
            assert mc.seen is not None and mc.check.complete
            path = mc.member.path
            store = MemberStore(mc.cf, mc.check.valid, held, path, mc.seen)
            server.add_store(store, watcher.wake)
            watcher.add(store, mc.seen)
            stores[path] = store
        server.start()
        yield Seeded(root, server, watcher, stores, data, changes)
    finally:
        server.stop()
        held.close()


def open_under(root: Path) -> list[str]:
    """The files under ``root`` this process has open (skips the test where /proc is missing)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counting open descriptors needs /proc")
    inside = f"{root.resolve()}{os.sep}"
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, or one closed meanwhile
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith(inside):
                found.append(target)
    return found


def member_fds(root: Path) -> int:
    return len(open_under(root))


def get(port: int, store: MemberStore, index: int) -> tuple[int, bytes]:
    with connect(port) as sock:
        sock.sendall(req(index, store.cascade_hash))
        return read_response(sock)


def expected_block(s: Seeded, path: str, index: int) -> bytes:
    return s.data[path][index * BLOCK : (index + 1) * BLOCK]


def test_twenty_members_reach_fetchers_with_at_most_the_cap_open(tmp_path: Path) -> None:
    sizes = {f"d{i % 3}/sub/m{i:02d}.bin": 2 * 1024 + 700 * i for i in range(19)} | {"empty.bin": 0}
    root = tmp_path / "tree"
    data = make_tree(root, sizes)
    out = tmp_path / "out"
    out.mkdir()
    with seeding(root, data) as s:
        assert member_fds(root) == 0  # verified at start, none kept open
        peers = [(*s.server.address, True)]
        policy = FetchPolicy(stall_timeout=20.0)
        errors: list[BaseException] = []
        most = [0]
        done = threading.Event()

        def fetch_some(paths: list[str]) -> None:
            try:
                for path in paths:
                    cf = s.stores[path].cf
                    target = out / path.replace("/", "_")
                    store = BlockStore.open_for_fetching(cf, target, check_data(target, cf))
                    try:
                        fetcher = Fetcher(store, lambda: peers, policy=policy)
                        fetcher.add_peers(peers)
                        assert fetcher.run().complete
                    finally:
                        store.close()
            except BaseException as exc:
                errors.append(exc)

        def sample() -> None:
            while not done.wait(0.001):
                most[0] = max(most[0], member_fds(root))

        paths = sorted(sizes)
        threads = [threading.Thread(target=fetch_some, args=(paths[i::5],)) for i in range(5)]
        sampler = threading.Thread(target=sample)
        sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 6)
        done.set()
        sampler.join(TIMEOUT)
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        for path in paths:
            assert (out / path.replace("/", "_")).read_bytes() == data[path], path
        # Replies are held only by the workers, never parked here: the table never passes the cap.
        assert s.server.open_files.peak <= CAP
        # On the disk side, for an instant per worker: a miss opens its file before it takes the
        # table's lock, and the file it pushes out is closed after letting go of the lock (so
        # another worker's open may come first): at most two beyond the table per worker.
        assert most[0] <= CAP + 2 * WORKERS
        assert member_fds(root) <= CAP
        assert s.server.open_files.opened >= len(paths) - 1  # every member with data was opened
    assert member_fds(root) == 0  # stopping closes them


def test_a_reply_to_a_slow_reader_keeps_its_file_while_others_come_and_go(tmp_path: Path) -> None:
    big = 2 << 20  # one 2 MiB block: far more than a socketpair buffers, so the reply is parked
    sizes = {"big.bin": big} | {f"small/{i:02d}.bin": 3000 for i in range(19)}
    root = tmp_path / "tree"
    data = make_tree(root, sizes)
    with seeding(root, data, block_size=big) as s:
        slow, theirs = socket.socketpair()
        with slow:
            slow.settimeout(TIMEOUT)
            s.server.serve_connection(theirs, "slow")
            slow.sendall(req(0, s.stores["big.bin"].cascade_hash))
            head = recv_exact(slow, BLOCK_RESPONSE_HEADER_SIZE + 4096)  # the reply has begun: the file is held
            port = s.server.address[1]
            for path in sorted(sizes)[1:]:
                assert get(port, s.stores[path], 0) == (0, data[path])
                assert s.server.open_files.open_count <= CAP
            rest = recv_exact(slow, big - 4096)
        assert head[BLOCK_RESPONSE_HEADER_SIZE:] + rest == data["big.bin"]


@pytest.mark.parametrize("how", ["replaced", "replaced by the same bytes", "edited, mtime put back", "folder linked"])
def test_a_member_changed_while_closed_is_not_served_under_the_old_hash(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    sizes = {f"a/b/m{i:02d}.bin": 5 * BLOCK + i for i in range(20)}
    root = tmp_path / "tree"
    data = make_tree(root, sizes)
    target = "a/b/m05.bin"
    with seeding(root, data) as s:
        port = s.server.address[1]
        store = s.stores[target]
        assert get(port, store, 1) == (0, expected_block(s, target, 1))
        others = itertools.cycle(sorted(sizes)[6:12])

        def closed() -> bool:
            # Others asked for, one more each time: the target's file goes once it is the least
            # recently used one that no reply holds (its worker may release it a moment late).
            assert get(port, s.stores[next(others)], 0)[0] == 0
            return not s.server.open_files.is_open(store)

        wait_until(closed, "the member's file to be closed")
        if os.path.isdir("/proc/self/fd"):
            assert str((root / target).resolve()) not in open_under(root)
        on_disk = root / target
        old = data[target]
        if how == "replaced":
            new = bytes(b ^ 0xFF for b in old)
            (root / "a/b/new").write_bytes(new)
            os.replace(root / "a/b/new", on_disk)
        elif how == "replaced by the same bytes":
            (root / "a/b/new").write_bytes(old)
            os.replace(root / "a/b/new", on_disk)
        elif how == "edited, mtime put back":
            st = os.stat(on_disk)
            with open(on_disk, "r+b") as f:
                f.seek(BLOCK + 10)
                f.write(b"X")
            os.utime(on_disk, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: ctime tells
        else:  # its folder moved aside and a link put in its place: the same file, reached through a link
            os.rename(root / "a/b", tmp_path / "b-moved")
            (root / "a/b").symlink_to(tmp_path / "b-moved")
        # Never the old hash's blocks from a file that is not the one verified.
        assert get(port, store, 1)[0] == 2
        with caplog.at_level(logging.WARNING, logger="peer"):
            s.watcher.check_once()
            s.watcher.check_once()  # nothing new: no second line
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1, lines
        if how == "replaced":
            assert lines == [
                f"{on_disk}: data file was replaced; 0/6 blocks verified; 6 no longer match and are not served,"
                " not announced any more"
            ]
            assert s.changes == [(6, 0)]
            assert get(port, store, 1)[0] == 2
        elif how == "replaced by the same bytes":
            assert lines == [f"{on_disk}: data file was replaced; 6/6 blocks verified"]
            assert get(port, store, 1) == (0, expected_block(s, target, 1))  # served from the new file
        elif how == "edited, mtime put back":
            assert lines == [
                f"{on_disk}: data file was modified; 5/6 blocks verified; 1 no longer match and are not served"
            ]
            assert get(port, store, 1)[0] == 2
            assert get(port, store, 2) == (0, expected_block(s, target, 2))
        else:
            assert lines == [
                f"{on_disk}: 'a/b' is a symbolic link; Cascade does not follow it; no longer serving its blocks"
            ]
            assert s.changes == [(6, 0)]
            assert get(port, store, 1)[0] == 2
        # The other members are untouched.
        other = "a/b/m07.bin"
        if how != "folder linked":
            assert get(port, s.stores[other], 0) == (0, expected_block(s, other, 0))
    shutil.rmtree(tmp_path / "b-moved", ignore_errors=True)
