"""One libtorrent peer per process, on 127.0.0.1 unless told otherwise (the BitTorrent baseline).

``mktorrent DATA OUT [TRACKER_URL|-] [PIECE_BYTES]``: a v1 .torrent made by libtorrent itself (v1 so
aria2 can use it too); piece length libtorrent's default unless given.
``seed TORRENT DIR PORT [HOST]``: check DATA in DIR, then print ``lt listening on HOST:PORT`` and seed.
``fetch TORRENT DIR PORT PEERS [HOST [UPLOAD]]``: download, connecting to every peer in PEERS (comma-separated
``PORT`` on 127.0.0.1 or ``IP:PORT``); prints ``started WALLTIME`` once its session is up (the
Python and libtorrent start-up before it is no part of fetching), ``verified WALLTIME`` once every
piece is hash-checked and ``done WALLTIME`` once written out, then keeps seeding to the others until
stopped (SIGTERM), as BitTorrent peers do; UPLOAD (bytes/s, 0 = none) is libtorrent's
``upload_rate_limit``, as ``--max-upload-rate`` is Cascade's.

HOST (default 127.0.0.1) is the address to listen on and connect from: ``bench/wan.py`` runs each
peer in its own network namespace with a private address. DHT, LSD, UPnP, NAT-PMP and uTP are off:
plain TCP to the listed peers only.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from typing import Any

import libtorrent as lt

warnings.filterwarnings("ignore", category=DeprecationWarning)

TIMEOUT = 300.0  # bound on any one run
POLL = 0.005


LOCAL = "127.0.0.1"


def session(port: int, host: str = LOCAL, upload: int = 0) -> Any:
    return lt.session(
        {
            "upload_rate_limit": upload,
            "listen_interfaces": f"{host}:{port}",
            "outgoing_interfaces": host,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_incoming_utp": False,
            "enable_outgoing_utp": False,
            "allow_multiple_connections_per_ip": True,
            "alert_mask": lt.alert.category_t.storage_notification,
        }
    )


def make_torrent(data: str, out: str, tracker: str | None, piece: int = 0) -> None:
    fs = lt.file_storage()
    lt.add_files(fs, data)
    t = lt.create_torrent(fs, piece, flags=lt.create_torrent.v1_only)
    if tracker:
        t.add_tracker(tracker)
    lt.set_piece_hashes(t, os.path.dirname(os.path.abspath(data)))
    with open(out, "wb") as f:
        f.write(lt.bencode(t.generate()))
    print(f"piece_length {t.piece_length()}", flush=True)


def add(ses: Any, torrent: str, save: str) -> Any:
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(torrent)
    params.save_path = save
    return ses.add_torrent(params)


def wait_flushed(ses: Any, deadline: float) -> None:
    while time.monotonic() < deadline:
        if any(isinstance(a, lt.cache_flushed_alert) for a in ses.pop_alerts()):
            return
        ses.wait_for_alert(50)
    raise SystemExit("lt fetch: the disk cache was not flushed in time")


def seed(torrent: str, save: str, port: int, host: str = LOCAL) -> None:
    ses = session(port, host)
    handle = add(ses, torrent, save)
    deadline = time.monotonic() + TIMEOUT
    while not handle.status().is_seeding:
        if time.monotonic() > deadline:
            raise SystemExit("lt seed: data did not check as complete")
        time.sleep(POLL)
    print(f"lt listening on {host}:{ses.listen_port()}", file=sys.stderr, flush=True)
    while time.monotonic() < deadline:
        time.sleep(0.1)


def parse_peers(text: str) -> list[tuple[str, int]]:
    """``PORT`` (on 127.0.0.1) or ``IP:PORT``, comma-separated."""
    peers = []
    for item in filter(None, text.split(",")):
        host, _, port = item.rpartition(":")
        peers.append((host or LOCAL, int(port)))
    return peers


def fetch(torrent: str, save: str, port: int, peers: list[tuple[str, int]], host: str = LOCAL, upload: int = 0) -> None:
    ses = session(port, host, upload)
    print(f"started {time.time():.6f}", flush=True)
    handle = add(ses, torrent, save)
    deadline = time.monotonic() + TIMEOUT
    next_connect = 0.0
    done = False
    while time.monotonic() < deadline:
        now = time.monotonic()
        if not done and now >= next_connect:
            # Peers started together may not listen yet: retry; libtorrent ignores duplicates.
            for p in peers:
                if p != (host, port):
                    handle.connect_peer(p)
            next_connect = now + 0.2
        if not done and handle.status().is_seeding:
            # Every piece passed its hash; count the time until it is written out too.
            print(f"verified {time.time():.6f}", flush=True)
            handle.flush_cache()
            wait_flushed(ses, deadline)
            print(f"done {time.time():.6f}", flush=True)
            done = True
        time.sleep(POLL if not done else 0.05)
    raise SystemExit("lt fetch: timed out")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if argv[:1] == ["mktorrent"] and len(argv) in (3, 4, 5):
        tracker = argv[3] if len(argv) >= 4 and argv[3] != "-" else None
        make_torrent(argv[1], argv[2], tracker, int(argv[4]) if len(argv) == 5 else 0)
    elif argv[:1] == ["seed"] and len(argv) in (4, 5):
        seed(argv[1], argv[2], int(argv[3]), *argv[4:])
    elif argv[:1] == ["fetch"] and len(argv) in (5, 6, 7):
        host = argv[5] if len(argv) >= 6 else LOCAL
        fetch(argv[1], argv[2], int(argv[3]), parse_peers(argv[4]), host, int(argv[6]) if len(argv) == 7 else 0)
    else:
        print(
            "usage: lt_peer mktorrent DATA OUT [TRACKER|-] [PIECE] | seed TORRENT DIR PORT [HOST]"
            " | fetch TORRENT DIR PORT PEERS [HOST [UPLOAD]]",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
