"""A whole-process upload or download limit: one token bucket shared by every connection.

Senders reserve bytes before they write them (receivers, after they read them). A reservation that the bucket
cannot cover yet puts the caller to sleep until its turn, so the total rate
holds however many connections share the bucket, and callers are served in
the order they asked. The clock and the sleep are injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cascade.units import parse_size

# A quarter of a second of traffic may go out at once after a quiet spell:
# enough to keep sendfile slices large, small enough that the rate holds over
# any window a user would measure.
BURST_SECONDS = 0.25
MIN_BURST = 64 << 10


def parse_rate(text: str | None, what: str = "rate") -> int | None:
    """A ``--max-*-rate`` value (``5M``, ``500K/s``) as bytes per second; ``None`` or 0 means no limit.

    Raises :class:`UsageError` for a malformed value.
    """
    if text is None:
        return None
    rate = parse_size(text.removesuffix("/s"), what)
    return rate or None


class TokenBucket:
    """``rate`` bytes per second, with a burst of ``BURST_SECONDS`` of traffic."""

    def __init__(
        self,
        rate: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = max(MIN_BURST, int(rate * BURST_SECONDS))
        self._clock = clock
        self._stopped = threading.Event()
        # ``sleep`` returns True when waiting was cut short by ``close``.
        self._sleep = sleep or self._stopped.wait
        self._lock = threading.Lock()
        self._tokens = 0.0  # start empty: a limit is a limit from the first byte
        self._last = clock()

    def acquire(self, n: int) -> bool:
        """Take ``n`` bytes from the bucket, sleeping until they are covered.

        Returns False (at once) after :meth:`close`, so senders stop promptly.
        """
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        if debt <= 0:
            return not self._stopped.is_set()
        return not self._sleep(debt / self.rate) and not self._stopped.is_set()

    def close(self) -> None:
        """Wake every sleeper; later calls to :meth:`acquire` return False."""
        self._stopped.set()
