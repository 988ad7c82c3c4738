"""Hostile block servers, one per way a peer can lie or stall (issue 9, section 7).

Each :class:`HostileServer` listens on 127.0.0.1 (port 0), reads 64-byte
block requests and answers every one the way its *behaviour* says. The table
``BEHAVIOURS`` is shared by ``tests/test_hostile_peers.py`` and
``bench/faults.py``. The milder misbehaviours (a server that closes after
each response, answers once per connection, rejects ``KEEPOPEN``) live in
:mod:`tests.doubles`.
"""

from __future__ import annotations

import random
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cascade.errors import CascadeError
from cascade.metafile import CascadeFile
from cascade.wire import BLOCK_REQUEST_SIZE, BlockRequest, BlockResponseHeader, PeerList, PeerRecord
from peer.fetcher import Fetcher, FetchPolicy, FetchResult, Progress
from peer.localdata import check_data
from peer.storage import BlockStore
from tests.doubles import LoopbackServer, honest_seeder

# How a behaviour answers one request: (conn, index, the block's right bytes, stop event,
# seconds between bytes for the trickling one).
# It returns False to answer nothing more on this connection (requests are then
# read and dropped until the client closes).
Answer = Callable[[socket.socket, int, bytes, threading.Event, float], bool]


def _header(length: int) -> bytes:
    return BlockResponseHeader(0, length).encode()


def _wrong_bytes(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    conn.sendall(_header(len(body)) + bytes(b ^ 0x5A for b in body))
    return True


def _length_2_63(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    conn.sendall(_header(2**63) + body)
    return True


def _short_length(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    conn.sendall(_header(len(body) - 1) + body[:-1])
    return True


def _long_length(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    conn.sendall(_header(len(body) + 1) + body + b"!")
    return True


def _half_then_silence(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    conn.sendall(_header(len(body)) + body[: len(body) // 2])
    return False


def _never_answer(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    return False


def _garbage(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    # Seeded, so a failure reproduces; 0xEE is no status PROTOCOL.md defines.
    conn.sendall(b"\xee" + random.Random(index).randbytes(4095))
    return True


def _tracker_reply(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    # What a tracker answers (status 0, a peer list): a peer confused about which protocol it speaks.
    conn.sendall(PeerList(tuple(PeerRecord("127.0.0.1", 6881 + i, 0, True) for i in range(20))).encode())
    return True


def _one_byte_a_second(conn: socket.socket, index: int, body: bytes, stop: threading.Event, pace: float) -> bool:
    # The right answer, one byte per ``pace`` seconds: with a pace below the reader's
    # timeout, every recv succeeds and no read ever times out.
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP)
    for b in _header(len(body)) + body:
        conn.sendall(bytes([b]))
        # Waiting on the socket rather than a clock: a client that closes is seen at once.
        if poller.poll(pace * 1000) or stop.is_set():
            return False
    return True


BEHAVIOURS: dict[str, Answer] = {
    "wrong bytes": _wrong_bytes,
    "length 2^63": _length_2_63,
    "short length": _short_length,
    "long length": _long_length,
    "half a block then silence": _half_then_silence,
    "accept and never answer": _never_answer,
    "garbage": _garbage,
    "tracker-style reply": _tracker_reply,
    "one byte a second": _one_byte_a_second,
}
# Behaviours that break PROTOCOL.md in the bytes they send: the fetcher can tell and bans them.
PROTOCOL_BREAKERS = frozenset(
    {"wrong bytes", "length 2^63", "short length", "long length", "garbage", "tracker-style reply"}
)


@dataclass
class HostileStats:
    """What a hostile server saw; updated by its threads (ints only, read after stop)."""

    connections: int = 0
    requests: int = 0
    # Connections the client closed (EOF or reset) while the server was still running,
    # and when the first one was (time.monotonic()).
    closed_by_client: int = 0
    first_close: float | None = None


class HostileServer(LoopbackServer):
    """A block server on 127.0.0.1 that answers every request with ``BEHAVIOURS[behaviour]``."""

    def __init__(self, behaviour: str, cf: CascadeFile, data_path: Path, pace: float = 1.0) -> None:
        super().__init__()
        self.answer = BEHAVIOURS[behaviour]
        self.pace = pace
        self.cf = cf
        self.data_path = data_path
        self.stats = HostileStats()
        self._threads: list[threading.Thread] = []

    def stop(self) -> None:
        """Close the listener and every connection; join the threads (bounded)."""
        super().stop()
        for t in self._threads:
            t.join(2)

    def _accepted(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.append(conn)
            self.stats.connections += 1
        t = threading.Thread(target=self._connection, args=(conn,), daemon=True)
        self._threads.append(t)
        t.start()

    def _serve(self, conn: socket.socket) -> None:
        with open(self.data_path, "rb") as data, conn:
            buf = b""
            answering = True
            try:
                while not self._stop.is_set():
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                    while len(buf) >= BLOCK_REQUEST_SIZE:
                        raw, buf = buf[:BLOCK_REQUEST_SIZE], buf[BLOCK_REQUEST_SIZE:]
                        self.stats.requests += 1
                        index = BlockRequest.decode(raw).index
                        if index >= self.cf.block_count:
                            return
                        if answering:
                            data.seek(self.cf.block_offset(index))
                            body = data.read(self.cf.block_length(index))
                            answering = self.answer(conn, index, body, self._stop, self.pace)
            except (OSError, CascadeError):
                pass
            if not self._stop.is_set():
                self.stats.closed_by_client += 1
                if self.stats.first_close is None:
                    self.stats.first_close = time.monotonic()


@dataclass
class Outcome:
    """One fetch beside a hostile server: the result, and what the hostile server saw."""

    result: FetchResult
    hostile: HostileServer
    hostile_name: str
    # The fetcher closed a connection to the hostile server while blocks were still missing
    # (not only when it shut everything down at the end).
    dropped_during_fetch: bool


def fetch_beside(
    behaviour: str,
    data: Path,
    cf: CascadeFile,
    out: Path,
    policy: FetchPolicy,
    honest_rate: int | None,
    pace: float = 1.0,
) -> Outcome:
    """Fetch ``cf`` into ``out`` from one ``behaviour`` server and one honest seeder of ``data``.

    ``pace`` is the trickling server's seconds per byte. Both servers run in
    this process on 127.0.0.1 and are stopped before this returns. Raises
    what :meth:`Fetcher.run` raises when the fetch fails.
    """
    with honest_seeder(cf, data, max_workers=2, upload_rate=honest_rate) as honest:
        hostile = HostileServer(behaviour, cf, data, pace).start()
        try:
            store = BlockStore.open_for_fetching(cf, out, check_data(out, cf))
            try:
                # The hostile peer first, so it is asked before the honest one has delivered everything.
                peers = [(*hostile.address, True), (*honest.address, True)]
                fetcher = Fetcher(store, lambda: peers, policy=policy)
                fetcher.add_peers(peers)
                # The last moment the fetch was seen still missing blocks (ticks come every 0.1 s).
                last_incomplete = [time.monotonic()]

                def on_tick(p: Progress) -> None:
                    if p.verified_bytes < p.total_bytes:
                        last_incomplete[0] = time.monotonic()

                result = fetcher.run(on_tick=on_tick)
            finally:
                store.close()
        finally:
            hostile.stop()
    host, port = hostile.address
    first_close = hostile.stats.first_close
    dropped = first_close is not None and first_close < last_incomplete[0]
    return Outcome(result, hostile, f"{host}:{port}", dropped)
