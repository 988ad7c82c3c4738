"""The Redis store's outage logic on its own: one log line per change, a circuit breaker on a fake clock."""

from __future__ import annotations

import logging

import pytest

from tracker.redis_store import PROBE_INTERVAL, Health
from tracker.store import StoreUnavailable

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_while_down_one_probe_per_interval_and_one_line_per_change(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    health = Health("redis://127.0.0.1:1/0", clock)
    health.check()  # up: always allowed
    with caplog.at_level(logging.WARNING, logger="tracker.redis_store"):
        for _ in range(3):
            assert isinstance(health.failed(ConnectionError("refused")), StoreUnavailable)
        with pytest.raises(StoreUnavailable):
            health.check()  # inside the interval: fail at once, no Redis call
        clock.now += PROBE_INTERVAL
        health.check()  # this caller may try Redis
        with pytest.raises(StoreUnavailable):
            health.check()  # but only this one
        health.ok()
        health.ok()
        health.check()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "unavailable" in messages[0] and "refused" in messages[0]
    assert "is back" in messages[1]
