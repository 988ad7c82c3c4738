"""What the operating system offers the servers and the storage, probed in one place.

Why a package of its own: ``tracker/`` and ``peer/`` both need the same probe
and the same event-loop and file fallbacks, yet may not import each other, and
``cascade/`` must stay pure (no ``os`` file I/O, no ``select``/``socket``). A
small layer beside ``cascade/`` and below both processes holds them once;
duplicating it in each package would let the two drift apart, and a pure
"decision" in ``cascade/`` with the probing left in each server would still
duplicate the probe. Nothing here imports ``cascade``, ``peer`` or ``tracker``.

``CASCADE_PORTABLE=1`` in the environment (read only by :func:`detect`)
forces the paths a macOS or Windows user runs, so Linux CI exercises them:
``selectors.SelectSelector``, no ``sendfile``, ``pwrite``, ``preadv``,
``posix_fallocate``, ``MSG_MORE``, ``MSG_DONTWAIT``, ``EPOLLEXCLUSIVE`` or
``TCP_DEFER_ACCEPT``.
"""

from oscompat.features import Features, detect, stop_signals

__all__ = ["Features", "detect", "stop_signals"]
