"""The block server's side of have maps (docs/protocol-extensions.md), over ``socket.socketpair()``.

Requests are written out byte for byte from the extension's document, not
with the codec, and the replies are checked bit by bit. The same harness as
test_peer_server_socketpair.py: one in-process server on a virtual clock.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from peer.localdata import check_data
from peer.server import SPARE_AFTER, SPARE_HOLD
from peer.storage import BlockStore
from peer.superseed import SuperSeedPolicy
from tests.test_peer_server import Sample, block, make_sample, read_response, req
from tests.test_peer_server_socketpair import Harness, closed, harness, still_open

pytestmark = pytest.mark.socketpair

LAST = b"\xff" * 8  # block number 2^64-1


def have_req(cascade_hash: bytes, keep: bool = True, marker: bytes = b"HAVEMAP1", index: bytes = LAST) -> bytes:
    return b"CASCADE1" + (b"KEEPOPEN" if keep else bytes(8)) + marker + index + cascade_hash


def bits(flags: list[int]) -> bytes:
    """One flag per block -> bitmap, MSB first, written out independently of the codec."""
    out = bytearray((len(flags) + 7) // 8)
    for i, f in enumerate(flags):
        if f:
            out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    # 13 blocks of 1 KiB, the last 5 bytes: a map of 2 bytes with 3 spare bits.
    return make_sample(tmp_path_factory.mktemp("have"), "have.bin", 12 * 1024 + 5, 1024, seed=4)


@pytest.fixture
def complete(sample: Sample) -> Iterator[BlockStore]:
    store = BlockStore.open_for_seeding(sample.cf, sample.data_path)
    try:
        yield store
    finally:
        store.close()


# Never enough askers to super-seed: these tests look at the held map alone.
PLAIN = SuperSeedPolicy(min_askers=1 << 30)
# The offers of a busy upload: an in-process server's upload idles, and an idle one offers everything.
BUSY = SuperSeedPolicy(spare_upload=False)


@pytest.fixture
def served(complete: BlockStore) -> Iterator[Harness]:
    with harness(complete, superseed=PLAIN) as h:
        yield h


def test_complete_store_answers_every_bit_set_and_keeps_the_connection(served: Harness, sample: Sample) -> None:
    sock = served.connect()
    sock.sendall(have_req(sample.cf.cascade_hash))
    assert read_response(sock) == (0, bits([1] * 13))
    assert still_open(sock)
    assert served.server.have_maps_sent == 1


def test_without_keepopen_the_map_is_sent_and_the_connection_closed(served: Harness, sample: Sample) -> None:
    status, body, was_closed = served.request(have_req(sample.cf.cascade_hash, keep=False))
    assert (status, body, was_closed) == (0, bits([1] * 13), True)


def test_partial_store_answers_what_it_holds_and_learns_new_blocks(tmp_path: Path, sample: Sample) -> None:
    """A fetcher that serves while it downloads: the map follows its verified blocks."""
    out = tmp_path / "partial.bin"
    store = BlockStore.open_for_fetching(sample.cf, out, check_data(out, sample.cf, whole_file=False))
    try:
        with harness(store) as h:
            sock = h.connect()
            sock.sendall(have_req(sample.cf.cascade_hash))
            assert read_response(sock) == (0, bits([0] * 13))
            for i in (0, 7, 12):
                assert store.write_block(i, block(sample.data, sample.cf, i))
            sock.sendall(have_req(sample.cf.cascade_hash))
            expected = [1 if i in (0, 7, 12) else 0 for i in range(13)]
            assert read_response(sock) == (0, bits(expected))
    finally:
        store.close()


def test_store_with_bad_blocks_leaves_them_out(tmp_path: Path) -> None:
    s = make_sample(tmp_path, "bad.bin", 10 * 512, 512, seed=8)
    data = bytearray(s.data)
    data[3 * 512] ^= 1
    s.data_path.write_bytes(data)
    store = BlockStore.open_for_seeding(s.cf, s.data_path, check_data(s.data_path, s.cf))
    try:
        with harness(store) as h:
            status, body, _ = h.request(have_req(s.cf.cascade_hash, keep=False))
            assert (status, body) == (0, bits([0 if i == 3 else 1 for i in range(10)]))
    finally:
        store.close()


@pytest.mark.parametrize(
    "marker",
    [b"HAVEMAP1", b"HAVEMAP2", b"\xde\xad\xbe\xef" * 2],
    ids=["marker", "other-version", "garbage"],
)
def test_marker_with_a_real_block_number_is_a_normal_request(served: Harness, sample: Sample, marker: bytes) -> None:
    """A client that garbles reserved bytes, even into our marker, still gets the block it asked for."""
    sock = served.connect()
    sock.sendall(have_req(sample.cf.cascade_hash, marker=marker, index=(5).to_bytes(8, "big")))
    assert read_response(sock) == (0, block(sample.data, sample.cf, 5))
    assert still_open(sock)


@pytest.mark.parametrize("marker", [bytes(8), b"HAVEMAP2", b"havemap1"], ids=["zeros", "other-version", "lowercase"])
def test_the_magic_block_number_without_the_marker_is_status_3_as_today(
    served: Harness, sample: Sample, marker: bytes
) -> None:
    status, body, was_closed = served.request(have_req(sample.cf.cascade_hash, marker=marker))
    assert (status, was_closed) == (3, True)
    assert b"too large" in body


def test_have_map_for_an_unknown_file_is_status_1(served: Harness) -> None:
    status, _, was_closed = served.request(have_req(b"\x07" * 32))
    assert (status, was_closed) == (1, True)


def test_have_maps_pipelined_with_block_requests_are_answered_in_order(served: Harness, sample: Sample) -> None:
    cf = sample.cf
    h = cf.cascade_hash
    sock = served.connect()
    sock.sendall(req(2, h, True) + have_req(h) + req(12, h, True) + have_req(h) + have_req(h) + req(0, h, True))
    assert read_response(sock) == (0, block(sample.data, cf, 2))
    assert read_response(sock) == (0, bits([1] * 13))
    assert read_response(sock) == (0, block(sample.data, cf, 12))
    assert read_response(sock) == (0, bits([1] * 13))
    assert read_response(sock) == (0, bits([1] * 13))
    assert read_response(sock) == (0, block(sample.data, cf, 0))
    assert still_open(sock)


def test_a_map_asked_without_keepopen_in_a_pipeline_ends_it(served: Harness, sample: Sample) -> None:
    h = sample.cf.cascade_hash
    sock = served.connect()
    sock.sendall(req(1, h, True) + have_req(h, keep=False) + req(3, h, True))
    assert read_response(sock) == (0, block(sample.data, sample.cf, 1))
    assert read_response(sock) == (0, bits([1] * 13))
    assert closed(sock)


def test_have_map_request_in_7_byte_pieces(served: Harness, sample: Sample) -> None:
    raw = have_req(sample.cf.cascade_hash)
    sock = served.connect()
    for i in range(0, len(raw), 7):
        sock.sendall(raw[i : i + 7])
    assert read_response(sock) == (0, bits([1] * 13))


def test_empty_file_has_an_empty_map(tmp_path: Path) -> None:
    s = make_sample(tmp_path, "empty.bin", 0, 1024)
    store = BlockStore.open_for_seeding(s.cf, s.data_path)
    try:
        with harness(store) as h:
            status, body, _ = h.request(have_req(s.cf.cascade_hash, keep=False))
            assert (status, body) == (0, b"")
    finally:
        store.close()


# --- super-seeding: a complete peer offers each downloader different blocks ----------


def offered(body: bytes, count: int) -> set[int]:
    """The offer half of a two-bitmap reply, as block numbers (the held half must be all ones)."""
    size = (count + 7) // 8
    assert len(body) == 2 * size, "expected held + offer"
    assert body[:size] == bits([1] * count)
    return {i for i in range(count) if body[size + i // 8] & (0x80 >> (i % 8))}


def ask(sock: socket.socket, cascade_hash: bytes) -> bytes:
    sock.sendall(have_req(cascade_hash))
    status, body = read_response(sock)
    assert status == 0
    return body


def test_a_seeder_offers_each_downloader_different_blocks_and_old_clients_still_get_everything(
    complete: BlockStore, sample: Sample
) -> None:
    h = sample.cf.cascade_hash
    with harness(complete, superseed=BUSY) as served:
        a, b, c = served.connect(), served.connect(), served.connect()
        assert offered(ask(a, h), 13) == {0, 1}  # alone so far, its rate not known: min_offer
        for s in (b, c):
            offered(ask(s, h), 13)
        # One refresh later, small offers (nothing sent to them yet: min_offer), none overlapping.
        offers = [offered(ask(s, h), 13) for s in (a, b, c)]
        assert all(len(o) == 2 for o in offers)
        assert not offers[0] & offers[1] and not offers[1] & offers[2] and not offers[0] & offers[2]
        # An old client (and a downloader asking outside its offer) gets every block it asks for.
        for i in range(13):
            status, body, _ = served.request(req(i, h))
            assert (status, body) == (0, block(sample.data, sample.cf, i))


def test_blocks_just_sent_leave_the_offers(complete: BlockStore, sample: Sample) -> None:
    cf = sample.cf
    with harness(complete, superseed=BUSY) as h:
        a, b = h.connect(), h.connect()
        ask(a, cf.cascade_hash)
        ask(b, cf.cascade_hash)
        first = offered(ask(a, cf.cascade_hash), 13)
        theirs = offered(ask(b, cf.cascade_hash), 13)
        for i in first:  # a takes its offer
            a.sendall(req(i, cf.cascade_hash, True))
            assert read_response(a)[0] == 0
        again = offered(ask(a, cf.cascade_hash), 13)
        assert again and not again & (first | theirs), "neither blocks still spreading nor b's claims"


def test_a_downloader_that_finished_offers_nothing(tmp_path: Path, sample: Sample) -> None:
    """Only a seeder proper super-seeds: a finished downloader's blocks are in the swarm already."""
    out = tmp_path / "done.bin"
    store = BlockStore.open_for_fetching(sample.cf, out, check_data(out, sample.cf, whole_file=False))
    try:
        for i in range(13):
            store.write_block(i, block(sample.data, sample.cf, i))
        assert store.complete
        with harness(store) as h:
            a, b = h.connect(), h.connect()
            assert ask(a, sample.cf.cascade_hash) == bits([1] * 13)
            assert ask(b, sample.cf.cascade_hash) == bits([1] * 13)
    finally:
        store.close()


def take(sock: socket.socket, big: Sample, i: int) -> None:
    """Ask for block ``i`` of ``big`` on ``sock`` and check the block that comes back."""
    sock.sendall(req(i, big.cf.cascade_hash, True))
    assert read_response(sock) == (0, block(big.data, big.cf, i))


@contextmanager
def after_a_busy_second(tmp_path: Path, askers: int) -> Iterator[tuple[Harness, Sample, list[socket.socket]]]:
    """A seeder of 8 blocks of 1 MiB whose best rate is one (virtual) second in which a client took them all.

    Yields ``askers`` more connections, each of which asked for a map before that second.
    """
    big = make_sample(tmp_path, "big.bin", 8 << 20, 1 << 20, seed=9)
    store = BlockStore.open_for_seeding(big.cf, big.data_path)
    try:
        with harness(store) as served:
            socks = [served.connect() for _ in range(askers)]
            for s in socks:
                ask(s, big.cf.cascade_hash)
            x = served.connect()
            for i in range(8):
                take(x, big, i)
            served.clock.advance(1.0)
            yield served, big, socks
    finally:
        store.close()


def test_a_seeder_sending_below_its_best_rate_for_long_offers_every_block(tmp_path: Path) -> None:
    """A fast seeder with slow downloaders idles if it sends each block once: spare upload offers all.

    The server compares what left it in the last second with the best it sent lately
    (virtual seconds here). An upload at its best keeps the small, disjoint offers; one
    far below it for SPARE_AFTER seconds offers everything to downloaders that take
    their offers (b never does: it holds what it needs).
    """
    with after_a_busy_second(tmp_path, 2) as (served, big, (a, b)):
        h = big.cf.cascade_hash
        busy = [offered(ask(s, h), 8) for s in (a, b)]
        assert all(0 < len(o) < 8 for o in busy) and not busy[0] & busy[1], busy
        offer, seconds = busy[0], 0
        while offer != set(range(8)) and seconds < 10:  # a takes a block of each offer, far below the best
            take(a, big, min(offer))
            served.clock.advance(1.0)
            seconds += 1
            offer = offered(ask(a, h), 8)
            assert len(offered(ask(b, h), 8)) < 8
        if served.server.features.send_backlog:
            assert offer == set(range(8)) and seconds >= SPARE_AFTER
        else:  # no way to ask the kernel what it holds (off Linux, CASCADE_PORTABLE): never
            assert offer != set(range(8))


def test_spare_upload_that_returns_soon_after_its_hold_is_held_twice_as_long(tmp_path: Path) -> None:
    """Each return to small offers costs SPARE_AFTER seconds of a half-idle upload: the next hold doubles.

    The same seeder as above, one block a second to ``a`` for 40 virtual seconds. Its
    first spell of spare upload lasts SPARE_HOLD; the small offers then run its upload
    low again, and the spell that follows SPARE_AFTER seconds later lasts twice as long.
    """
    with after_a_busy_second(tmp_path, 1) as (served, big, (a,)):
        if not served.server.features.send_backlog:
            pytest.skip("no way to ask the kernel what a socket holds (off Linux, CASCADE_PORTABLE)")
        h = big.cf.cascade_hash
        everything: list[bool] = []  # per second: a was offered every block
        offer = offered(ask(a, h), 8)
        for _ in range(40):
            take(a, big, min(offer))
            served.clock.advance(1.0)
            offer = offered(ask(a, h), 8)
            everything.append(offer == set(range(8)))
    spells = [len(run) for run in "".join("1" if e else "0" for e in everything).split("0") if run]
    assert spells[:2] == [SPARE_HOLD, 2 * SPARE_HOLD], spells
