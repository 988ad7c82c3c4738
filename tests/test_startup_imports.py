"""A single file's ``peer fetch`` imports no collection code before it starts.

Every fetcher of a swarm pays for its imports at start-up, all of them at once on
a small machine: on the emulated LAN each millisecond a fetcher's start saves is
worth about 8 ms of a 16-fetcher swarm on 2 cores (BENCHMARKS.md). The collection
code (``cascade.collection``, ``peer.collection_local``) and the hashing pool
(``concurrent.futures``) are imported only when a collection is read, or a
resumed file is checked. Each case runs in a fresh interpreter: this one has
imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parent.parent
LAZY = ("cascade.collection", "peer.collection_local", "peer.collection_fetch", "concurrent.futures")

# What `peer fetch FILE.cascade` imports and runs before its first connection: its
# command module, then the metafile read.
PROBE = """
import json, sys
from peer import cli, fetch_command
from peer.metafiles import read_metafile
read_metafile(sys.argv[1], keep_files=True)
print(json.dumps(sorted(m for m in sys.modules if m in {lazy!r})))
"""


def imported_after_reading(metafile: Path) -> list[str]:
    code = PROBE.format(lazy=set(LAZY))
    out = subprocess.run(
        [sys.executable, "-c", code, str(metafile)], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    found: list[str] = json.loads(out.stdout)
    return found


def test_a_single_file_fetch_imports_no_collection_code() -> None:
    assert imported_after_reading(REPO / "sample_data" / "poem.txt.cascade") == []


def test_a_collection_imports_it_when_read(tmp_path: Path) -> None:
    from cascade.collection import Member, serialize_collection

    member = Member("poem.txt", (REPO / "sample_data" / "poem.txt.cascade").read_bytes())
    coll = tmp_path / "set.cascade"
    coll.write_bytes(serialize_collection([member]))
    assert "cascade.collection" in imported_after_reading(coll)
