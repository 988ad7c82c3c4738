"""The table of open member files (peer/openfiles.py): least recently used closed first, held ones never.

Real files under tmp_path, opened through a held folder as ``peer seed`` does; no socket, no thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.metafile import parse_cascade
from oscompat import detect
from peer.collection_local import HeldFolder
from peer.localdata import create_metafile
from peer.openfiles import OpenFiles
from peer.storage import MemberStore, NotAsVerified, signature_of

pytestmark = pytest.mark.unit


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[list[MemberStore]]:
    made = []
    held = HeldFolder(tmp_path)
    try:
        for name in "abc":
            path = tmp_path / name
            path.write_bytes(name.encode() * 100)
            cf = parse_cascade(create_metafile(path, 64))
            made.append(MemberStore(cf, bytearray([1, 1]), held, name, signature_of(os.stat(path))))
        yield made
    finally:
        held.close()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_the_least_recently_used_idle_file_is_closed_first(stores: list[MemberStore]) -> None:
    a, b, c = stores
    pool = OpenFiles(2, detect())
    fa = pool.acquire(a)
    pool.release(fa)
    fb = pool.acquire(b)
    pool.release(fb)
    pool.release(pool.acquire(a))  # a is now the most recently used
    fc = pool.acquire(c)
    assert (pool.open_count, pool.opened) == (2, 3)
    assert fb.stale and not fa.stale and not fc.stale  # b, the least recently used, was closed
    assert pool.acquire(a) is fa  # a hit: no new open
    assert pool.opened == 3
    pool.close()


def test_held_files_are_never_closed_and_the_cap_returns_once_they_are_released(stores: list[MemberStore]) -> None:
    pool = OpenFiles(1, detect())
    held = [pool.acquire(s) for s in stores]
    assert pool.open_count == 3  # over the cap while all three are held
    assert all(is_open(f.fd) for f in held)
    for f in held:
        pool.release(f)
    assert pool.open_count == 1
    pool.close()
    assert pool.open_count == 0


def test_a_reverified_store_gets_a_new_descriptor_and_the_old_closes_when_released(stores: list[MemberStore]) -> None:
    a = stores[0]
    pool = OpenFiles(4, detect())
    old = pool.acquire(a)
    a.reverify(a.disk_signature())  # the watcher's re-verification moves the generation on
    new = pool.acquire(a)
    assert new is not old and pool.open_count == 2
    pool.release(old)
    assert pool.open_count == 1
    pool.release(new)
    pool.close()


def test_a_file_changed_since_it_was_verified_is_refused(stores: list[MemberStore]) -> None:
    a = stores[0]
    pool = OpenFiles(4, detect())
    os.truncate(a.path, 50)
    with pytest.raises(NotAsVerified, match="changed since it was verified"):
        pool.acquire(a)
    a.path.unlink()
    with pytest.raises(NotAsVerified, match="no such file"):
        pool.acquire(a)
    assert pool.open_count == 0


def test_a_forgotten_store_is_closed_now_when_idle_and_on_release_when_held(stores: list[MemberStore]) -> None:
    a, b, _ = stores
    pool = OpenFiles(4, detect())
    fa = pool.acquire(a)
    pool.release(fa)
    fb = pool.acquire(b)
    pool.forget(a)  # idle: closed at once
    pool.forget(b)  # held by a send: closed when it is released
    assert not is_open(fa.fd) and pool.open_count == 1
    assert is_open(fb.fd) and not pool.is_open(b)
    pool.release(fb)
    assert pool.open_count == 0
    pool.forget(a)  # not in the table: nothing to do
    pool.close()
