"""The .cascade files of another implementation (../shared/vectors) against its expected.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cascade.metafile import read_cascade


def load(vectors: Path) -> dict[str, dict[str, Any]]:
    expected: dict[str, dict[str, Any]] = json.loads((vectors / "expected.json").read_text())
    assert expected, "expected.json lists no vectors"
    return expected


@pytest.mark.unit
def test_vectors_parse(shared_vectors: Path) -> None:
    for name, want in load(shared_vectors).items():
        cf = read_cascade(shared_vectors / name)
        got = {
            "data_length": cf.data_length,
            "block_size": cf.block_size,
            "block_count": cf.block_count,
            "last_block_length": cf.last_block_length,
            "cascade_hash": cf.cascade_hash.hex(),
            "file_hash": cf.file_hash.hex(),
            "first_block_hash": cf.block_hash(0).hex(),
            "last_block_hash": cf.block_hash(cf.block_count - 1).hex(),
        }
        assert {k: got[k] for k in want} == want, name


@pytest.mark.process
def test_info_json_matches_expected(shared_vectors: Path) -> None:
    for name, want in load(shared_vectors).items():
        proc = subprocess.run(
            [sys.executable, "-m", "peer.cascade_command", "info", "--json", str(shared_vectors / name)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        info = json.loads(proc.stdout)
        # Every key expected.json gives must be in our output with the same value.
        assert {k: info.get(k) for k in want} == want, name
        assert info["data_file"] == name.removesuffix(".cascade")
