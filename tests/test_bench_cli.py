"""The benches' own command lines: each refuses what it cannot run in one usage line, before it starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import load_client, server_timing, swarm_runs

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
def test_swarm_runs_refuses_a_value_it_cannot_run_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Refused before any file, tracker or peer is made (no traceback, exit code 2).
    with pytest.raises(SystemExit) as exit_:
        swarm_runs.main([*argv, "--logs", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: {message}"), err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "expected 5 arguments"),
        (["1", "ab", "4", "1", "1"], "a 64-digit hash, and BLOCKS, CONNECTIONS and SECONDS above 0"),
        (["x", "ab", "4", "1", "1"], "invalid literal for int() with base 10: 'x'"),
        (["1", "00" * 32, "4", "0", "1"], "a 64-digit hash, and BLOCKS, CONNECTIONS and SECONDS above 0"),
    ],
)
def test_load_client_refuses_bad_arguments_with_its_usage(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_client.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [load_client.USAGE, f"bench.load_client: {message}"]


def test_load_client_help_is_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_client.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(load_client.USAGE)


def test_server_timing_refuses_an_argument_it_does_not_know(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        server_timing.main(["--bogus"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
