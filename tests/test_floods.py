"""The floods of issue 9 sections 3 and 4 at a smaller size (section 7); full size in ``bench/faults.py``.

- Dead peers: one honest seeder listed among 2,000 peers that are gone (most
  refuse the connection, 20 let it time out). The fetch must not starve: it
  completes before its stall timeout fires.
- Connections: 600 idle and 50 slowloris connections held open against a
  block server with its default limits; real block requests on new
  connections must still be answered.

Servers run in this process on 127.0.0.1, with the real :class:`Fetcher` and
:class:`BlockServer`.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.errors import CascadeError
from cascade.wire import BLOCK_MAGIC, BlockResponse
from peer.fetcher import Fetcher, FetchPolicy
from peer.localdata import check_data
from peer.server import BlockServer, BlockServerConfig
from peer.storage import BlockStore
from tests.doubles import make_file, sha256_file
from tests.hostile import black_holes

pytestmark = pytest.mark.loopback

TIMEOUT = 5.0  # seconds a real request may wait for its answer: far above what loopback needs


def test_two_thousand_dead_peers_do_not_starve_a_fetch(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 1 << 20, 64 << 10, seed=31)
    seed_store = BlockStore.open_for_seeding(cf, tmp_path / "d.bin")
    honest = BlockServer("127.0.0.1", 0, BlockServerConfig(max_workers=2))
    honest.add_store(seed_store)
    out = tmp_path / "out.bin"
    rng = random.Random(31)
    # Port 1 on addresses all over 127.0.0.0/8: nothing listens there, the connection is refused.
    refused = {(f"127.{rng.randrange(1, 255)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", 1) for _ in range(4000)}
    with black_holes(20) as holes:
        peers = [(ip, port, True) for ip, port in [*holes, *sorted(refused)[:1980]]]
        rng.shuffle(peers)
        honest.start()
        peers.append((*honest.address, True))
        store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
        try:
            # The stall timeout is the fetcher's own policy: no verified block for 3 s is a failed fetch.
            fetcher = Fetcher(store, lambda: peers, policy=FetchPolicy(stall_timeout=3.0))
            fetcher.add_peers(peers)
            result = fetcher.run()
        finally:
            store.close()
            honest.stop()
            seed_store.close()
    assert result.complete
    assert sha256_file(out) == cf.file_hash


@contextlib.contextmanager
def connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        yield socks
    finally:
        for s in socks:
            s.close()


def ask(port: int, index: int, cascade_hash: bytes) -> BlockResponse | None:
    """One plain request on a new connection; the whole reply, or None if refused or unanswered."""
    request = BLOCK_MAGIC + bytes(16) + index.to_bytes(8, "big") + cascade_hash
    got = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(request)
            for _ in range(1000):  # bounded; each pass reads at least one byte or ends
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
    except OSError:
        return None
    try:
        return BlockResponse.decode(bytes(got))
    except CascadeError:  # cut short, or nothing at all
        return None


def test_idle_and_slowloris_connections_do_not_lock_out_real_requests(tmp_path: Path) -> None:
    _, cf = make_file(tmp_path, "d.bin", 64 << 10, 4096, seed=32)
    data = (tmp_path / "d.bin").read_bytes()
    store = BlockStore.open_for_seeding(cf, tmp_path / "d.bin")
    server = BlockServer("127.0.0.1", 0)  # the default limits, as `peer seed` runs
    server.add_store(store)
    server.start()
    try:
        port = server.address[1]
        with connections(port, 600), connections(port, 50) as slow:
            for s in slow:
                s.sendall(BLOCK_MAGIC[:3])  # a request begun and never finished
            answers = [ask(port, i, cf.cascade_hash) for i in (0, 5, 15)]
    finally:
        server.stop()
        store.close()
    for i, reply in zip((0, 5, 15), answers, strict=True):
        assert reply == BlockResponse(0, data[i * 4096 : (i + 1) * 4096]), f"block {i} was not served"
