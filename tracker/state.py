"""``--state``: the swarms in an SQLite file, written by a background thread.

A request never waits on the disk: the registry only notes what changed (a
dict assignment under its lock), and :class:`StateStore`'s writer thread takes
those changes every ``interval`` seconds and writes them in one transaction.
On shutdown :meth:`StateStore.close` writes the last changes. At start-up
:func:`load_state` reads the file back, so last-seen times survive a restart.

Schema (one row per peer)::

    peers(cascade_hash BLOB, peer BLOB  -- 4 bytes IPv4 + 2 bytes port
          last_seen REAL, good INTEGER, PRIMARY KEY (cascade_hash, peer))
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

from cascade.errors import DataError
from tracker.swarms import SwarmRegistry

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    cascade_hash BLOB NOT NULL,
    peer BLOB NOT NULL,
    last_seen REAL NOT NULL,  -- UNIX seconds
    good INTEGER NOT NULL,
    PRIMARY KEY (cascade_hash, peer)
) WITHOUT ROWID;
"""

_UPSERT = (
    "INSERT INTO peers (cascade_hash, peer, last_seen, good) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (cascade_hash, peer) DO UPDATE SET last_seen = excluded.last_seen, good = excluded.good"
)
_DELETE = "DELETE FROM peers WHERE cascade_hash = ? AND peer = ?"

# Changes kept while the file cannot be written; past this many, drop them and
# rewrite the whole file once it works again (arbitrary; ~100 bytes each).
_MAX_PENDING = 1_000_000

Changes = dict[tuple[bytes, bytes], tuple[float, bool] | None]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


def load_state(path: str | os.PathLike[str], registry: SwarmRegistry) -> int:
    """Create or open the state file and load its live peers into ``registry``.

    Returns the number of peers loaded; raises :class:`DataError` if the file
    cannot be opened or is not a Cascade state file.
    """
    p = Path(path)
    try:
        conn = _connect(p)
        try:
            rows = conn.execute("SELECT cascade_hash, peer, last_seen, good FROM peers").fetchall()
        finally:
            conn.close()
        peers = [(bytes(h), bytes(k), float(last), bool(g)) for h, k, last, g in rows]
    except sqlite3.Error as exc:
        raise DataError(f"cannot use state file {p}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise DataError(f"state file {p} holds a malformed peer row: {exc}") from exc
    return registry.restore(peers)


class StateStore:
    """Writes the registry's changes to ``path`` from a background thread."""

    def __init__(self, path: str | os.PathLike[str], registry: SwarmRegistry, interval: float = 1.0) -> None:
        self.path = Path(path)
        self._registry = registry
        self._interval = interval
        self._stop = threading.Event()
        self._pending: Changes = {}
        self._failed = False
        self._resync = False
        try:
            self._conn = _connect(self.path)
        except sqlite3.Error as exc:
            raise DataError(f"cannot use state file {self.path}: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)

    def start(self) -> None:
        self._full_save()
        self._thread.start()

    def _full_save(self) -> None:
        """Make the file match the registry exactly (drops rows that expired while we were down)."""
        self._registry.take_changes()
        rows = self._registry.dump()
        try:
            with self._conn:
                self._conn.execute("DELETE FROM peers")
                self._conn.executemany(_UPSERT, [(h, k, last, int(g)) for h, k, last, g in rows])
        except sqlite3.Error as exc:
            raise DataError(f"cannot write state file {self.path}: {exc}") from exc

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def flush(self) -> bool:
        """Write what changed since the last flush; returns False if the write failed (kept for a retry)."""
        if self._resync:
            try:
                self._full_save()
            except DataError as exc:
                return self._write_failed(exc)
            self._resync = False
            return self._write_ok()
        changes = self._registry.take_changes()
        if changes:
            self._pending.update(changes)
        if not self._pending:
            return True
        upserts = [(h, k, v[0], int(v[1])) for (h, k), v in self._pending.items() if v is not None]
        deletes = [(h, k) for (h, k), v in self._pending.items() if v is None]
        try:
            with self._conn:
                self._conn.executemany(_DELETE, deletes)
                self._conn.executemany(_UPSERT, upserts)
        except sqlite3.Error as exc:
            if len(self._pending) > _MAX_PENDING:  # keep memory bounded: rewrite everything once writable
                self._pending = {}
                self._resync = True
            return self._write_failed(exc)
        self._pending = {}
        return self._write_ok()

    def _write_failed(self, exc: Exception) -> bool:
        self._registry.count_error("state_write")
        if not self._failed:
            log.warning("cannot write state file %s: %s (will retry)", self.path, exc)
        self._failed = True
        return False

    def _write_ok(self) -> bool:
        if self._failed:
            log.warning("state file %s writable again", self.path)
        self._failed = False
        return True

    def close(self) -> bool:
        """Stop the writer, write the last changes and close the file; False if that write failed."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        ok = self.flush()
        self._conn.close()
        return ok
