"""opentracker's side of the tracker case: the client of ``bench/tracker_bench.py``, over HTTP.

opentracker speaks the BitTorrent tracker protocol, not Cascade's, so "the same
client" is the equivalent one: N threads in one process, each request a new TCP
connection (SO_LINGER 0, as tracker_bench does), one HTTP/1.0
``GET /announce?info_hash=..&port=P&left=0&compact=1&numwant=50``, read to EOF.
The swarm holds ``--peers`` announcing ports, filled before timing, and a reply
carries up to 50 peers, as a Cascade list reply does by default.

``python -m bench.http_announce_bench --port PORT [--threads 4] [--seconds 3] [--peers 100]``
prints one JSON object: req_per_s, p50_ms, p99_ms, errors.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from bench.tracker_bench import client, exchange, run_threads, summary

INFO_HASH = bytes(range(20))  # whitelisted by the caller


def request_bytes(port: int) -> bytes:
    ih = "".join(f"%{b:02X}" for b in INFO_HASH)
    peer_id = f"-BN0001-{port:012d}"
    return (
        f"GET /announce?info_hash={ih}&peer_id={peer_id}&port={port}&uploaded=0&downloaded=0&left=0"
        f"&compact=1&numwant=50 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
    ).encode()


def one_request(addr: tuple[str, int], request: bytes, timeout: float) -> bool:
    got = exchange(addr, request, timeout)
    return got.startswith(b"HTTP/1.") and b" 200 " in got[:16] and b"5:peers" in got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--peers", type=int, default=100)
    args = p.parse_args(argv)
    addr = ("127.0.0.1", args.port)
    requests = [request_bytes(10000 + i) for i in range(args.peers)]
    for r in requests:  # fill the swarm
        one_request(addr, r, 5.0)
    lat: list[list[float]] = [[] for _ in range(args.threads)]
    errs = [[0] for _ in range(args.threads)]
    stop_at = time.monotonic() + args.seconds
    budget, lock = [-1], threading.Lock()  # no request budget: run for --seconds
    threads = [
        threading.Thread(
            target=client,
            args=(addr, requests[i:] + requests[:i], stop_at, budget, lock, lat[i], errs[i], 5.0, one_request),
        )
        for i in range(args.threads)
    ]
    elapsed = run_threads(threads)
    print(json.dumps({**summary(lat, errs, elapsed), "threads": args.threads, "peers": args.peers}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
