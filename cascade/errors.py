"""The one exception tree of Cascade, and the one translator from ``OSError``.

Every error a user can meet is a ``CascadeError``; low-level errors
(``struct.error``, ``OSError``, ``socket.timeout``) are translated into one of
these at a single boundary with ``raise ... from exc`` (a file's ``OSError``
by :func:`from_os_error`)::

    CascadeError
    ├── MetafileError          a .cascade file is malformed (names the file)
    │   └── CollectionError    a collection is malformed or a member path is unsafe
    ├── ProtocolError          the other side broke PROTOCOL.md (says which field)
    ├── BlockHashMismatch      a block's bytes do not match its SHA-256
    ├── DataError              a data file cannot be read, written or is unusable
    │   └── DiskFullError      the disk filled up while writing
    ├── UnreachableError       a tracker or peer cannot be reached
    │   └── TrackerUnreachable
    ├── CascadeTimeout         an operation ran past its deadline
    ├── UsageError             a bad command-line value (a size, an address)
    ├── StartError             a server cannot start: its port is taken, its store unreachable
    ├── Interrupted            SIGINT or SIGTERM arrived: the command stops cleanly
    │
    │   a peer or `cascade` was answered with a refusal:
    ├── TrackerRefused         the tracker refused an announce (status or HTTP code in the message)
    ├── PublishRefused         the tracker's HTTP API refused an upload or a download
    │
    │   inside the tracker (its front ends turn these into a status or an HTTP code):
    ├── BadRequest             a request holds a malformed value (hash, address, port, name, size)
    ├── AnnounceRefused        an announce is refused: hash not allowed, tracker full (has .status)
    ├── StoreFull              storing another .cascade file would pass the size cap
    └── StoreUnavailable       the store's backing service (Redis) cannot be reached right now
"""

from __future__ import annotations

import errno
import os


class CascadeError(Exception):
    """Root of every error Cascade raises on purpose."""


class MetafileError(CascadeError):
    """A ``.cascade`` file is malformed; the message names the file and the fault."""


class CollectionError(MetafileError):
    """A collection file is malformed, or a member path is unsafe (docs/collection-format.md).

    A subclass of :class:`MetafileError` so that code which refuses a bad
    ``.cascade`` with one line refuses a bad collection the same way.
    """


class ProtocolError(CascadeError):
    """The other side sent bytes that break PROTOCOL.md; the message says which field."""


class BlockHashMismatch(CascadeError):
    """A block's bytes do not hash to the value in the ``.cascade`` file."""


class DataError(CascadeError):
    """A data file cannot be read or written, or holds something unexpected."""


class DiskFullError(DataError):
    """The disk ran out of space (or the user's quota) while writing."""


class UnreachableError(CascadeError):
    """A tracker or peer could not be reached."""


class TrackerUnreachable(UnreachableError):
    """The tracker could not be reached or did not answer."""


class CascadeTimeout(CascadeError):
    """An operation did not finish before its deadline."""


class UsageError(CascadeError):
    """A command-line value is invalid (a size, an address, a combination of flags)."""


class StartError(CascadeError):
    """A server cannot start: its address is in use or not allowed, its store cannot be reached."""


class Interrupted(CascadeError):
    """SIGINT or SIGTERM arrived (raised by ``peer.common.StopSignal.check``).

    A command boundary catches it before any other :class:`CascadeError`: it
    is a request to stop, not a failure to report.
    """


class TrackerRefused(CascadeError):
    """The tracker answered with an error status (for example, a hash not on its allow list)."""


class PublishRefused(CascadeError):
    """The tracker answered an upload or a download with an error status."""


class BadRequest(CascadeError):
    """A request to the tracker holds a malformed value: a hash, an address, a port, a file name, a size.

    The binary front end answers it with status 1, the HTTP front end with 400.
    """


class AnnounceRefused(CascadeError):
    """The tracker refuses an announce: a hash not on the allow list, or no room left.

    ``status`` is the tracker-reply status the binary front end sends.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class StoreFull(CascadeError):
    """Storing another file would pass the store's total size cap."""


class StoreUnavailable(CascadeError):
    """The store's backing service (Redis) cannot be reached right now; try again later."""


# --- the translator from OSError ---------------------------------------------------

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_reason(exc: OSError) -> str:
    """The reason an ``OSError`` gives, as the system words it ("Permission denied"), else its text."""
    return exc.strerror or str(exc) or type(exc).__name__


def from_os_error(exc: OSError, path: str | os.PathLike[str] | None, doing: str) -> DataError:
    """The one-line :class:`DataError` for a file ``OSError`` met while ``doing`` something with ``path``.

    ``doing`` is a phrase after "cannot": ``"open the data file"``,
    ``"save the downloaded .cascade file"``. The message is
    ``"PATH: cannot DOING: REASON"``, and for a full disk or quota
    ``"PATH: disk full: cannot DOING"`` as a :class:`DiskFullError`. ``path``
    defaults to the error's own file name; with neither, the message starts
    at "cannot". Pure: it returns the error, the caller raises it ``from exc``.
    """
    where = os.fspath(path) if path is not None else exc.filename
    prefix = f"{os.fsdecode(where)}: " if where is not None else ""
    if exc.errno in _DISK_FULL:
        return DiskFullError(f"{prefix}disk full: cannot {doing}")
    return DataError(f"{prefix}cannot {doing}: {os_reason(exc)}")
