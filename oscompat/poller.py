"""One event-loop interface over ``select.epoll`` (Linux) and the ``selectors`` module (elsewhere).

Linux keeps what ``selectors.EpollSelector`` cannot express: one-shot
registrations (a connection fires once, then belongs to one worker until it
is re-armed) and ``EPOLLEXCLUSIVE`` (a new connection wakes one tracker
worker, not all). Elsewhere :class:`SelectorsPoller` uses
``selectors.DefaultSelector`` (kqueue on macOS and the BSDs, select on
Windows), or ``SelectSelector`` when forced: it emulates one-shot by
unregistering a descriptor when it fires, and ignores ``exclusive`` (every
waiting worker wakes; accept on a non-blocking listener keeps that correct).

Thread rule, both kinds: the thread that polls may register, modify and
unregister; another thread may only hand a descriptor back (``register`` or
``modify`` of one that is not registered or has fired), and must then wake
the polling thread when :attr:`Poller.needs_wake` is set, since ``select()``
only sees a new descriptor on its next call.
"""

from __future__ import annotations

import contextlib
import select
import selectors
import threading
from typing import Protocol

from oscompat.features import Features

# Event bits, equal to EPOLLIN/EPOLLOUT (and POLLIN/POLLOUT) on Linux so the
# epoll path passes them through untouched.
IN = 0x001
OUT = 0x004


class Poller(Protocol):
    """Register descriptors for IN/OUT and wait for them; see the module docstring for threads."""

    needs_wake: bool

    def register(self, fd: int, events: int, *, oneshot: bool = False, exclusive: bool = False) -> None: ...

    def modify(self, fd: int, events: int, *, oneshot: bool = False) -> None: ...

    def unregister(self, fd: int) -> None: ...

    def forget(self, fd: int) -> None:
        """Drop ``fd`` before it is closed (a no-op where closing removes it, as with epoll)."""

    def poll(self, timeout: float, max_events: int = -1) -> list[tuple[int, int]]: ...

    def close(self) -> None: ...


class EpollPoller:
    """``select.epoll`` with one-shot and exclusive registrations (Linux)."""

    needs_wake = False

    def __init__(self) -> None:
        self._ep = select.epoll()
        assert select.EPOLLIN == IN and select.EPOLLOUT == OUT
        self.poll = self._ep.poll  # the hot call, without a wrapper frame

    def register(self, fd: int, events: int, *, oneshot: bool = False, exclusive: bool = False) -> None:
        """Raises ``OSError`` (e.g. a closed descriptor)."""
        flags = (select.EPOLLONESHOT if oneshot else 0) | (getattr(select, "EPOLLEXCLUSIVE", 0) if exclusive else 0)
        self._ep.register(fd, events | flags)

    def modify(self, fd: int, events: int, *, oneshot: bool = False) -> None:
        """Raises ``OSError`` or ``ValueError`` (closed meanwhile)."""
        self._ep.modify(fd, events | (select.EPOLLONESHOT if oneshot else 0))

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(fd)

    def forget(self, fd: int) -> None:
        pass  # closing the descriptor removes it from the epoll set

    def close(self) -> None:
        self._ep.close()


class SelectorsPoller:
    """A ``selectors`` selector, with one-shot emulated (macOS, the BSDs, Windows, forced portable mode)."""

    needs_wake = True

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._sel = selector
        self._oneshot: set[int] = set()
        # Registration changes come from workers too; the select call itself runs unlocked.
        self._lock = threading.Lock()

    @staticmethod
    def _mask(events: int) -> int:
        return (selectors.EVENT_READ if events & IN else 0) | (selectors.EVENT_WRITE if events & OUT else 0)

    def register(self, fd: int, events: int, *, oneshot: bool = False, exclusive: bool = False) -> None:
        """Raises ``OSError`` or ``ValueError`` for a bad descriptor, ``KeyError`` if already registered."""
        with self._lock:
            self._sel.register(fd, self._mask(events))
            if oneshot:
                self._oneshot.add(fd)

    def modify(self, fd: int, events: int, *, oneshot: bool = False) -> None:
        """Re-arm ``fd`` (registering it again if it fired as one-shot). Raises ``OSError``/``ValueError``."""
        with self._lock:
            try:
                self._sel.modify(fd, self._mask(events))
            except KeyError:
                self._sel.register(fd, self._mask(events))
            if oneshot:
                self._oneshot.add(fd)
            else:
                self._oneshot.discard(fd)

    def unregister(self, fd: int) -> None:
        with self._lock:
            self._oneshot.discard(fd)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(fd)

    forget = unregister  # select() fails on a closed descriptor: it must leave the set first

    def poll(self, timeout: float, max_events: int = -1) -> list[tuple[int, int]]:
        """Wait up to ``timeout`` seconds; (fd, IN/OUT bits) of every ready descriptor.

        ``max_events`` is ignored: a one-shot descriptor left out would be lost.
        """
        ready = self._sel.select(timeout)
        out: list[tuple[int, int]] = []
        with self._lock:
            for key, mask in ready:
                fd = key.fd
                if self._sel.get_map().get(fd) is not key:
                    continue  # unregistered (or replaced) while we waited
                if fd in self._oneshot:
                    self._oneshot.discard(fd)
                    self._sel.unregister(fd)
                bits = (IN if mask & selectors.EVENT_READ else 0) | (OUT if mask & selectors.EVENT_WRITE else 0)
                out.append((fd, bits))
        return out

    def close(self) -> None:
        self._sel.close()


def make_poller(features: Features) -> Poller:
    """The poller ``features`` ask for; raises ``OSError`` if the OS refuses one."""
    if features.epoll:
        return EpollPoller()
    if features.select_only:
        return SelectorsPoller(selectors.SelectSelector())
    return SelectorsPoller(selectors.DefaultSelector())


def make_selector(features: Features) -> selectors.BaseSelector:
    """A plain ``selectors`` selector for a client's own loop: ``SelectSelector`` when select is what there is."""
    return selectors.SelectSelector() if features.select_only else selectors.DefaultSelector()


def wait_writable(fd: int, timeout_ms: int, features: Features) -> bool:
    """True when ``fd`` (a socket) has room to write within ``timeout_ms``."""
    if features.poll:
        p = select.poll()
        p.register(fd, select.POLLOUT)
        return bool(p.poll(timeout_ms))
    _r, w, _x = select.select([], [fd], [], timeout_ms / 1000)
    return bool(w)
