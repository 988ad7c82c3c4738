"""The one exception tree of Cascade.

Every error a user can meet is a ``CascadeError``; low-level errors
(``struct.error``, ``OSError``, ``socket.timeout``) are translated into one of
these at a single boundary with ``raise ... from exc``::

    CascadeError
    ├── MetafileError          a .cascade file is malformed (names the file)
    │   └── CollectionError    a collection is malformed or a member path is unsafe
    ├── ProtocolError          the other side broke PROTOCOL.md (says which field)
    ├── BlockHashMismatch      a block's bytes do not match its SHA-256
    ├── DataError              a data file cannot be read, written or is unusable
    │   └── DiskFullError      the disk filled up while writing verified data
    ├── UnreachableError       a tracker or peer cannot be reached
    │   └── TrackerUnreachable
    ├── CascadeTimeout         an operation ran past its deadline
    └── UsageError             a bad command-line value (a size, an address)
"""

from __future__ import annotations


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
    """The disk ran out of space while writing verified data."""


class UnreachableError(CascadeError):
    """A tracker or peer could not be reached."""


class TrackerUnreachable(UnreachableError):
    """The tracker could not be reached or did not answer."""


class CascadeTimeout(CascadeError):
    """An operation did not finish before its deadline."""


class UsageError(CascadeError):
    """A command-line value is invalid (a size, an address, a combination of flags)."""
