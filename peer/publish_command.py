"""``cascade publish``: upload a ``.cascade`` to a tracker's HTTP API and print the URL to share.

A tracker started with ``--http-port`` stores uploaded files under their
cascade hash and serves them at ``http://HOST:PORT/cascades/HASH.cascade``;
``peer fetch URL`` downloads one back. The HTTP itself lives in
:mod:`peer.http_client`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cascade.metafile import default_data_path
from peer.http_client import upload_cascade


def cmd_publish(args: argparse.Namespace) -> int:
    """Upload ``args.cascade``; raises what :func:`upload_cascade` raises."""
    path = Path(args.cascade)
    name = args.name if args.name is not None else default_data_path(path).name
    token = args.token if args.token is not None else os.environ.get("CASCADE_API_TOKEN")
    published = upload_cascade(path, args.tracker, token, name or None)
    how = "uploaded" if published.new else "already on the tracker"
    print(f"cascade publish: {how}, cascade hash {published.cascade_hash.hex()}", file=sys.stderr, flush=True)
    print(published.url, flush=True)
    return 0


def register_publish(sub: Any) -> None:
    p = sub.add_parser(
        "publish",
        help="upload a .cascade to a tracker's HTTP API and print the URL to share",
        description="Upload FILE.cascade to a tracker run with --http-port and print the URL to share. "
        "`peer fetch URL` downloads the .cascade, checks it against the hash in the URL, and fetches the data.",
    )
    p.add_argument("cascade", metavar="FILE.cascade")
    p.add_argument("--tracker", required=True, metavar="http://HOST:PORT", help="the tracker's HTTP address")
    p.add_argument("--token", metavar="T", help="the tracker's --api-token (default: $CASCADE_API_TOKEN, if set)")
    p.add_argument("--name", metavar="NAME", help="the data file name to show (default: FILE)")
    p.set_defaults(run=cmd_publish)
