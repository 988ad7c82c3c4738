"""``python -m bench.swarm_runs``: its command line refuses what it cannot run, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.swarm_runs import main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fetchers", "0"], "--fetchers must be at least 1, not 0"),
        (["--fetchers", "-3"], "--fetchers must be at least 1, not -3"),
        (["--runs", "0"], "--runs must be at least 1, not 0"),
        (["--size", "0"], "invalid file size '0': it must be at least 1 byte"),
        (["--block-size", "0"], "invalid block size '0': it must be at least 1 byte"),
    ],
)
def test_a_value_it_cannot_run_is_one_usage_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Refused before any file, tracker or peer is made (no traceback, exit code 2).
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--logs", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: {message}"), err
