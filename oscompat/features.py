"""The probe: which fast paths this OS has, unless ``CASCADE_PORTABLE`` forbids them."""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

ENV_VAR = "CASCADE_PORTABLE"
# select() watches at most 512 sockets per call in CPython on Windows and
# cannot watch a descriptor numbered 1024 or more on Linux: with the select
# fallback, connection caps stay well under both. Chosen for headroom for the
# listener, the wake socket and a few hundred data files; arbitrary otherwise.
SELECT_CONNECTION_CAP = 400
# POSIX select() cannot watch a descriptor numbered FD_SETSIZE (1024 on Linux and macOS) or more.
POSIX_FD_SETSIZE = 1024


@dataclass(frozen=True, slots=True)
class Features:
    """The fast paths to use; every ``False`` has a portable fallback (see the package docstring)."""

    portable: bool  # forced by CASCADE_PORTABLE: every fast path below is off
    epoll: bool  # select.epoll with EPOLLONESHOT/EPOLLEXCLUSIVE; else the selectors module
    select_only: bool  # the selector is select(): connection caps respect FD_SETSIZE
    sendfile: bool  # os.sendfile on a socket; else a bounded read-and-send loop
    positional_io: bool  # os.preadv and os.pwrite; else seek+read/write under a per-file lock
    fallocate: bool  # os.posix_fallocate; else the file is extended with ftruncate
    poll: bool  # select.poll for one socket's writability; else select.select
    defer_accept: bool  # TCP_DEFER_ACCEPT on the tracker's listener
    rename_open: bool  # an open file can be renamed (POSIX); else it is closed, renamed and reopened
    send_backlog: bool  # ioctl SIOCOUTQ tells a socket's unacknowledged bytes (Linux); else unknown
    download_priority: bool  # SO_PRIORITY puts a download's requests and ACKs first in this host's queue (Linux)
    msg_more: int  # socket.MSG_MORE, or 0
    dontwait: int  # socket.MSG_DONTWAIT, or 0 (then sockets are made non-blocking instead)

    def watchable(self, fd: int) -> bool:
        """False for a descriptor the event loop cannot watch (select() on POSIX, numbers >= FD_SETSIZE).

        Servers refuse such a connection like one over the cap; Windows has no
        such limit on the numbers, only on the count (see :meth:`connection_cap`).
        """
        return not self.select_only or sys.platform == "win32" or fd < POSIX_FD_SETSIZE

    def connection_cap(self, wanted: int) -> int:
        """``wanted``, lowered to :data:`SELECT_CONNECTION_CAP` when the selector is select()."""
        return min(wanted, SELECT_CONNECTION_CAP) if self.select_only else wanted

    @property
    def selector_name(self) -> str:
        """Which event loop the servers use, for logs and tests: ``epoll``, ``select`` or the selectors default."""
        if self.epoll:
            return "epoll"
        if self.select_only:
            return "select"
        import selectors

        return selectors.DefaultSelector.__name__.removesuffix("Selector").lower()


def decide(has: Mapping[str, bool], portable: bool, msg_more: int = 0, dontwait: int = 0) -> Features:
    """The features to use, given what the OS ``has`` (names as in :class:`Features`) and the forcing flag."""

    def use(name: str) -> bool:
        return not portable and has.get(name, False)

    return Features(
        portable=portable,
        epoll=use("epoll"),
        select_only=portable or not (has.get("epoll") or has.get("kqueue") or has.get("poll")),
        sendfile=use("sendfile"),
        positional_io=use("positional_io"),
        fallocate=use("fallocate"),
        poll=use("poll"),
        defer_accept=use("defer_accept"),
        rename_open=use("rename_open"),
        send_backlog=use("send_backlog"),
        download_priority=use("download_priority"),
        msg_more=0 if portable else msg_more,
        dontwait=0 if portable else dontwait,
    )


def detect(environ: Mapping[str, str] | None = None) -> Features:
    """Probe this OS (and ``CASCADE_PORTABLE`` in ``environ``, default ``os.environ``)."""
    env = os.environ if environ is None else environ
    portable = env.get(ENV_VAR, "").strip().lower() not in ("", "0", "no", "false", "off")
    has = {
        "epoll": hasattr(select, "epoll") and hasattr(select, "EPOLLONESHOT"),
        "kqueue": hasattr(select, "kqueue"),
        # macOS has select.poll, but it does not work on every descriptor type; Windows lacks it.
        "poll": hasattr(select, "poll") and sys.platform != "darwin",
        # os.sendfile exists on macOS too, but its BSD semantics on non-blocking
        # sockets differ; only Linux's is the path we measured and test.
        "sendfile": hasattr(os, "sendfile") and sys.platform.startswith("linux"),
        "positional_io": hasattr(os, "preadv") and hasattr(os, "pwrite"),
        "fallocate": hasattr(os, "posix_fallocate"),
        "defer_accept": hasattr(socket, "TCP_DEFER_ACCEPT"),
        # Windows refuses to rename a file that Python has open (no FILE_SHARE_DELETE).
        "rename_open": sys.platform != "win32",
        # SIOCOUTQ (termios.TIOCOUTQ) counts a TCP socket's bytes not yet acknowledged on Linux;
        # elsewhere the same number means something else, or does not exist.
        "send_backlog": sys.platform.startswith("linux") and _has_tiocoutq(),
        # SO_PRIORITY sets the priority that Linux's queueing disciplines read; other systems
        # lack the option or give it another meaning.
        "download_priority": sys.platform.startswith("linux") and hasattr(socket, "SO_PRIORITY"),
    }
    return decide(has, portable, getattr(socket, "MSG_MORE", 0), getattr(socket, "MSG_DONTWAIT", 0))


def _has_tiocoutq() -> bool:
    try:
        import termios
    except ImportError:
        return False
    return hasattr(termios, "TIOCOUTQ")


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that ask a command to stop cleanly here.

    SIGINT (Ctrl-C) everywhere; SIGTERM where the OS delivers it (POSIX);
    SIGBREAK (Ctrl-Break) on Windows, where SIGTERM is never sent by others.
    """
    names = ("SIGINT", "SIGBREAK") if sys.platform == "win32" else ("SIGINT", "SIGTERM")
    return tuple(getattr(signal, n) for n in names if hasattr(signal, n))
