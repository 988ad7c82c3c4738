"""Pure parts of the one-line errors: the JSON boundary, the block-size check, the OSError
translator, the command boundary's exit codes and the exception tree's drawing."""

from __future__ import annotations

import argparse
import errno
import os
import re
from pathlib import Path

import pytest

from cascade.command import EXIT_OK, EXIT_USAGE, OneLineErrorParser, run_command
from cascade.errors import (
    CascadeError,
    DataError,
    DiskFullError,
    Interrupted,
    ProtocolError,
    TrackerUnreachable,
    UsageError,
    from_os_error,
)
from peer.cascade_command import check_block_size
from peer.http_client import parse_json

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"[" * 60_000, "nested too deeply"), (b'{"a": ' * 60_000, "nested too deeply"), (b"{", "Expecting")],
)
def test_parse_json_turns_anything_into_one_protocol_error(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason) as info:
        parse_json(body)
    assert "\n" not in str(info.value)


def test_parse_json_passes_json_through() -> None:
    assert parse_json(b'{"peers": [[[1]]]}') == {"peers": [[[1]]]}


@pytest.mark.parametrize(
    ("length", "block_size"),
    [(0, 1), (5000, 64), (64 << 10, 64), (10 << 30, 1 << 20), (1000, 3), (3 << 20, 1024), (1 << 39, 1 << 20)],
)
def test_sensible_block_sizes_pass(length: int, block_size: int) -> None:
    check_block_size(length, block_size)


@pytest.mark.parametrize(
    ("length", "block_size", "blocks", "suggested"),
    [
        (6 << 20, 3, "2,097,152 blocks", "64KiB"),  # the 64 MiB .cascade
        (128 << 10, 3, "43,691 blocks", "256KiB"),
        (2 << 20, 1000, "2,098 blocks", "64KiB"),
        (2 << 40, 1 << 20, "2,097,152 blocks", "32MiB"),
    ],
)
def test_absurd_block_sizes_are_refused_with_the_numbers(
    length: int, block_size: int, blocks: str, suggested: str
) -> None:
    with pytest.raises(UsageError) as info:
        check_block_size(length, block_size)
    message = str(info.value)
    assert blocks in message and f"--block-size {suggested}" in message and "--force" in message


# --- the one translator from OSError (cascade.errors.from_os_error) ----------------------------


@pytest.mark.parametrize(
    ("code", "cls", "message"),
    [
        (errno.ENOSPC, DiskFullError, "/d/f.part: disk full: cannot write block 3"),
        (errno.EDQUOT, DiskFullError, "/d/f.part: disk full: cannot write block 3"),
        (errno.EACCES, DataError, f"/d/f.part: cannot write block 3: {os.strerror(errno.EACCES)}"),
        (errno.EPERM, DataError, f"/d/f.part: cannot write block 3: {os.strerror(errno.EPERM)}"),
        (errno.ENOENT, DataError, f"/d/f.part: cannot write block 3: {os.strerror(errno.ENOENT)}"),
        (errno.EISDIR, DataError, f"/d/f.part: cannot write block 3: {os.strerror(errno.EISDIR)}"),
        (errno.EROFS, DataError, f"/d/f.part: cannot write block 3: {os.strerror(errno.EROFS)}"),
        (errno.EIO, DataError, f"/d/f.part: cannot write block 3: {os.strerror(errno.EIO)}"),
    ],
)
def test_from_os_error_table(code: int, cls: type[DataError], message: str) -> None:
    error = from_os_error(OSError(code, os.strerror(code), "/elsewhere"), Path("/d/f.part"), "write block 3")
    assert type(error) is cls and str(error) == message
    assert "\n" not in str(error)


def test_from_os_error_names_the_error_s_own_file_when_given_none() -> None:
    error = from_os_error(PermissionError(errno.EACCES, "Permission denied", "/x/y"), None, "open it")
    assert str(error) == "/x/y: cannot open it: Permission denied"
    assert str(from_os_error(OSError("odd"), None, "open it")) == "cannot open it: odd"


# --- the one command boundary (cascade.command.run_command) --------------------------------------


def _parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="x")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("go")
    return parser


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (None, 0, None),
        (UsageError("bad --size"), 2, "x go: error: bad --size"),
        (DataError("f: cannot read: Permission denied"), 1, "x go: error: f: cannot read: Permission denied"),
        (TrackerUnreachable("tracker t unreachable"), 1, "x go: error: tracker t unreachable"),
        (PermissionError(errno.EACCES, "Permission denied", "f"), 1, "x go: error: f: Permission denied"),
        (KeyboardInterrupt(), 130, "x: interrupted"),
        (Interrupted(), 130, "x: interrupted"),
    ],
)
def test_run_command_exit_codes(
    raised: BaseException | None, code: int, line: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(args: argparse.Namespace) -> int:
        if raised is not None:
            raise raised
        return EXIT_OK

    assert run_command("x", _parser(), ["go"], run) == code
    assert capsys.readouterr().err.splitlines() == ([line] if line else [])


def test_run_command_usage_and_server_stop(capsys: pytest.CaptureFixture[str]) -> None:
    def stop(args: argparse.Namespace) -> int:
        raise Interrupted

    assert run_command("x", _parser(), ["nope"], stop) == EXIT_USAGE
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert run_command("x", _parser(), ["go"], stop, interrupted=EXIT_OK) == EXIT_OK  # a server stopped
    assert capsys.readouterr().err == ""


def test_every_project_error_is_in_the_drawing() -> None:
    import cascade.errors

    drawn = cascade.errors.__doc__ or ""
    classes = [v for v in vars(cascade.errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert all(issubclass(c, CascadeError) for c in classes)
    assert len(classes) >= 19
    undrawn = {c.__name__ for c in classes if not re.search(rf"(── |^    ){c.__name__}\b", drawn, re.MULTILINE)}
    assert undrawn == set()
