"""The time as a value: a clock that both reads the time and waits.

The fetcher, the announcer and the whole-file hasher read the time and wait
only through a :class:`Clock`, so a test passes a :class:`VirtualClock` and
advances time instead of sleeping (as trio's ``MockClock``). Socket timeouts
stay real: the kernel knows no other time.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Waitable(Protocol):
    """What a clock can wait on: a ``threading.Event``."""

    def wait(self, timeout: float | None = None) -> bool: ...

    def is_set(self) -> bool: ...


class Clock(Protocol):
    """Reads the time (seconds, monotonic) and waits for an event or a timeout."""

    def now(self) -> float:
        """The time now."""
        ...

    def wait(self, event: Waitable, timeout: float | None) -> bool:
        """Wait until ``event`` is set or ``timeout`` seconds passed; True when it is set."""
        ...


class RealClock:
    """``time.monotonic`` and real waits: the default everywhere."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, event: Waitable, timeout: float | None) -> bool:
        return event.wait(timeout)


REAL_CLOCK = RealClock()


class VirtualClock:
    """Time that moves only when told to, or when someone waits with a timeout.

    ``wait`` with a timeout returns at once, ``timeout`` seconds later in
    virtual time (earlier if the event is set): a loop that waits for time to
    pass runs through minutes of it in milliseconds. ``wait`` without a
    timeout waits for the event for real. Thread-safe.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move the time on by ``seconds``."""
        with self._lock:
            self._now += max(0.0, seconds)

    def wait(self, event: Waitable, timeout: float | None) -> bool:
        if event.is_set():
            return True
        if timeout is None:
            return event.wait()
        self.advance(timeout)
        return event.is_set()
