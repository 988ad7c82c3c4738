"""``--out`` of a collection fetch: what is looked for before a fetch, and the member folders kept open.

Before a fetch, each member's final name and ``.part`` is looked for. One listing
per folder answers "not there" for the names it lacks (no failed open per
member); a name it shows, or a folder it cannot list, is looked at with every
check as before. So the listings may only ever say "surely absent".
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cascade.errors import DataError
from peer.collection_fetch import PARTIAL_DIR, OutFolder, _Listings

pytestmark = pytest.mark.unit


def listings(root: Path) -> _Listings:
    fd = os.open(root, os.O_RDONLY)
    try:
        return _Listings(os.dup(fd))
    finally:
        os.close(fd)


def test_names_missing_from_a_listing_are_absent_and_everything_else_is_looked_at(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "here.bin").write_bytes(b"x")
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    look = listings(tmp_path)
    absent = {
        "nothing.bin": True,
        "a/nothing.bin": True,
        "a/b/nothing.bin": True,
        "a/missing/deeper/x.bin": True,
        "a/b/here.bin": False,
        # Not "absent": the opener must see these and refuse them with its own reasons.
        "link/b/here.bin": False,  # through a symlink: not listed, so not known absent
        "link/nothing.bin": False,
        "file/x.bin": False,  # a file where a folder should be
    }
    assert {path: look.absent(path) for path in absent} == absent


@pytest.mark.parametrize(
    ("on_disk", "member"),
    [
        ("README.txt", "readme.TXT"),
        ("caf\u00e9.txt", "cafe\u0301.txt"),
        ("STRASSE", "stra\u00dfe"),
        ("ab.txt", "a\u200cb.txt"),  # HFS+ ignores the zero-width non-joiner
    ],
)
def test_a_name_equal_after_case_folding_or_normalisation_is_never_called_absent(
    tmp_path: Path, on_disk: str, member: str
) -> None:
    """On macOS or Windows the two spellings are one file: it must be opened and looked at."""
    (tmp_path / on_disk).write_bytes(b"x")
    assert not listings(tmp_path).absent(member)


def test_a_listing_is_taken_once_and_names_made_later_are_left_to_the_link(tmp_path: Path) -> None:
    look = listings(tmp_path)
    assert look.absent("late.bin")
    (tmp_path / "late.bin").write_bytes(b"x")
    # Still "absent": the hard link that gives a member its name refuses to replace it.
    assert look.absent("late.bin")


def test_member_folders_are_kept_open_and_closed_at_the_end(tmp_path: Path) -> None:
    out = OutFolder(tmp_path / "out")
    try:
        fd, name = out.parent_of("x/y/one.bin")
        os.close(fd)
        again, name2 = out.parent_of("x/y/two.bin")
        assert (name, name2) == ("one.bin", "two.bin")
        assert os.path.samestat(os.fstat(again), os.stat(tmp_path / "out" / "x" / "y"))
        os.close(again)
        kept = sorted(int(n) for n in os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else []
        out.close_folders()
        after = sorted(int(n) for n in os.listdir("/proc/self/fd")) if kept else []
        assert len(kept) - len(after) == (1 if kept else 0)
    finally:
        out.close_folders()
        os.close(out.partial_fd)
        os.close(out.fd)
    assert (tmp_path / "out" / PARTIAL_DIR).is_dir()


@pytest.mark.parametrize(
    "before",
    ["", "a-file", "a-folder/", f"{PARTIAL_DIR}/0-0123456789abcdef.part", "Upper.BIN", ".hidden"],
)
def test_only_an_out_with_nothing_in_it_is_fresh(tmp_path: Path, before: str) -> None:
    # A fresh --out skips looking for every member's name and .part; anything there makes it look.
    root = tmp_path / "out"
    if before:
        where = root / before
        where.parent.mkdir(parents=True, exist_ok=True)
        if before.endswith("/"):
            where.mkdir()
        else:
            where.write_bytes(b"x")
    out = OutFolder(root)
    try:
        assert out.fresh() == (before == "")
    finally:
        os.close(out.partial_fd)
        os.close(out.fd)


def test_a_second_fetch_into_the_same_out_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    # Two fetches into one folder took each other's members for foreign files, failed on
    # half of them each and left .part files behind; the second is now refused in one line.
    # (flock is per open file, so two OutFolders of one process stand for two processes.)
    root = tmp_path / "out"
    first = OutFolder(root)
    try:
        with pytest.raises(DataError, match="another peer fetch is writing into it"):
            OutFolder(root)
    finally:
        os.close(first.partial_fd)
        os.close(first.fd)
    second = OutFolder(root)  # the lock went with the descriptor (as with a SIGKILL)
    os.close(second.partial_fd)
    os.close(second.fd)
