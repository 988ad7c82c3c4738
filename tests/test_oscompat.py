"""The OS probe's decisions and the positional-file fallback, as values and on tmp_path files."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from cascade.metafile import default_data_path, has_cascade_suffix
from oscompat.features import SELECT_CONNECTION_CAP, Features, decide, detect, stop_signals
from oscompat.fileio import PositionalFile, reserve

pytestmark = pytest.mark.unit

LINUX = {
    "epoll": True,
    "poll": True,
    "sendfile": True,
    "positional_io": True,
    "fallocate": True,
    "defer_accept": True,
    "send_backlog": True,
    "download_priority": True,
}
MACOS = {"kqueue": True, "positional_io": True}
WINDOWS: dict[str, bool] = {}


def test_linux_keeps_every_fast_path() -> None:
    f = decide(LINUX, portable=False, msg_more=0x8000, dontwait=0x40)
    assert f.epoll and f.sendfile and f.positional_io and f.fallocate and f.poll and f.defer_accept
    assert f.send_backlog and f.download_priority
    assert not f.select_only and not f.portable
    assert (f.msg_more, f.dontwait) == (0x8000, 0x40)
    assert f.selector_name == "epoll"
    assert f.connection_cap(5000) == 5000


def test_forced_portable_turns_every_fast_path_off() -> None:
    f = decide(LINUX, portable=True, msg_more=0x8000, dontwait=0x40)
    assert f == Features(
        portable=True,
        epoll=False,
        select_only=True,
        sendfile=False,
        positional_io=False,
        fallocate=False,
        poll=False,
        defer_accept=False,
        rename_open=False,
        send_backlog=False,
        download_priority=False,
        msg_more=0,
        dontwait=0,
    )
    assert f.selector_name == "select"
    assert f.connection_cap(5000) == SELECT_CONNECTION_CAP
    assert f.connection_cap(10) == 10


def test_macos_uses_kqueue_without_a_select_cap() -> None:
    f = decide(MACOS, portable=False)
    assert not f.epoll and not f.select_only and not f.sendfile and not f.fallocate and f.positional_io
    assert f.connection_cap(5000) == 5000


def test_windows_is_select_only_and_capped() -> None:
    f = decide(WINDOWS, portable=False)
    assert f.select_only and not (f.epoll or f.sendfile or f.positional_io or f.fallocate or f.poll)
    assert f.connection_cap(5000) == SELECT_CONNECTION_CAP < 512  # CPython's FD_SETSIZE on Windows


@pytest.mark.parametrize(("value", "portable"), [("1", True), ("yes", True), ("", False), ("0", False)])
def test_the_environment_variable_forces_portable(value: str, portable: bool) -> None:
    assert detect({"CASCADE_PORTABLE": value}).portable is portable
    assert detect({}).portable is False


def test_stop_signals_include_ctrl_c() -> None:
    sigs = stop_signals()
    assert signal.SIGINT in sigs and len(set(sigs)) == len(sigs)


@pytest.mark.parametrize("portable", [False, True])
def test_positional_reads_and_writes_agree_with_the_file(tmp_path: Path, portable: bool) -> None:
    features = detect({"CASCADE_PORTABLE": "1" if portable else ""})
    path = tmp_path / "f.bin"
    with open(path, "w+b", buffering=0) as f:
        reserve(f.fileno(), path, 10_000, features)
        assert path.stat().st_size == 10_000
        pf = PositionalFile(f.fileno(), features, writable=True)
        assert pf.native is not portable
        pf.write_all(b"abc" * 1000, 7000)
        pf.write_all(memoryview(b"xyz"), 0)
        buf = bytearray(5000)
        assert pf.readinto(memoryview(buf), 6000) == 4000  # short only at end of file
        assert bytes(buf[:4000]) == bytes(1000) + b"abc" * 1000
    assert path.read_bytes()[:3] == b"xyz"


def test_cascade_names_compare_as_the_os_compares_them() -> None:
    assert has_cascade_suffix("a.CASCADE", caseless=True) and not has_cascade_suffix("a.CASCADE", caseless=False)
    assert has_cascade_suffix("a.cascade", caseless=False) and not has_cascade_suffix("a.cascades", caseless=True)
    assert default_data_path("dir/a.cascade").name == "a"
