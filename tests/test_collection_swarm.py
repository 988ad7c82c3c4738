"""A collection's fetchers share the members they are still downloading (real tracker and peer processes).

The seeder's upload is limited, so the fetchers finish in reasonable time only
if they give each other the blocks they verified: from the ``.part`` of a
member they are still downloading, as single-file fetchers do from theirs.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from cascade.collection import parse_collection
from cascade.wire import BlockStatus, have_map_size, pack_have_map_request
from peer.collection_local import create_collection, walk_tree
from tests.doubles import Swarm
from tests.test_peer_server import read_response

pytestmark = pytest.mark.process

BLOCK = 8 << 10


def test_limited_seeder_collection_fetchers_share_the_members_they_download(swarm: Swarm, tmp_path: Path) -> None:
    src = tmp_path / "set"
    rng = random.Random(13)
    # Four members of 64 blocks in two folders: 2 MiB in all, as in test_swarm's single file.
    files = {f"{'ab'[i % 2]}/m{i}.bin": rng.randbytes(64 * BLOCK - 100 * i) for i in range(4)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    raw = create_collection(src, walk_tree(src), BLOCK)
    coll = parse_collection(raw)
    cascade = tmp_path / "set.cascade"
    cascade.write_bytes(raw)
    seeder = swarm.start(
        "peer", "seed", str(cascade), "--tracker", swarm.tracker, "--listen", "127.0.0.1:0", "--max-upload-rate", "1M"
    )
    seed_port = seeder.wait_listening()
    for m in coll.members:
        swarm.wait_subscribed(m.cascade_file(), seed_port)
    outs = [tmp_path / f"out{i}" for i in range(3)]
    fetchers = [swarm.fetcher(cascade, out, "--seed") for out in outs]
    docs = [proc.wait_for_json() for proc in fetchers]  # they go on seeding after it
    seeder_name = f"127.0.0.1:{seed_port}"
    total = from_seeder = 0
    for doc, out in zip(docs, outs, strict=True):
        assert doc["complete"] is True, doc
        for f in doc["files"]:
            assert (out / f["path"]).read_bytes() == files[f["path"]]
            total += sum(f["sources"].values())
            from_seeder += f["sources"].get(seeder_name, 0)
    assert total == 3 * sum(m.cascade_file().block_count for m in coll.members)
    # Without sharing the seeder would send every block 3 times; with it, a real share comes from the others.
    assert total - from_seeder >= total // 4, docs
    # Done and still serving (--seed), a fetcher sends the plain map: it is no seeder proper, and offers
    # from it would steer the last downloaders away from what they need (docs/protocol-extensions.md).
    for proc in fetchers:
        with socket.create_connection(("127.0.0.1", proc.wait_listening()), timeout=10.0) as sock:
            for m in coll.members:
                cf = m.cascade_file()
                sock.sendall(pack_have_map_request(cf.cascade_hash))
                status, body = read_response(sock)
                assert (status, len(body)) == (BlockStatus.OK, have_map_size(cf.block_count)), m.path
