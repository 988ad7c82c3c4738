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

from cascade.errors import CascadeError, MetafileError, UnreachableError, UsageError
from cascade.metafile import default_data_path
from peer.http_client import Published, upload_cascade


def cmd_publish(args: argparse.Namespace) -> int:
    """Upload ``args.cascade`` to every ``--tracker``; raises what :func:`upload_cascade` raises.

    With several trackers it succeeds when any one took the file: one URL per
    tracker that did (the first is the one to share), one warning line per
    tracker that did not. When none did, one error line names each failure.
    """
    path = Path(args.cascade)
    name = args.name if args.name is not None else default_data_path(path).name
    token = args.token if args.token is not None else os.environ.get("CASCADE_API_TOKEN")
    trackers = list(dict.fromkeys(args.tracker))
    if len(trackers) == 1:
        _print(upload_cascade(path, trackers[0], token, name or None))
        return 0
    failures: list[CascadeError] = []
    published = 0
    for tracker in trackers:
        try:
            result = upload_cascade(path, tracker, token, name or None)
        except (UsageError, MetafileError):  # the same for every tracker: no use trying the others
            raise
        except CascadeError as exc:
            failures.append(exc)
            continue
        published += 1
        _print(result)
    if not published:
        reasons = "; ".join(" ".join(str(f).split()) for f in failures)
        raise UnreachableError(f"no tracker took the file: {reasons}")
    for failure in failures:
        print(f"cascade publish: warning: {' '.join(str(failure).split())}", file=sys.stderr, flush=True)
    return 0


def _print(published: Published) -> None:
    how = "uploaded" if published.new else "already on the tracker"
    kind = "collection hash" if published.collection else "cascade hash"
    print(f"cascade publish: {how}, {kind} {published.cascade_hash.hex()}", file=sys.stderr, flush=True)
    print(published.url, flush=True)


def register_publish(sub: Any) -> None:
    p = sub.add_parser(
        "publish",
        help="upload a .cascade to a tracker's HTTP API and print the URL to share",
        description="Upload FILE.cascade to a tracker run with --http-port and print the URL to share. "
        "`peer fetch URL` downloads the .cascade, checks it against the hash in the URL, and fetches the data.",
    )
    p.add_argument("cascade", metavar="FILE.cascade")
    p.add_argument(
        "--tracker",
        required=True,
        action="append",
        metavar="http://HOST:PORT",
        help="the tracker's HTTP address; give it again to upload to several (one URL printed for each)",
    )
    p.add_argument("--token", metavar="T", help="the tracker's --api-token (default: $CASCADE_API_TOKEN, if set)")
    p.add_argument("--name", metavar="NAME", help="the data file name to show (default: FILE)")
    p.set_defaults(run=cmd_publish)
