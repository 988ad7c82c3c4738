"""The raw Python ceiling: two processes moving one file over loopback.

``serve FILE``: listen on 127.0.0.1, accept one connection, ``socket.sendfile`` the file.
``fetch PORT OUT SIZE``: ``recv_into`` 1 MiB pieces, ``hashlib.sha256`` each, ``os.pwrite`` it;
prints ``{"bytes": N, "seconds": S}`` timed from connect to the last write.

This is the least any Python peer must do per byte (issue 5), with no protocol at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

PIECE = 1 << 20
TIMEOUT = 60.0


def serve(path: str) -> None:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.settimeout(TIMEOUT)
        print(f"raw listening on 127.0.0.1:{lsock.getsockname()[1]}", file=sys.stderr, flush=True)
        conn, _ = lsock.accept()
        with conn, open(path, "rb") as f:
            conn.settimeout(TIMEOUT)
            conn.sendfile(f)


def fetch(port: int, out: str, size: int) -> None:
    buf = bytearray(PIECE)
    mv = memoryview(buf)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            off = 0
            while off < size:
                want = min(PIECE, size - off)
                got = 0
                while got < want:
                    n = sock.recv_into(mv[got:want])
                    if n == 0:
                        raise SystemExit(f"raw fetch: server closed after {off + got} of {size} bytes")
                    got += n
                hashlib.sha256(mv[:got]).digest()
                os.pwrite(fd, mv[:got], off)
                off += got
    finally:
        os.close(fd)
    print(json.dumps({"bytes": size, "seconds": time.perf_counter() - t0}), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(argv[1])
    elif len(argv) == 4 and argv[0] == "fetch":
        fetch(int(argv[1]), argv[2], int(argv[3]))
    else:
        print("usage: raw_ceiling serve FILE | fetch PORT OUT SIZE", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
