"""Many connections downloading from one peer at once, from one process (for the seeder's memory).

``python -m bench.load_client PORT CASCADE_HASH_HEX BLOCKS CONNECTIONS SECONDS``

Each connection asks for random blocks with the KEEPOPEN marker, one request in
flight, reading each response into one shared scratch buffer; a connection the
server closes is reopened. Runs SECONDS, then prints one JSON object.
"""

from __future__ import annotations

import json
import random
import selectors
import socket
import sys
import time
from dataclasses import dataclass

from cascade.wire import BLOCK_RESPONSE_HEADER_SIZE, BlockRequest, BlockResponseHeader

SCRATCH = bytearray(1 << 20)


@dataclass
class Conn:
    sock: socket.socket
    header: bytearray
    remaining: int = -1  # body bytes still to read; -1 while reading the header
    blocks: int = 0


def open_conn(sel: selectors.BaseSelector, port: int, request: bytes) -> Conn:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request)
    sock.setblocking(False)
    conn = Conn(sock, bytearray())
    sel.register(sock, selectors.EVENT_READ, conn)
    return conn


USAGE = "usage: python -m bench.load_client PORT CASCADE_HASH_HEX BLOCKS CONNECTIONS SECONDS"


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    try:
        if len(argv) != 5:
            raise ValueError("expected 5 arguments")
        port, hash_hex, blocks, count, seconds = int(argv[0]), argv[1], int(argv[2]), int(argv[3]), float(argv[4])
        cascade_hash = bytes.fromhex(hash_hex)
        if len(cascade_hash) != 32 or blocks < 1 or count < 1 or seconds <= 0:
            raise ValueError("a 64-digit hash, and BLOCKS, CONNECTIONS and SECONDS above 0")
    except ValueError as exc:
        print(f"{USAGE}\nbench.load_client: {exc}", file=sys.stderr)
        return 2
    rng = random.Random(1)
    requests = [BlockRequest(i, cascade_hash, keep_open=True).encode() for i in range(blocks)]
    sel = selectors.DefaultSelector()
    conns = [open_conn(sel, port, rng.choice(requests)) for _ in range(count)]
    served: set[int] = set()
    total_blocks = total_bytes = reopened = errors = 0
    scratch = memoryview(SCRATCH)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=0.1):
            conn: Conn = key.data
            try:
                if conn.remaining < 0:
                    chunk = conn.sock.recv(BLOCK_RESPONSE_HEADER_SIZE - len(conn.header))
                    if not chunk:
                        raise ConnectionResetError("closed")
                    conn.header += chunk
                    if len(conn.header) == BLOCK_RESPONSE_HEADER_SIZE:
                        head = BlockResponseHeader.decode(bytes(conn.header))
                        if head.status != 0:
                            errors += 1
                        conn.remaining = head.length
                else:
                    n = conn.sock.recv_into(scratch[: min(conn.remaining, len(SCRATCH))])
                    if n == 0:
                        raise ConnectionResetError("closed")
                    conn.remaining -= n
                    total_bytes += n
                if conn.remaining == 0:
                    conn.blocks += 1
                    total_blocks += 1
                    served.add(id(conn))
                    conn.header.clear()
                    conn.remaining = -1
                    conn.sock.send(rng.choice(requests))  # 64 bytes into an empty send buffer
            except (ConnectionError, OSError):
                sel.unregister(conn.sock)
                conn.sock.close()
                conns[conns.index(conn)] = open_conn(sel, port, rng.choice(requests))
                reopened += 1
    for conn in conns:
        conn.sock.close()
    print(
        json.dumps(
            {
                "connections": count,
                "blocks": total_blocks,
                "bytes": total_bytes,
                "reopened": reopened,
                "errors": errors,
                "seconds": seconds,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
