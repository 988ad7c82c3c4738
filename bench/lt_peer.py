"""One libtorrent peer per process, on 127.0.0.1 only (the BitTorrent baseline).

``mktorrent DATA OUT [TRACKER_URL]``: a v1 .torrent made by libtorrent itself (v1 so aria2 can use it too).
``seed TORRENT DIR PORT``: check DATA in DIR, then print ``lt listening on 127.0.0.1:PORT`` and seed.
``fetch TORRENT DIR PORT PEER_PORT,...``: download, connecting to every listed port on 127.0.0.1;
prints ``done WALLTIME`` once every piece is downloaded and hash-checked, then keeps seeding to the
others until stopped (SIGTERM), as BitTorrent peers do.

DHT, LSD, UPnP, NAT-PMP and uTP are off: TCP over loopback, nothing leaves the machine.
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


def session(port: int) -> Any:
    return lt.session(
        {
            "listen_interfaces": f"127.0.0.1:{port}",
            "outgoing_interfaces": "127.0.0.1",
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


def make_torrent(data: str, out: str, tracker: str | None) -> None:
    fs = lt.file_storage()
    lt.add_files(fs, data)
    t = lt.create_torrent(fs, 0, flags=lt.create_torrent.v1_only)
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


def seed(torrent: str, save: str, port: int) -> None:
    ses = session(port)
    handle = add(ses, torrent, save)
    deadline = time.monotonic() + TIMEOUT
    while not handle.status().is_seeding:
        if time.monotonic() > deadline:
            raise SystemExit("lt seed: data did not check as complete")
        time.sleep(POLL)
    print(f"lt listening on 127.0.0.1:{ses.listen_port()}", file=sys.stderr, flush=True)
    while time.monotonic() < deadline:
        time.sleep(0.1)


def fetch(torrent: str, save: str, port: int, peers: list[int]) -> None:
    ses = session(port)
    handle = add(ses, torrent, save)
    deadline = time.monotonic() + TIMEOUT
    next_connect = 0.0
    done = False
    while time.monotonic() < deadline:
        now = time.monotonic()
        if not done and now >= next_connect:
            # Peers started together may not listen yet: retry; libtorrent ignores duplicates.
            for p in peers:
                if p != port:
                    handle.connect_peer(("127.0.0.1", p))
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
    if argv[:1] == ["mktorrent"] and len(argv) in (3, 4):
        make_torrent(argv[1], argv[2], argv[3] if len(argv) == 4 else None)
    elif argv[:1] == ["seed"] and len(argv) == 4:
        seed(argv[1], argv[2], int(argv[3]))
    elif argv[:1] == ["fetch"] and len(argv) == 5:
        fetch(argv[1], argv[2], int(argv[3]), [int(p) for p in argv[4].split(",") if p])
    else:
        print(
            "usage: lt_peer mktorrent DATA OUT [TRACKER] | seed TORRENT DIR PORT | fetch TORRENT DIR PORT PEERS",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
