"""Several trackers in one peer: merging their lists, failing over, backing off, one schedule each.

Pure: the trackers are functions (``TrackerSet.ask``, the announcer's
``announce_fn``) and the clock is a variable.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from cascade.addresses import TrackerAddress
from cascade.errors import CascadeError, ProtocolError, TrackerRefused, TrackerUnreachable
from cascade.wire import PeerRecord, TrackerCommand
from peer.announcer import Announcer, Backoff
from peer.trackers import TrackerSet, all_failed, merge_peers, parse_trackers

pytestmark = pytest.mark.unit

A = TrackerAddress("127.0.0.1", 7001)
B = TrackerAddress("127.0.0.1", 7002, "http://127.0.0.1:7002")
HASH = bytes(32)


def down(t: TrackerAddress) -> TrackerUnreachable:
    return TrackerUnreachable(f"tracker {t} unreachable: Connection refused")


def test_merge_keeps_one_record_per_address_newest_and_good_if_any() -> None:
    a = [PeerRecord("10.0.0.1", 1, 100, False), PeerRecord("10.0.0.2", 2, 50, True)]
    b = [PeerRecord("10.0.0.2", 2, 70, False), PeerRecord("10.0.0.1", 1, 90, True), PeerRecord("10.0.0.3", 3, 1, False)]
    assert merge_peers([a, b]) == (
        PeerRecord("10.0.0.1", 1, 100, True),
        PeerRecord("10.0.0.2", 2, 70, True),
        PeerRecord("10.0.0.3", 3, 1, False),
    )
    assert merge_peers([]) == ()


def test_parse_trackers_keeps_order_and_drops_repeats() -> None:
    assert parse_trackers(["127.0.0.1:7001", "http://127.0.0.1:7002/", "127.0.0.1:7001"]) == (A, B)


def test_all_failed_is_the_single_error_itself_or_one_line_naming_each() -> None:
    only = down(A)
    assert all_failed([(A, only)]) is only
    both = all_failed([(A, down(A)), (B, TrackerRefused(f"tracker {B} refused: no\nway"))])
    assert isinstance(both, TrackerUnreachable)
    assert str(both) == (
        "no tracker answered: tracker 127.0.0.1:7001 unreachable: Connection refused; "
        "tracker http://127.0.0.1:7002 refused: no way"
    )
    refused = all_failed([(A, TrackerRefused("a")), (B, TrackerRefused("b"))])
    assert isinstance(refused, TrackerRefused)


class Trackers:
    """Scripted trackers: each answers its records, or raises its error."""

    def __init__(self) -> None:
        self.answers: dict[TrackerAddress, tuple[PeerRecord, ...] | CascadeError] = {A: (), B: ()}
        self.asked: list[TrackerAddress] = []
        self.lock = threading.Lock()

    def __call__(self, t: TrackerAddress) -> tuple[PeerRecord, ...]:
        with self.lock:
            self.asked.append(t)
        answer = self.answers[t]
        if isinstance(answer, CascadeError):
            raise answer
        return answer


def test_a_dead_tracker_is_backed_off_while_another_answers(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    trackers = Trackers()
    trackers.answers[A] = down(A)
    trackers.answers[B] = (PeerRecord("10.0.0.9", 9, 5, True),)
    s = TrackerSet([A, B], Backoff(initial=1.0, factor=2.0, cap=30.0), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="peer.trackers"):
        assert s.ask(trackers, 5.0) == trackers.answers[B]
        assert sorted(trackers.asked, key=str) == [A, B]
        assert s.live == [B]
        trackers.asked.clear()
        now[0] = 0.5  # within A's first backoff (1 s): only B is asked
        s.ask(trackers, 5.0)
        assert trackers.asked == [B]
        trackers.asked.clear()
        now[0] = 1.0  # A is tried again, fails again: next try after 2 s more
        s.ask(trackers, 5.0)
        assert sorted(trackers.asked, key=str) == [A, B]
        trackers.asked.clear()
        now[0] = 2.5
        s.ask(trackers, 5.0)
        assert trackers.asked == [B]
        trackers.asked.clear()
        now[0] = 3.0
        trackers.answers[A] = (PeerRecord("10.0.0.8", 8, 6, True),)
        assert len(s.ask(trackers, 5.0)) == 2
        assert s.live == [A, B]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "tracker 127.0.0.1:7001 unreachable: Connection refused; asking the other trackers",
        "tracker 127.0.0.1:7001 is back",
    ]
    assert s.answered == {A, B}


def test_when_every_tracker_is_down_all_are_asked_and_the_error_names_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    trackers = Trackers()
    trackers.answers = {A: down(A), B: down(B)}
    s = TrackerSet([A, B], clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="peer.trackers"):
        for _ in range(3):  # backoff or not: with none usable, every tracker is asked
            trackers.asked.clear()
            with pytest.raises(TrackerUnreachable, match=r"^no tracker answered: tracker 127\.0\.0\.1:7001 unr"):
                s.ask(trackers, 5.0)
            assert sorted(trackers.asked, key=str) == [A, B]
            now[0] += 0.1
    assert caplog.records == []  # the caller says it, in one line
    assert s.answered == set()


def test_a_single_tracker_keeps_its_own_error_and_is_never_skipped(caplog: pytest.LogCaptureFixture) -> None:
    trackers = Trackers()
    bad = ProtocolError("tracker 127.0.0.1:7001 sent garbage")
    trackers.answers[A] = bad
    s = TrackerSet([A], clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="peer.trackers"):
        for _ in range(3):
            with pytest.raises(ProtocolError) as info:
                s.ask(trackers, 5.0)
            assert info.value is bad
    assert trackers.asked == [A, A, A]
    assert caplog.records == []


def test_a_hanging_tracker_holds_a_listing_up_only_for_the_grace() -> None:
    release = threading.Event()
    trackers = Trackers()
    trackers.answers[B] = (PeerRecord("10.0.0.9", 9, 5, True),)

    def fn(t: TrackerAddress) -> tuple[PeerRecord, ...]:
        if t == A:
            release.wait(30)  # hangs (bounded) until the test ends
        return trackers(t)

    s = TrackerSet([A, B], clock=lambda: 0.0, late_grace=0.05)
    try:
        assert s.ask(fn, 30.0) == trackers.answers[B]  # returns long before A's 30 s
        assert s.answered == {B}
        trackers.asked.clear()
        s.ask(fn, 30.0)  # A counted as failed: backed off, not waited for again
        assert trackers.asked == [B]
    finally:
        release.set()


def test_the_announcer_keeps_one_schedule_per_tracker(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[TrackerAddress] = []
    a_up = threading.Event()

    def announce_fn(
        t: TrackerAddress, command: TrackerCommand, h: bytes, ip: str, port: int, timeout: float
    ) -> tuple[PeerRecord, ...]:
        calls.append(t)
        if t == A and not a_up.is_set():
            raise down(A)
        return ()

    announcer = Announcer(
        [A, B, A], "127.0.0.1", 1, interval=0.01, backoff=Backoff(initial=0.01, cap=0.02), announce_fn=announce_fn
    )
    try:
        with caplog.at_level(logging.INFO, logger="peer.announcer"):
            announcer.add(HASH)
            announcer.start()
            assert _until(lambda: calls.count(A) >= 3 and calls.count(B) >= 3)
            assert not announcer.tracker_down  # B answers: the peer is announced somewhere
            a_up.set()
            assert _until(lambda: any("is back" in r.getMessage() for r in caplog.records))
            assert announcer.alive
    finally:
        announcer.stop(1.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "tracker 127.0.0.1:7001 unreachable: Connection refused; still serving, retrying with backoff",
        "tracker 127.0.0.1:7001 is back",
    ]


def _until(condition: object, timeout: float = 10.0) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False
