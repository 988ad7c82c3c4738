"""A collection fetched by one planner over shared connections (in-process servers on 127.0.0.1).

:class:`peer.collection_fetch.CollectionFetcher` runs every member's blocks as
one block space: one connection per peer carries requests for any member; a
peer that lacks a member is asked for the others; a peer that lies costs only
its connection, and nothing wrong is ever written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.collection import Collection, parse_collection
from cascade.errors import CascadeError
from cascade.wire import BlockStatus, have_map_size, pack_have_map_request
from peer import collection_fetch
from peer.collection_fetch import PARTIAL_DIR, CollectionFetcher, MemberSet, OutFolder, _Job
from peer.collection_local import HeldFolder, create_collection, walk_tree
from peer.fetcher import WRITE_BEHIND_MIN_BLOCK, FetchPolicy, PeerInfo
from peer.server import BlockServer
from peer.storage import BlockStore, MemberStore
from peer.writebehind import Lender, WriteBehind
from tests.doubles import LoopbackServer
from tests.hostile import PROTOCOL_BREAKERS, HostileServer
from tests.mounts import mounted
from tests.test_peer_server import read_response, req

pytestmark = pytest.mark.loopback

SIZE = 100  # the small members' length, so a liar's answer has the length asked for
BLOCK = 16 << 10


class CountingSeeder(LoopbackServer):
    """A real :class:`BlockServer` behind a listener that counts the connections it accepts."""

    def __init__(self, stores: list[BlockStore]) -> None:
        super().__init__()
        self.server = BlockServer("127.0.0.1", 0)
        for store in stores:
            self.server.add_store(store)
        self.server.start(listen=False)

    def _accepted(self, conn: socket.socket) -> None:
        with self._lock:
            self.connections += 1
        self.server.serve_connection(conn, "127.0.0.1")  # the block server owns it from here on

    def stop(self) -> None:
        super().stop()
        self.server.stop()


def make_tree(src: Path, small: int, big: int) -> tuple[dict[str, bytes], Collection]:
    """``small`` members of one block and ``big`` of several, in nested folders."""
    files = {f"d{i % 3}/s{i:03d}.bin": os.urandom(SIZE) for i in range(small)}
    files |= {f"big/b{i}.bin": os.urandom(3 * BLOCK + 7 * i + 1) for i in range(big)}
    return files, write_tree(src, files, BLOCK)


def write_tree(src: Path, files: dict[str, bytes], block: int) -> Collection:
    """Write ``files`` (path: bytes) under ``src``; their collection, in blocks of ``block``."""
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return parse_collection(create_collection(src, walk_tree(src), block))


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[BlockStore]]:
    opened: list[BlockStore] = []
    yield opened
    for store in opened:
        store.close()


def seeding(src: Path, coll: Collection, stores: list[BlockStore], skip: str = "", only: str = "") -> list[BlockStore]:
    """Stores serving the members of ``coll`` from ``src`` (all, all but ``skip``, or ``only`` one).

    They are kept in ``stores`` too, to be closed.
    """
    mine = [
        BlockStore.open_for_seeding(m.cascade_file(), src / m.path)
        for m in coll.members
        if m.path != skip and (not only or m.path == only)
    ]
    stores.extend(mine)
    return mine


def fetch(out_path: Path, coll: Collection, peers: list[PeerInfo], **policy: float) -> tuple[list[_Job], str | None]:
    """Fetch every member from ``peers``; the jobs (with their results) and the error line of the whole."""
    out = OutFolder(out_path)
    jobs = [_Job(i, m, m.cascade_file()) for i, m in enumerate(coll.members)]
    members = MemberSet(out, jobs, time.monotonic())
    error = None
    try:
        fetcher = CollectionFetcher(members, lambda: peers, policy=FetchPolicy(**policy))  # type: ignore[arg-type]
        try:
            fetcher.run()
        except CascadeError as exc:
            error = str(exc)
        members.drain()
        for job in jobs:
            job.result = members.result(job.slot)
    finally:
        members.close()  # as fetch_collection does: no descriptor left in --out (a mount can go)
        out.close_folders()
        os.close(out.partial_fd)
        os.close(out.fd)
    return jobs, error


def got(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and PARTIAL_DIR not in p.parts
    }


def fetch_whole(tmp_path: Path, files: dict[str, bytes], coll: Collection, stores: list[BlockStore]) -> CountingSeeder:
    """Fetch ``coll`` from one seeder of it (from ``tmp_path/src``) into ``tmp_path/out``: complete, every byte."""
    seeder = CountingSeeder(seeding(tmp_path / "src", coll, stores)).start()
    try:
        jobs, error = fetch(tmp_path / "out", coll, [(*seeder.address, True)])
    finally:
        seeder.stop()
    assert error is None and all(j.result is not None and j.result.complete for j in jobs)
    assert got(tmp_path / "out") == files
    for job in jobs:  # each block counted for its member and its peer
        assert job.result is not None
        assert sum(job.result.sources.values()) == job.cf.block_count
    return seeder


def test_members_share_one_connection_per_peer(tmp_path: Path, stores: list[BlockStore]) -> None:
    files, coll = make_tree(tmp_path / "src", small=40, big=5)
    seeder = fetch_whole(tmp_path, files, coll, stores)
    # 45 members, every request over the one connection the fetcher opened (not one per member).
    assert seeder.connections == 1
    assert not (tmp_path / "out" / PARTIAL_DIR).exists() or not any((tmp_path / "out" / PARTIAL_DIR).iterdir())


def test_members_of_large_blocks_are_written_behind_the_connection(
    tmp_path: Path, stores: list[BlockStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of WRITE_BEHIND_MIN_BLOCK or more are written behind, as for one file; members of one block are not.

    Without it a collection of large files received, hashed and wrote each block in
    turn, and took 1.3-2 x one file of the same size (BENCHMARKS.md).
    """
    block = WRITE_BEHIND_MIN_BLOCK
    files = {f"big/b{i}.bin": os.urandom(3 * block + 1000 * i + 1) for i in range(3)} | {"one.bin": os.urandom(block)}
    coll = write_tree(tmp_path / "src", files, block)
    behind: list[int] = []
    lent: list[bool] = []
    put = WriteBehind.put

    def spy(self: WriteBehind, index: int, data: memoryview, lender: Lender | None = None) -> bool:
        behind.append(index)
        lent.append(lender is not None)
        return put(self, index, data, lender)

    monkeypatch.setattr(WriteBehind, "put", spy)
    fetch_whole(tmp_path, files, coll, stores)
    # The large members' full blocks; their short last blocks (3, 7, 11) and one.bin's go inline.
    assert sorted(behind) == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert all(lent)  # each read into the connection's own buffer, traded rather than copied


def test_a_peer_lacking_a_member_is_asked_for_the_others(tmp_path: Path, stores: list[BlockStore]) -> None:
    src = tmp_path / "src"
    files, coll = make_tree(src, small=20, big=3)
    lacking = "big/b1.bin"
    partial = CountingSeeder(seeding(src, coll, stores, skip=lacking)).start()
    other = CountingSeeder(seeding(src, coll, stores, only=lacking)).start()
    try:
        jobs, error = fetch(tmp_path / "out", coll, [(*partial.address, True), (*other.address, True)])
    finally:
        partial.stop()
        other.stop()
    assert error is None and got(tmp_path / "out") == files
    by_path = {j.member.path: j for j in jobs}
    result = by_path[lacking].result
    assert result is not None and set(result.sources) == {f"127.0.0.1:{other.address[1]}"}
    # The status 1 for the member it lacks closes that connection; it is not asked for it again.
    assert partial.connections <= 3


@pytest.mark.parametrize("behaviour", sorted(PROTOCOL_BREAKERS))
def test_a_lying_peer_costs_its_connection_and_never_a_wrong_byte(
    tmp_path: Path, stores: list[BlockStore], behaviour: str
) -> None:
    src = tmp_path / "src"
    files, coll = make_tree(src, small=60, big=2)
    first = coll.members[0]
    liar = HostileServer(behaviour, first.cascade_file(), src / first.path).start()
    honest = CountingSeeder(seeding(src, coll, stores)).start()
    try:
        # The liar alone: nothing it sends is taken, and the download stops with one line.
        jobs, error = fetch(tmp_path / "alone", coll, [(*liar.address, True)], stall_timeout=0.5)
        assert error is not None and liar.stats.requests > 0
        assert got(tmp_path / "alone") == {}
        assert not any((tmp_path / "alone" / PARTIAL_DIR).iterdir()), "no unverified byte reaches a .part"
        # Beside an honest peer: every member arrives, with the right bytes.
        jobs, error = fetch(tmp_path / "out", coll, [(*liar.address, True), (*honest.address, True)])
    finally:
        liar.stop()
        honest.stop()
    assert error is None and all(j.result is not None and j.result.complete for j in jobs)
    assert got(tmp_path / "out") == files


def test_part_files_stay_open_only_while_written_within_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    files, coll = make_tree(src, small=0, big=6)
    monkeypatch.setattr(collection_fetch, "PART_FDS", 2)
    out = OutFolder(tmp_path / "out")
    jobs = [_Job(i, m, m.cascade_file()) for i, m in enumerate(coll.members)]
    members = MemberSet(out, jobs, time.monotonic())
    members.start()
    try:
        # Every member's blocks in turn (as a random order over several peers would), never more than 2 open.
        for j in range(4):
            for job in jobs:
                if j < job.cf.block_count:
                    i = members.spans.starts[job.slot] + j
                    body = (src / job.member.path).read_bytes()[j * BLOCK : (j + 1) * BLOCK]
                    assert members.write(i, memoryview(body), "test")
                    assert len(members._parts) <= 2
        members.drain()
    finally:
        os.close(out.partial_fd)
        os.close(out.fd)
    assert members.complete and not members._parts
    assert all(members.result(j.slot).complete for j in jobs)
    assert got(tmp_path / "out") == files


def _block_of(src: Path, job: _Job, j: int) -> memoryview:
    return memoryview((src / job.member.path).read_bytes()[j * BLOCK : (j + 1) * BLOCK])


def _ask(sock: socket.socket, job: _Job, j: int) -> tuple[int, bytes]:
    sock.sendall(req(j, job.cf.cascade_hash, keep=True))
    return read_response(sock)


@contextlib.contextmanager
def member_set(out_path: Path, coll: Collection, nameless: bool = True) -> Iterator[tuple[MemberSet, list[_Job]]]:
    """A :class:`MemberSet` over every member of ``coll`` into ``out_path``; finished and closed afterwards."""
    out = OutFolder(out_path)
    jobs = [_Job(i, m, m.cascade_file()) for i, m in enumerate(coll.members)]
    members = MemberSet(out, jobs, time.monotonic(), nameless=nameless)
    try:
        yield members, jobs
    finally:
        members.drain()
        members.close()
        os.close(out.partial_fd)
        os.close(out.fd)


def test_a_member_being_downloaded_is_served_from_its_part_as_its_blocks_verify(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _, coll = make_tree(src, small=0, big=2)
    server = BlockServer("127.0.0.1", 0)
    server.start(listen=False)
    ours, theirs = socket.socketpair()
    ours.settimeout(10.0)
    held = None
    with member_set(tmp_path / "out", coll) as (members, jobs):
        try:
            members.serve_parts(server.add_store)
            server.serve_connection(theirs, "127.0.0.1")
            first, other = jobs
            # Not started: "not present", and the connection stays open (not "unknown hash" and closed).
            assert _ask(ours, first, 0)[0] == BlockStatus.NOT_PRESENT
            assert _ask(ours, other, 1)[0] == BlockStatus.NOT_PRESENT
            assert members.write(members.spans.starts[first.slot], _block_of(src, first, 0), "test")
            assert _ask(ours, first, 0) == (BlockStatus.OK, bytes(_block_of(src, first, 0)))
            assert _ask(ours, first, 1)[0] == BlockStatus.NOT_PRESENT
            # A descriptor held by a send outlives the hard link to the final name and the unlink of the .part.
            part = members.stores[first.slot]
            assert part is not None
            held = server.open_files.acquire(part)
            for j in range(1, first.cf.block_count):
                assert members.write(members.spans.starts[first.slot] + j, _block_of(src, first, j), "test")
            members.drain()
            assert members.result(first.slot).complete
            final = tmp_path / "out" / first.member.path
            assert os.fstat(held.fd).st_ino == final.stat().st_ino
            assert os.pread(held.fd, first.cf.data_length, 0) == final.read_bytes()
        finally:
            if held is not None:
                server.open_files.release(held)
            ours.close()
            server.stop()


def test_the_members_under_way_are_listed_every_other_time(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _, coll = make_tree(src, small=0, big=4)
    with member_set(tmp_path / "out", coll) as (members, jobs):
        busy = jobs[2]
        assert members.write(members.spans.starts[busy.slot], _block_of(src, busy, 0), "test")
        listed = [members.next_to_list() for _ in range(8)]
        # Listing enrols this peer in a member's swarm until the tracker's TTL: the one it serves a
        # part of stays listed, and every member with blocks missing still has its turn.
        assert listed[::2] == [busy] * 4
        assert {id(j) for j in listed} == {id(j) for j in jobs}


def nameless_here(folder: Path) -> bool:
    """Whether ``folder`` takes nameless files (Linux O_TMPFILE, a file system with them) and procfs names them."""
    if not collection_fetch.O_TMPFILE or not os.path.isdir("/proc/self/fd"):
        return False
    try:
        os.close(os.open(folder, collection_fetch.O_TMPFILE | os.O_WRONLY, 0o600))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("nameless", [True, False], ids=["nameless", "part-files"])
def test_one_block_members_get_their_names_and_never_take_one_that_appeared(tmp_path: Path, nameless: bool) -> None:
    src = tmp_path / "src"
    files, coll = make_tree(src, small=6, big=0)
    out = tmp_path / "out"
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours")
    with member_set(out, coll, nameless=nameless) as (members, jobs):
        taken, linked = jobs[1], jobs[2]
        # Names that appear after the fetch looked (a file, and a symlink out of --out).
        (out / taken.member.path).parent.mkdir(parents=True, exist_ok=True)
        (out / taken.member.path).write_bytes(b"someone else's")
        (out / linked.member.path).parent.mkdir(parents=True, exist_ok=True)
        (out / linked.member.path).symlink_to(outside)
        for job in jobs:
            i = members.spans.starts[job.slot]
            assert members.write(i, _block_of(src, job, 0), "test")
            assert not members.write(i, _block_of(src, job, 0), "test")  # a late copy is a duplicate
        members.drain()
        # Written nameless where the system allows it (it does on Linux), else by .part files.
        assert bool(members._direct[jobs[0].slot]) == (nameless and nameless_here(out))
    for job in (taken, linked):
        assert job.error is not None and "appeared while it downloaded; not touching it" in job.error
    assert (out / taken.member.path).read_bytes() == b"someone else's"
    assert (out / linked.member.path).is_symlink() and outside.read_bytes() == b"not yours"
    placed = {p: data for p, data in files.items() if p not in (taken.member.path, linked.member.path)}
    assert {p: data for p, data in got(out).items() if p in placed} == placed
    for rel in placed:
        assert (out / rel).stat().st_nlink == 1
    left = sorted(p.name for p in (out / PARTIAL_DIR).iterdir())
    # The .part way keeps what it could not name, for a rerun; a nameless file leaves nothing.
    assert len(left) == (0 if nameless and nameless_here(out) else 2)


def test_a_one_block_member_with_a_part_from_an_earlier_run_is_finished_from_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files, coll = make_tree(src, small=3, big=0)
    out = tmp_path / "out"
    with member_set(out, coll) as (members, jobs):
        stale = jobs[0]
        (out / PARTIAL_DIR / collection_fetch._part_name(stale)).write_bytes(bytes(SIZE))  # killed before its write
        check = collection_fetch._check_part(members.out, stale)
        assert check is not None and check.valid_count == 0
        members.resume({stale.slot: check})
        for job in jobs:
            assert members.write(members.spans.starts[job.slot], _block_of(src, job, 0), "test")
        members.drain()
        assert all(members.result(j.slot).complete for j in jobs)
    assert got(out) == files
    assert not any((out / PARTIAL_DIR).iterdir())


def test_a_nameless_member_is_served_from_its_final_name_once_it_has_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files, coll = make_tree(src, small=3, big=0)
    out = tmp_path / "out"
    server = BlockServer("127.0.0.1", 0)
    server.start(listen=False)
    ours, theirs = socket.socketpair()
    ours.settimeout(10.0)
    final = None
    try:
        with member_set(out, coll) as (members, jobs):
            final = HeldFolder(out)
            placed: list[str] = []

            def on_placed(job: _Job, seen: tuple[int, int, int, int, int]) -> None:
                store = members.stores[job.slot]
                assert store is not None
                store.placed(seen)
                placed.append(job.member.path)

            members.on_placed = on_placed
            members.serve_parts(server.add_store, final)
            server.serve_connection(theirs, "127.0.0.1")
            first = jobs[0]
            assert _ask(ours, first, 0)[0] == BlockStatus.NOT_PRESENT  # not downloaded: the connection stays
            assert members.write(members.spans.starts[first.slot], _block_of(src, first, 0), "test")
            assert placed == [first.member.path]
            assert _ask(ours, first, 0) == (BlockStatus.OK, files[first.member.path])
            # Opened as any member is: checked against the signature it was placed with.
            store = members.stores[first.slot]
            assert isinstance(store, MemberStore) and store.as_verified()
            # Complete, but fetched: the plain map, no super-seeding offer (docs/protocol-extensions.md).
            ours.sendall(pack_have_map_request(first.cf.cascade_hash))
            status, body = read_response(ours)
            assert (status, len(body)) == (BlockStatus.OK, have_map_size(first.cf.block_count))
            os.utime(out / first.member.path, ns=(0, 0))
            assert not store.as_verified()
    finally:
        ours.close()
        server.stop()
        if final is not None:
            final.close()


def test_where_nameless_files_cannot_be_named_every_member_goes_the_part_way(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files, coll = make_tree(src, small=4, big=0)
    out = tmp_path / "out"
    if not nameless_here(tmp_path):
        pytest.skip("no nameless files here: the .part way is all there is")
    empty = tmp_path / "no-procfs"
    empty.mkdir()
    with member_set(out, coll) as (members, jobs):
        # As in a sandbox whose procfs does not name descriptors: linkat finds nothing there.
        os.close(members._fds)
        members._fds = os.open(empty, os.O_RDONLY)
        for job in jobs:
            assert members.write(members.spans.starts[job.slot], _block_of(src, job, 0), "test")
        members.drain()
        assert not any(members._direct)  # given up for every member after the first refusal
        assert all(members.result(j.slot).complete for j in jobs)
    assert got(out) == files
    assert not any((out / PARTIAL_DIR).iterdir())
    assert not any(empty.iterdir())


@pytest.fixture
def exfat(tmp_path: Path) -> Iterator[Path]:
    """A real exFAT file system (FUSE, on a loop device; root only), which has no hard links; unmounted after."""
    tools = ("mkfs.exfat", "mount.exfat-fuse", "losetup", "umount")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not all(shutil.which(t) for t in tools):
        pytest.skip("an exFAT mount needs root, /dev/fuse, exfatprogs and exfat-fuse (scripts/test.sh installs them)")
    image, mount = tmp_path / "exfat.img", tmp_path / "exfat"
    mount.mkdir()
    with image.open("wb") as f:
        f.truncate(16 << 20)
    if subprocess.run(["mkfs.exfat", str(image)], capture_output=True, timeout=30).returncode:
        pytest.skip("mkfs.exfat failed")
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True, timeout=30)
    if loop.returncode:
        pytest.skip(f"no loop device here: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        with mounted(["mount.exfat-fuse", device, str(mount)], mount, "this machine does not let us mount FUSE"):
            yield mount
    finally:
        subprocess.run(["losetup", "-d", device], timeout=30, check=True)


def test_members_are_named_where_the_file_system_has_no_hard_links(
    tmp_path: Path, stores: list[BlockStore], exfat: Path
) -> None:
    # exFAT (a USB drive), FAT and some FUSE or SMB mounts refuse link(): every member of
    # more than one block failed with "cannot give the downloaded file its name", at every
    # rerun. There a member is renamed into place once its name is seen free.
    (exfat / "probe").write_bytes(b"")
    with pytest.raises(OSError):
        os.link(exfat / "probe", exfat / "probe2")
    files, coll = make_tree(tmp_path / "src", small=3, big=3)
    seeder = CountingSeeder(seeding(tmp_path / "src", coll, stores)).start()
    try:
        jobs, error = fetch(exfat / "out", coll, [(*seeder.address, True)])
    finally:
        seeder.stop()
    assert error is None, error
    assert [j.error for j in jobs] == [None] * len(jobs)
    assert all(j.result is not None and j.result.complete for j in jobs)
    assert got(exfat / "out") == files
    assert os.listdir(exfat / "out" / PARTIAL_DIR) == []
