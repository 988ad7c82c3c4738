"""Retry delays as a value: every retry loop of the project asks one :class:`Backoff`.

Pure arithmetic: the caller passes the failure count and, for jitter, its own
seeded ``random.Random`` (no global random, no clock).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Wait ``initial`` seconds after the first failure, ``factor`` times longer after each next one, at most ``cap``.

    ``jitter`` spreads each delay at random over ``[1 - jitter, 1 + jitter]``
    times its value (after the cap), so that many clients that failed together
    do not retry together.
    """

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.0

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after ``failures`` consecutive failures (``failures >= 1``); jittered only with ``rng``."""
        try:
            d = min(self.cap, self.initial * self.factor ** max(0, failures - 1))
        except OverflowError:  # thousands of failures: long past the cap
            d = self.cap
        if self.jitter and rng is not None:
            d *= rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return d
