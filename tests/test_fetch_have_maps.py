"""The fetcher with have maps, against real block servers and version-1 doubles on 127.0.0.1.

A peer with a map is never asked for a block it lacks (no status 2); a server
that knows nothing of maps (status 3 and a close, a close without a reply, a
status 1) costs at most a reconnect or two and then serves as before; a lying
map costs wasted requests, never a wrong byte.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.metafile import CascadeFile
from cascade.wire import (
    BLOCK_REQUEST_SIZE,
    HAVEMAP_INDEX,
    BlockStatus,
    HaveMap,
    pack_block_response_header,
    unpack_block_request_from,
)
from oscompat.features import decide, detect
from peer import planner as planner_module
from peer.fetcher import DOWNLOAD_PRIORITY, Fetcher, prioritize_download
from peer.localdata import check_data
from peer.planner import FetchPolicy
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from tests.doubles import LoopbackServer, make_file, sha256_file

pytestmark = pytest.mark.loopback

FAST = FetchPolicy(stall_timeout=20.0)


@contextlib.contextmanager
def real_server(store: BlockStore) -> Iterator[tuple[str, int]]:
    server = BlockServer("127.0.0.1", 0, BlockServerConfig(max_workers=2))
    try:
        server.add_store(store)
        server.start()
        yield server.address
    finally:
        server.stop()


def fetch(cf: CascadeFile, out: Path, peers: list[tuple[str, int]]) -> Fetcher:
    store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
    infos = [(host, port, True) for host, port in peers]
    fetcher = Fetcher(store, lambda: infos, policy=FAST)
    try:
        fetcher.add_peers(infos)
        result = fetcher.run()
    finally:
        store.close()
    assert result.complete
    assert sha256_file(out) == cf.file_hash
    return fetcher


class V1Server(LoopbackServer):
    """A version-1 server that keeps connections open; ``on_map`` says what it does with block 2^64-1.

    "status3": answers status 3 and closes (what PROTOCOL.md says); "close": closes without a
    word; "lie": answers a map saying it holds every block, though it holds only ``held``;
    "offer": super-seeds, offering a few blocks per map, and sends each block slowly.
    """

    def __init__(self, cf: CascadeFile, data: Path, on_map: str, held: set[int] | None = None) -> None:
        super().__init__()
        self.cf, self.data, self.on_map = cf, data, on_map
        self.held = set(range(cf.block_count)) if held is None else held
        self.map_requests = 0
        self.not_present = 0
        # on_map "offer": a super-seeder's offers of offer_size blocks; block requests outside
        # the offer current when they are read.
        self.offer: list[int] = []
        self.offer_size = 12
        self.delay = 0.05
        self.asked: set[int] = set()
        self.offered: set[int] = set()
        self.outside: list[int] = []
        # Offers whose last block was asked for with the next map request already sent behind
        # it (waiting in our socket), and those whose next map request came only later.
        self.map_behind = 0
        self.map_later = 0
        # Until this time.monotonic(), offers name no block ("wait your turn"); how many such were sent.
        self.empty_until = 0.0
        self.empty_offers = 0

    def __enter__(self) -> V1Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, conn: socket.socket) -> None:
        fd = os.open(self.data, os.O_RDONLY)
        try:
            conn.settimeout(5)
            while not self._stop.is_set():
                request = b""
                while len(request) < BLOCK_REQUEST_SIZE:
                    chunk = conn.recv(BLOCK_REQUEST_SIZE - len(request))
                    if not chunk:
                        return
                    request += chunk
                _magic, _marker, _rest, index, _hash = unpack_block_request_from(request)
                if index == HAVEMAP_INDEX:
                    self.map_requests += 1
                    if self.on_map == "close":
                        return
                    if self.on_map == "lie":
                        conn.sendall(HaveMap(b"\1" * self.cf.block_count).encode())
                        continue
                    if self.on_map == "offer" and time.monotonic() < self.empty_until:
                        self.empty_offers += 1
                        self.offer = []
                        conn.sendall(HaveMap(b"\1" * self.cf.block_count, bytes(self.cf.block_count)).encode())
                        continue
                    if self.on_map == "offer":
                        # Blocks never offered first (as a turn passes on: what this downloader did
                        # not ask for before this map goes to others), then any not asked for.
                        fresh = [i for i in range(self.cf.block_count) if i not in self.offered]
                        rest = [i for i in range(self.cf.block_count) if i not in self.asked]
                        self.offer = (fresh or rest)[: self.offer_size]
                        self.offered.update(self.offer)
                        flags = bytearray(self.cf.block_count)
                        for i in self.offer:
                            flags[i] = 1
                        conn.sendall(HaveMap(b"\1" * self.cf.block_count, bytes(flags)).encode())
                        continue
                if self.on_map == "offer":
                    self.asked.add(index)
                    if index not in self.offer:
                        self.outside.append(index)
                    elif self.asked.issuperset(self.offer):
                        self._note_next_map(conn)
                    time.sleep(self.delay)  # a slow link: the next map falls due while an offer is used
                if index >= self.cf.block_count:
                    conn.sendall(pack_block_response_header(BlockStatus.OUT_OF_RANGE, 0))
                    return
                if index not in self.held:
                    self.not_present += 1
                    conn.sendall(pack_block_response_header(BlockStatus.NOT_PRESENT, 0))
                    continue
                length = self.cf.block_length(index)
                body = os.pread(fd, length, self.cf.block_offset(index))
                conn.sendall(pack_block_response_header(BlockStatus.OK, length) + body)
        finally:
            os.close(fd)

    def _note_next_map(self, conn: socket.socket) -> None:
        """The last block of the offer was asked for: is the next map request already here (unread)?"""
        try:
            waiting = conn.recv(BLOCK_REQUEST_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            waiting = b""
        behind = len(waiting) == BLOCK_REQUEST_SIZE and unpack_block_request_from(waiting)[3] == HAVEMAP_INDEX
        if behind:
            self.map_behind += 1
        else:
            self.map_later += 1


def test_no_status_2_from_peers_with_maps(tmp_path: Path) -> None:
    """A partial peer and a seeder: every block is asked of a peer that holds it."""
    _, cf = make_file(tmp_path, "d.bin", 64 * 4096, 4096)
    half = tmp_path / "half.bin"
    half_store = BlockStore.open_for_fetching(cf, half, check_data(half, cf, whole_file=False))
    seed_store = BlockStore.open_for_seeding(cf, tmp_path / "d.bin")
    data = (tmp_path / "d.bin").read_bytes()
    try:
        for i in range(0, 64, 2):
            half_store.write_block(i, data[i * 4096 : (i + 1) * 4096])
        with real_server(half_store) as partial, real_server(seed_store) as seeder:
            fetcher = fetch(cf, tmp_path / "out", [partial, seeder])
        peers = fetcher.planner.peers.values()
        assert all(p.maps for p in peers)
        assert sum(p.not_present for p in peers) == 0
    finally:
        half_store.close()
        seed_store.close()


@pytest.mark.parametrize("on_map", ["status3", "close"])
def test_a_version_1_server_is_asked_for_a_map_once_then_serves_as_before(tmp_path: Path, on_map: str) -> None:
    _, cf = make_file(tmp_path, "d.bin", 40 * 4096, 4096)
    with V1Server(cf, tmp_path / "d.bin", on_map) as old:
        fetcher = fetch(cf, tmp_path / "out", [old.address])
    (peer,) = fetcher.planner.peers.values()
    assert peer.maps is False and peer.failures == 0
    assert old.map_requests == 1


def test_a_lying_map_costs_requests_not_bytes(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 40 * 4096, 4096)
    seed_store = BlockStore.open_for_seeding(cf, tmp_path / "d.bin")
    try:
        with V1Server(cf, tmp_path / "d.bin", "lie", held=set(range(10))) as liar, real_server(seed_store) as seeder:
            fetch(cf, tmp_path / "out", [liar.address, seeder])
    finally:
        seed_store.close()


def test_blocks_are_asked_for_before_the_map_request_that_replaces_their_offer(tmp_path: Path) -> None:
    """A super-seeder's offer holds until the next map request reaches it (docs/protocol-extensions.md).

    Before, a refresh went out ahead of the blocks chosen from the current offer in the same
    batch, and more were chosen from it while the refresh was on its way: the seeder had
    offered some of them to other downloaders meanwhile, and sent them twice (12 of 256
    blocks in a 1 + 8 swarm on emulated 40 Mbit/s links).
    """
    _, cf = make_file(tmp_path, "d.bin", 36 * 4096, 4096)
    with V1Server(cf, tmp_path / "d.bin", "offer") as seeder:
        fetch(cf, tmp_path / "out", [seeder.address])
    assert seeder.map_requests >= 3  # several offers were used: the refreshes fell due mid-offer
    assert seeder.outside == []


def test_a_used_up_offer_is_asked_again_at_once(tmp_path: Path) -> None:
    """An offer smaller than the pipeline (a first offer names two blocks) is refreshed behind its blocks.

    Before, the fetcher waited for the next idle refresh (0.15 s) once it had the
    offer's blocks: every fetch from a super-seeder idled that long at its start, and
    a 1 MiB fetch on loopback took 0.26 s instead of 0.1 s.
    """
    _, cf = make_file(tmp_path, "d.bin", 40 * 4096, 4096)
    with V1Server(cf, tmp_path / "d.bin", "offer") as seeder:
        seeder.offer_size, seeder.delay = 2, 0.0
        fetch(cf, tmp_path / "out", [seeder.address])
    assert seeder.outside == []
    assert seeder.map_behind >= 19  # 20 offers of 2 blocks; the last one's map may be the fetch's end
    assert seeder.map_later <= 1


def test_an_empty_offer_is_asked_again_less_often_than_a_used_up_one(tmp_path: Path) -> None:
    """An offer naming no block says "wait your turn": asked again after 50 ms, not 20 ms like a used-up one.

    Twelve fetchers waiting for a turn at a seeder would otherwise send it 600 map requests
    a second, each an offer to compute and a reply on its upload.
    """
    _, cf = make_file(tmp_path, "d.bin", 8 * 4096, 4096)
    with V1Server(cf, tmp_path / "d.bin", "offer") as seeder:
        seeder.offer_size, seeder.delay = 2, 0.0
        seeder.empty_until = time.monotonic() + 0.6
        fetch(cf, tmp_path / "out", [seeder.address])
    # About one map per 50 ms over 0.6 s (fewer on a slow machine); 30 at 20 ms.
    assert 1 <= seeder.empty_offers <= 16


def test_a_seeder_whose_offers_stay_empty_still_serves_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another implementation's "no preference" sent as an all-zero offer must not stall the fetch.

    With nothing in flight for EMPTY_OFFER_PATIENCE (shortened here), the offer is ignored and
    the seeder, our only source, is asked for the blocks as if it sent none.
    """
    monkeypatch.setattr(planner_module, "EMPTY_OFFER_PATIENCE", 0.3)
    _, cf = make_file(tmp_path, "d.bin", 8 * 4096, 4096)
    with V1Server(cf, tmp_path / "d.bin", "offer") as seeder:
        seeder.delay = 0.0
        seeder.empty_until = time.monotonic() + 3600.0  # every offer empty, for good
        fetch(cf, tmp_path / "out", [seeder.address])
    assert seeder.empty_offers >= 1


@pytest.mark.skipif(not detect().download_priority, reason="SO_PRIORITY is Linux's, and portable mode does without it")
def test_the_connections_a_fetch_downloads_on_go_first_in_this_hosts_queue(tmp_path: Path) -> None:
    """Their requests and acknowledgements leave before the host's uploads where its queue is pfifo_fast.

    Behind the uploads, a fetcher on a 10 Mbit/s link among 100 Mbit/s peers
    downloaded at half the rate it could (BENCHMARKS.md, WAN).
    """
    _, cf = make_file(tmp_path, "d.bin", 36 * 4096, 4096)
    out = tmp_path / "out"
    store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
    seen: list[int] = []
    try:
        with V1Server(cf, tmp_path / "d.bin", "offer") as seeder:  # slow: 0.05 s a block
            infos = [(*seeder.address, True)]
            fetcher = Fetcher(store, lambda: infos, policy=FAST)
            fetcher.add_peers(infos)
            done = threading.Thread(target=fetcher.run)
            done.start()
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline and done.is_alive():
                for sock in list(fetcher._socks.values()):
                    with contextlib.suppress(OSError):  # closed meanwhile
                        seen.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY))
                time.sleep(0.002)
            done.join(20)
    finally:
        store.close()
    assert seen and set(seen) == {DOWNLOAD_PRIORITY}
    assert sha256_file(out) == cf.file_hash


@pytest.mark.skipif(not hasattr(socket, "SO_PRIORITY"), reason="SO_PRIORITY is Linux's")
def test_portable_mode_leaves_a_download_connection_at_the_default_priority() -> None:
    """The paths macOS and Windows run set nothing; Linux's set the priority pfifo_fast sends first."""
    with socket.socket() as sock:
        prioritize_download(sock, decide({"download_priority": True}, portable=True))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == 0
        prioritize_download(sock, decide({"download_priority": True}, portable=False))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == DOWNLOAD_PRIORITY
