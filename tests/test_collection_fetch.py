"""The shared-connection path of a collection fetch, beside a peer that lies (in-process servers).

One-block members are fetched over one pipelined connection per peer
(:class:`peer.collection_fetch._FastSmall`); a peer that sends wrong bytes must
cost only its connection: nothing wrong is ever written, and what it held up
goes to an honest peer or back to the regular path.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cascade.collection import parse_collection
from peer.collection_fetch import PARTIAL_DIR, OutFolder, _Bar, _FastSmall, _Job
from peer.collection_local import create_collection, walk_tree
from peer.server import BlockServer
from peer.storage import BlockStore
from tests.hostile import PROTOCOL_BREAKERS, HostileServer

pytestmark = pytest.mark.loopback

SIZE = 100  # every member the same length, so a liar's answer has the length asked for


@pytest.mark.parametrize("behaviour", sorted(PROTOCOL_BREAKERS))
def test_a_lying_peer_costs_its_connection_and_never_a_wrong_byte(tmp_path: Path, behaviour: str) -> None:
    src = tmp_path / "src"
    files = {f"d{i % 3}/f{i:03d}.bin": os.urandom(SIZE) for i in range(60)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    coll = parse_collection(create_collection(src, walk_tree(src), 1 << 20))
    jobs = [_Job(i, m, m.cascade_file()) for i, m in enumerate(coll.members)]
    honest = BlockServer("127.0.0.1", 0)
    stores = [BlockStore.open_for_seeding(j.cf, src / j.member.path) for j in jobs]
    for store in stores:
        honest.add_store(store)
    honest.start()
    liar = HostileServer(behaviour, jobs[0].cf, src / jobs[0].member.path).start()
    out = OutFolder(tmp_path / "out")
    try:
        fast = _FastSmall(out, _Bar(coll.total_length, "out", False), threading.Event(), 0, 8)
        assert all(fast.eligible(j) for j in jobs)
        fast.run(jobs, [(*liar.address, True)])  # the liar alone: nothing it sends is taken
        assert liar.stats.requests > 0 and not any(j.fast for j in jobs)
        # Then side by side with an honest peer: the liar costs at most what it answered.
        fast.run([j for j in jobs if fast.eligible(j)], [(*liar.address, True), (*honest.address, True)])
    finally:
        liar.stop()
        honest.stop()
        for store in stores:
            store.close()
        os.close(out.partial_fd)
        os.close(out.fd)
    done = [j for j in jobs if j.fast]
    # The request each liar's connection died on is left to the regular path; the honest peer did the rest.
    assert len(done) >= len(jobs) - 2
    for j in jobs:
        final = tmp_path / "out" / j.member.path
        if j.fast:
            assert j.error is None and final.read_bytes() == files[j.member.path]
        else:
            assert not final.exists()
    assert not any((tmp_path / "out" / PARTIAL_DIR).iterdir()), "no .part left behind by a finished member"
