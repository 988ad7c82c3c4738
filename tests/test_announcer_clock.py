"""The announcer's retries on virtual time: the backoff schedule is checked without waiting for it."""

from __future__ import annotations

import itertools
import socket
import threading

import pytest

from cascade.addresses import TrackerAddress
from cascade.backoff import Backoff
from cascade.wire import TrackerCommand
from peer.announcer import DEFAULT_BACKOFF, Announcer
from peer.clock import VirtualClock
from peer.tracker_client import announce, parse_tracker

# No server: the tracker's port on 127.0.0.1 is bound but not listening, so every connect is refused.
pytestmark = pytest.mark.loopback


def test_an_unreachable_tracker_is_retried_on_the_backoff_schedule_in_virtual_time() -> None:
    clock = VirtualClock()
    calls: list[float] = []
    enough = threading.Event()

    def counting(tracker: TrackerAddress, command: TrackerCommand, h: bytes, ip: str, port: int, t: float) -> object:
        if len(calls) < 8:
            calls.append(clock.now())
        else:
            enough.set()
        return announce(tracker, command, h, ip, port, t)

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        tracker = parse_tracker(f"127.0.0.1:{closed.getsockname()[1]}")
        announcer = Announcer(tracker, "127.0.0.1", 1, announce_fn=counting, clock=clock, interval=60)
        announcer.add(bytes(32))
        announcer.start()
        try:
            assert enough.wait(30), calls
            assert announcer.tracker_down and announcer.successes == 0
        finally:
            announcer.stop()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(calls)]
    # 1, 2, 4, 8, 16 s, then the 30 s cap: about a minute of retries, checked in milliseconds.
    assert gaps == [DEFAULT_BACKOFF.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize(
    ("backoff", "failures", "expected"),
    [
        (Backoff(1.0, 2.0, 30.0), 1, 1.0),
        (Backoff(1.0, 2.0, 30.0), 6, 30.0),
        (Backoff(0.2, 2.0, 10.0), 3, 0.8),
        (Backoff(5.0, 2.0, 30.0), 10_000, 30.0),  # no overflow after thousands of failures
    ],
)
def test_backoff_delays(backoff: Backoff, failures: int, expected: float) -> None:
    assert backoff.delay(failures) == pytest.approx(expected)
