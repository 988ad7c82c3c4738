"""Opening a collection's members on disk (peer/collection_local.py) when the disk spells a name otherwise.

Member paths are NFC; a Linux disk keeps names as they were written (NFD from a
Mac, say), so ``cascade create`` finds a member under a spelling that its
readers must find again. Real files under tmp_path; no socket, no thread.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import pytest

from cascade.collection import parse_collection
from cascade.errors import CollectionError
from peer.collection_local import (
    HeldFolder,
    MemberMissing,
    create_collection,
    disk_spelling,
    open_member,
    walk_tree,
)
from peer.localdata import create_metafile

pytestmark = pytest.mark.unit

FOLDER = "r\u00e9sum\u00e9s"  # NFC, as a member path holds it
FILE = "na\u00efve.txt"
MEMBER = f"{FOLDER}/{FILE}"


def nfd(name: str) -> str:
    return unicodedata.normalize("NFD", name)


@pytest.fixture
def nfd_tree(tmp_path: Path) -> Path:
    """A file whose folder and name are both spelt NFD on disk."""
    (tmp_path / nfd(FOLDER)).mkdir()
    (tmp_path / nfd(FOLDER) / nfd(FILE)).write_bytes(b"spelt otherwise")
    if (tmp_path / MEMBER).exists():
        pytest.skip("this file system normalises names: every spelling finds the file")
    return tmp_path


def read_all(fd: int) -> bytes:
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def assert_not_found(folder: Path, member: str) -> None:
    """Neither a spelling nor the member itself is found under ``folder``."""
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert disk_spelling(root, member) is None
        with pytest.raises(MemberMissing):
            open_member(root, member, folder / member)
    finally:
        os.close(root)


def test_a_member_spelt_nfd_on_disk_is_opened_by_its_nfc_path(nfd_tree: Path) -> None:
    root = os.open(nfd_tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert disk_spelling(root, MEMBER) == f"{nfd(FOLDER)}/{nfd(FILE)}"
        assert read_all(open_member(root, MEMBER, nfd_tree / MEMBER)) == b"spelt otherwise"
        with pytest.raises(MemberMissing):
            open_member(root, MEMBER, nfd_tree / MEMBER, respell=False)
    finally:
        os.close(root)


def test_a_seeded_member_spelt_nfd_is_served_and_watched(nfd_tree: Path) -> None:
    held = HeldFolder(nfd_tree)
    try:
        assert read_all(held.open_member(MEMBER)) == b"spelt otherwise"
        seen = held.look(MEMBER)
        assert seen is not None and seen[1] == os.stat(nfd_tree / nfd(FOLDER) / nfd(FILE)).st_ino
        # Renamed to its NFC spelling while seeded: still found, under the new name.
        os.rename(nfd_tree / nfd(FOLDER) / nfd(FILE), nfd_tree / nfd(FOLDER) / FILE)
        assert held.look(MEMBER) is not None
        assert read_all(held.open_member(MEMBER)) == b"spelt otherwise"
    finally:
        held.close()


def test_two_spellings_of_one_name_match_neither(tmp_path: Path) -> None:
    # U+1EC7 (e with circumflex and dot below): the canonical NFD order and another
    # order both normalise to it; which one a collection meant cannot be told.
    name = "\u1ec7.txt"
    (tmp_path / "e\u0323\u0302.txt").write_bytes(b"1")
    (tmp_path / "e\u0302\u0323.txt").write_bytes(b"2")
    if (tmp_path / name).exists():
        pytest.skip("this file system normalises names")
    assert_not_found(tmp_path, name)


def test_a_symlinked_folder_is_not_entered_to_find_a_spelling(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / nfd(FILE)).write_bytes(b"outside")
    root_dir = tmp_path / "root"
    root_dir.mkdir()
    (root_dir / nfd(FOLDER)).symlink_to(elsewhere)
    assert_not_found(root_dir, MEMBER)


def test_create_skips_the_parts_of_an_unfinished_fetch_that_no_fetch_would_take(tmp_path: Path) -> None:
    # A folder fetched half-way and then shared: its .cascade-partial is Cascade's own
    # scratch, and a collection holding it would be refused by every fetcher.
    (tmp_path / ".cascade-partial").mkdir()
    (tmp_path / ".cascade-partial" / "0-0123456789abcdef.part").write_bytes(b"part")
    (tmp_path / "sub" / ".cascade-partial").mkdir(parents=True)  # not at the top: an ordinary name
    (tmp_path / "sub" / ".cascade-partial" / "kept").write_bytes(b"kept")
    (tmp_path / "top.txt").write_bytes(b"top")
    tree = walk_tree(tmp_path)
    assert [f.path for f in tree.files] == ["sub/.cascade-partial/kept", "top.txt"]
    assert tree.skipped == [
        "'.cascade-partial' holds the parts of an unfinished fetch: skipped (no fetch takes the name)"
    ]


def test_create_refuses_a_folder_too_deep_for_any_member_in_one_short_line(tmp_path: Path) -> None:
    # 20 folders of 250 bytes: deeper than a member path may be (4096 bytes), and than
    # PATH_MAX once joined to the folder's own path, which made the refusal a 4 KB line.
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(20):
            name = f"{i:03d}" + "y" * 247
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    with pytest.raises(
        CollectionError, match=r"bytes long: a path under it would be longer than the limit of 4096"
    ) as e:
        walk_tree(tmp_path)
    assert len(str(e.value)) < 300 + len(str(tmp_path))


def test_each_member_gets_the_block_size_its_rule_gives_its_length(tmp_path: Path) -> None:
    # A member is the .cascade of its file alone in the same block size, so a rule by length
    # (cascade create's default) keeps each member's single-file cascade hash and swarm.
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    files = {"small": b"s" * 3000, "sub/big": os.urandom(9000), "empty": b""}
    for rel, data in files.items():
        (root / rel).write_bytes(data)

    def rule(length: int) -> int:
        return 1024 if length < 4096 else 4096

    coll = parse_collection(create_collection(root, walk_tree(root), rule, workers=1))
    for m in coll.members:
        assert m.cascade_file().block_size == rule(len(files[m.path]))
        assert m.cascade == create_metafile(root / m.path, rule(len(files[m.path])), workers=1)
