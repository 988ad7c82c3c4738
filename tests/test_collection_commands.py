"""The commands on collections: ``cascade create DIR``, ``info``, ``verify``, ``peer seed``, publish and download.

Real processes on 127.0.0.1. The hostile collections are built with the
encoder of ``cascade/collection.py`` where it allows, and as raw bytes where
it refuses (that is the point).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.collection import MAGIC, Member, parse_collection, serialize_collection
from cascade.metafile import encode_cascade, parse_cascade
from cascade.wire import TrackerCommand
from peer.collection_local import PARTIAL_DIR
from peer.tracker_client import TrackerAddress, announce
from tests.doubles import Swarm, sha256_file
from tests.procs import Proc, start_tracker

pytestmark = pytest.mark.process

TIMEOUT = 60.0
# The .cascade of the 6 bytes "hello\n" in blocks of 4 (docs/collection-format.md section 10).
HELLO = encode_cascade(
    6,
    4,
    hashlib.sha256(b"hello\n").digest(),
    hashlib.sha256(b"hell").digest() + hashlib.sha256(b"o\n").digest(),
)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    module = {"cascade": "peer.cascade_command", "peer": "peer"}[args[0]]
    return subprocess.run(
        [sys.executable, "-m", module, *args[1:]],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def make_tree(root: Path, outside: Path) -> dict[str, bytes]:
    """The awkward small tree of the issue; returns member path -> bytes (what a collection must hold)."""
    files = {
        "a/b/c/deep.txt": b"deep\n",
        "a/b/sibling.bin": bytes(range(256)) * 300,  # 76,800 bytes: several blocks of 16 KiB
        "empty": b"",
        "zeros.d/nul-bytes": b"\0" * 5000 + b"x\0y",
        "caf\u00e9/r\u00e9sum\u00e9 \u65e5\u672c.txt": b"non-ASCII name\n",
        "top.txt": b"top\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "empty-dir" / "inner").mkdir(parents=True)
    outside.write_bytes(b"secret outside the tree\n")
    (root / "link-out").symlink_to(outside)
    (root / "a" / "link-dir").symlink_to(root / "a" / "b", target_is_directory=True)
    os.mkfifo(root / "fifo")
    return files


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "my-dataset"
    root.mkdir()
    return root, make_tree(root, tmp_path / "outside.txt")


def create(root: Path, *extra: str) -> Path:
    r = run("cascade", "create", str(root), "--block-size", "16K", *extra)
    assert r.returncode == 0, r.stderr
    return root.with_name(root.name + ".cascade")


# --- create, info, verify -----------------------------------------------------------


def test_create_holds_every_regular_file_and_skips_links_fifos_and_empty_folders(
    tree: tuple[Path, dict[str, bytes]],
) -> None:
    root, files = tree
    r = run("cascade", "create", str(root), "--block-size", "16K")
    assert r.returncode == 0, r.stderr
    out = root.with_name("my-dataset.cascade")
    coll = parse_collection(out.read_bytes())
    assert [m.path for m in coll.members] == sorted(files)
    for m in coll.members:
        assert m.block_size == 16 << 10
        assert parse_cascade(m.cascade).data_length == len(files[m.path])
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 3, r.stderr  # two links and the FIFO, one line each
    assert any("'link-out' is a symbolic link" in w for w in warnings)
    assert any("'a/link-dir' is a symbolic link" in w for w in warnings)
    assert any("'fifo' is not a regular file" in w for w in warnings)
    assert f"collection hash {coll.collection_hash.hex()}" in r.stdout
    # The same tree gives the same bytes: the hash names the tree.
    again = run("cascade", "create", str(root), "--block-size", "16K", "-o", str(root.parent / "again.cascade"))
    assert again.returncode == 0, again.stderr
    assert (root.parent / "again.cascade").read_bytes() == out.read_bytes()


def test_create_refuses_a_clash_or_a_windows_name_before_writing(tmp_path: Path) -> None:
    for names, fault in [
        (["README", "readme"], "would be the same file"),
        (["a/x", "A/x"], "would be the same file"),
        (["nul.txt"], "device name"),
        (["ok", "bad:name"], "':'"),
    ]:
        root = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"x")
        r = run("cascade", "create", str(root))
        assert r.returncode == 1, (names, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
        if fault:
            assert fault in r.stderr
        assert not root.with_name(root.name + ".cascade").exists()


def test_create_refuses_an_absurd_block_size_for_a_member(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "big").write_bytes(b"x" * 2_000_000)
    r = run("cascade", "create", str(root), "--block-size", "1")
    assert r.returncode == 2, r.stderr
    assert "--force" in r.stderr and "big" in r.stderr
    assert not (tmp_path / "d.cascade").exists()


def test_without_block_size_each_file_keeps_the_cascade_hash_it_has_alone(tmp_path: Path) -> None:
    # Each member in the default for its own size (docs/collection-format.md section 7): one
    # swarm for the file, alone or in any collection. A file over 16 GiB, whose default is
    # larger, no longer changes the others' (test_collection_local checks the rule by length).
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "small").write_bytes(b"x" * 1000)
    (root / "sub" / "big").write_bytes(bytes(600 << 10))
    r = run("cascade", "create", str(root))
    assert r.returncode == 0, r.stderr
    # The 1000-byte file is one block of 256 KiB, the 600 KiB one ten of 64 KiB.
    assert "in blocks of 64.0 KiB to 256.0 KiB\n" in r.stdout
    coll = parse_collection((tmp_path / "d.cascade").read_bytes())
    for m in coll.members:
        alone = tmp_path / "alone.cascade"
        assert run("cascade", "create", str(root / m.path), "-o", str(alone), "--force").returncode == 0
        assert m.cascade == alone.read_bytes(), m.path


def test_info_shows_a_tree_and_json_every_member(tree: tuple[Path, dict[str, bytes]]) -> None:
    root, files = tree
    out = create(root)
    coll = parse_collection(out.read_bytes())
    r = run("cascade", "info", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("collection:") and "6 files" in lines[0]
    assert f"collection hash {coll.collection_hash.hex()}" in lines[1]
    assert "  a/" in lines and "      c/" in lines and "  caf\u00e9/" in lines
    assert any(line.strip().startswith("empty  0 B") for line in lines)
    doc = json.loads(run("cascade", "info", "--json", str(out)).stdout)
    assert doc["collection_hash"] == coll.collection_hash.hex()
    assert doc["count"] == len(files) and doc["total_length"] == sum(map(len, files.values()))
    assert {m["path"]: m["length"] for m in doc["members"]} == {p: len(d) for p, d in files.items()}
    assert all(m["cascade_hash"] == c.cascade_hash.hex() for m, c in zip(doc["members"], coll.members, strict=True))


def test_verify_checks_every_file_and_the_whole(tree: tuple[Path, dict[str, bytes]]) -> None:
    root, files = tree
    out = create(root)
    r = run("cascade", "verify", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith(f"{root}: complete, all 6 files valid")
    # One block damaged, one file gone, one file swapped for a symlink to an identical copy.
    with (root / "a/b/sibling.bin").open("r+b") as f:
        f.seek(20000)
        f.write(b"!")
    (root / "top.txt").unlink()
    copy = root.parent / "deep-copy.txt"
    copy.write_bytes(files["a/b/c/deep.txt"])
    (root / "a/b/c/deep.txt").unlink()
    (root / "a/b/c/deep.txt").symlink_to(copy)
    r = run("cascade", "verify", str(out))
    assert r.returncode == 1, r.stderr
    assert "sibling.bin: incomplete, 4 of 5 blocks valid; missing or corrupt: 1" in r.stdout
    assert "top.txt: missing" in r.stdout
    assert "deep.txt' is a symbolic link; Cascade does not follow it" in r.stdout
    assert r.stdout.splitlines()[-1] == f"{root}: incomplete, 3 of 6 files complete"
    doc = json.loads(run("cascade", "verify", "--json", str(out)).stdout)
    assert doc["complete"] is False and doc["complete_files"] == 3 and doc["count"] == 6
    by_path = {f["path"]: f for f in doc["files"]}
    assert by_path["top.txt"]["present"] is False
    assert by_path["a/b/sibling.bin"]["valid_blocks"] == 4
    assert by_path["empty"]["complete"] is True


# --- hostile collections --------------------------------------------------------------


def raw_collection(members: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    """Collection bytes as a stranger could write them: no check, no sorting."""
    n = len(members) if count is None else count
    out = [MAGIC, (1).to_bytes(4, "big"), n.to_bytes(4, "big")]
    for path, cascade in members:
        out += [len(path).to_bytes(2, "big"), path, len(cascade).to_bytes(4, "big"), cascade]
    return b"".join(out)


HOSTILE = {
    "traversal": raw_collection([(b"../evil.txt", HELLO)]),
    "absolute": raw_collection([(b"/tmp/evil.txt", HELLO)]),
    "case clash": raw_collection([(b"README", HELLO), (b"readme", HELLO)]),
    "file and folder": raw_collection([(b"a", HELLO), (b"a/b", HELLO)]),
    "huge count": raw_collection([(b"a", HELLO)], count=1 << 20),
    "too many": raw_collection([(b"a", HELLO)], count=(1 << 20) + 1),
    "backslash": raw_collection([(b"..\\evil", HELLO)]),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_collections_are_refused_with_one_line_before_anything_is_written(tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "x.cascade"
    bad.write_bytes(HOSTILE[kind])
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (
        ["cascade", "info", str(bad)],
        ["cascade", "verify", str(bad)],
        ["peer", "seed", str(bad), "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0"],
        ["cascade", "publish", str(bad), "--tracker", "http://127.0.0.1:9"],
        [
            "peer",
            "fetch",
            str(bad),
            "--tracker",
            "127.0.0.1:9",
            "--out",
            str(tmp_path / "out"),
            "--listen",
            "127.0.0.1:0",
        ],
    ):
        r = run(*args, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert str(bad) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path.parent / "evil.txt").exists()


# --- seed, publish, download ------------------------------------------------------------


def wait_subscribed(tracker_port: int, cascade_hash: bytes, port: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    address = TrackerAddress("127.0.0.1", tracker_port)
    while time.monotonic() < deadline:
        peers = announce(address, TrackerCommand.LIST, cascade_hash, "127.0.0.1", 0, 5.0)
        if any(p.port == port and p.good for p in peers):
            return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} never subscribed {cascade_hash.hex()[:16]}")


@pytest.mark.portable
def test_seed_serves_every_member_from_one_port(
    tmp_path: Path, swarm: Swarm, tree: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = tree
    out = create(root)
    coll = parse_collection(out.read_bytes())
    seeder = swarm.start("peer", "seed", str(out), "--tracker", swarm.tracker, "--listen", "127.0.0.1:0")
    port = seeder.wait_listening()
    seeder.wait_for_line(r"my-dataset.cascade: 6/6 files complete")
    for m in coll.members:
        if m.data_length:  # an empty file needs no peer
            wait_subscribed(swarm.tracker_port, m.cascade_hash, port)
    # Any member is a plain .cascade: an old client fetches it alone from the collection's seeder.
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    for i, m in enumerate(coll.members):
        single = fetched / f"{i}.cascade"
        single.write_bytes(m.cascade)
        proc = swarm.fetcher(single, fetched / str(i))
        assert proc.wait(TIMEOUT) == 0, proc.stderr
        assert (fetched / str(i)).read_bytes() == files[m.path]


def test_seed_never_follows_a_symlink_out_of_the_folder(
    tmp_path: Path, swarm: Swarm, tree: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = tree
    out = create(root)
    # The same bytes, but reached through a link out of the tree: not served.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "top.txt").write_bytes(files["top.txt"])
    (root / "top.txt").unlink()
    (root / "top.txt").symlink_to(outside / "top.txt")
    seeder = swarm.start("peer", "seed", str(out), "--tracker", swarm.tracker, "--listen", "127.0.0.1:0")
    seeder.wait_listening()
    seeder.wait_for_line(r"5/6 files complete")
    seeder.wait_for_line(r"'top.txt' is a symbolic link; Cascade does not follow it: not served")


def test_a_member_swapped_for_a_symlink_while_seeding_is_no_longer_served(
    tmp_path: Path, swarm: Swarm, tree: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = tree
    out = create(root)
    seeder = swarm.start("peer", "seed", str(out), "--tracker", swarm.tracker, "--listen", "127.0.0.1:0")
    seeder.wait_listening()
    seeder.wait_for_line(r"6/6 files complete")
    copy = tmp_path / "same-bytes.txt"
    copy.write_bytes(files["top.txt"])
    link = root / "top.txt.new"
    link.symlink_to(copy)
    os.replace(link, root / "top.txt")  # atomically: the path now names a link to identical bytes
    seeder.wait_for_line(r"'top.txt' is a symbolic link; Cascade does not follow it; no longer serving")


def test_publish_a_collection_and_download_it_by_url(tmp_path: Path, tree: tuple[Path, dict[str, bytes]]) -> None:
    root, _files = tree
    out = create(root)
    coll = parse_collection(out.read_bytes())
    tracker = start_tracker()
    try:
        r = run("cascade", "publish", str(out), "--tracker", tracker.http)
        assert r.returncode == 0, r.stderr
        url = r.stdout.strip()
        assert url == f"{tracker.http}/cascades/{coll.collection_hash.hex()}.cascade"
        assert f"uploaded, collection hash {coll.collection_hash.hex()}" in r.stderr
        from peer.http_client import download_cascade

        (tmp_path / "downloaded").mkdir()
        saved, _base = download_cascade(url, tmp_path / "downloaded" / "ds")
        assert saved == tmp_path / "downloaded" / "ds.cascade"
        assert sha256_file(saved) == coll.collection_hash
        # A hostile collection is refused by the tracker with one reason.
        import requests

        resp = requests.put(f"{tracker.http}/api/v1/cascades", data=HOSTILE["traversal"], timeout=10)
        assert resp.status_code == 400 and "'..'" in resp.text
    finally:
        tracker.proc.stop()


def test_collection_upload_is_allowed_only_when_every_member_is(tmp_path: Path) -> None:
    a = Member("a", HELLO)
    b = Member("b", encode_cascade(0, 1 << 20, bytes(32), b""))
    data = serialize_collection([a, b])
    allow = tmp_path / "allow.txt"
    allow.write_text(a.cascade_hash.hex() + "\n")
    tracker = start_tracker("--allow", str(allow))
    try:
        import requests

        resp = requests.put(f"{tracker.http}/api/v1/cascades", data=data, timeout=10)
        assert resp.status_code == 403 and b.cascade_hash.hex() in resp.text
        allow.write_text(a.cascade_hash.hex() + "\n" + b.cascade_hash.hex() + "\n")
    finally:
        tracker.proc.stop()
    tracker = start_tracker("--allow", str(allow))
    try:
        import requests

        resp = requests.put(f"{tracker.http}/api/v1/cascades", data=data, timeout=10)
        assert resp.status_code == 201, resp.text
        assert resp.json()["members"] == 2 and resp.json()["block_size"] == 0
    finally:
        tracker.proc.stop()


# --- fetch ----------------------------------------------------------------------------------


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (no link followed) by its '/'-separated path."""
    found: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                found[path.relative_to(root).as_posix()] = path.read_bytes()
    return found


def seed_tree(swarm: Swarm, out: Path) -> Proc:
    coll = parse_collection(out.read_bytes())
    seeder = swarm.start("peer", "seed", str(out), "--tracker", swarm.tracker, "--listen", "127.0.0.1:0")
    port = seeder.wait_listening()
    for m in coll.members:
        if m.data_length:
            wait_subscribed(swarm.tracker_port, m.cascade_hash, port)
    return seeder


def fetch_args(swarm: Swarm, cascade: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "peer",
        "fetch",
        str(cascade),
        "--out",
        str(out),
        "--tracker",
        swarm.tracker,
        "--listen",
        "127.0.0.1:0",
        "--json",
        *extra,
    ]


def test_swarm_of_fetchers_one_killed_and_resumed(
    tmp_path: Path, swarm: Swarm, tree: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = tree
    big = bytes(range(251)) * 8000  # 2,008,000 bytes: 123 blocks of 16 KiB
    (root / "a" / "big.bin").write_bytes(big)
    files = {**files, "a/big.bin": big}
    out = create(root)
    seed_tree(swarm, out)
    # One fetcher slowed down, to be killed half-way; two others at full speed meanwhile.
    slow = swarm.start(*fetch_args(swarm, out, tmp_path / "killed", "--max-download-rate", "200K", "--progress-lines"))
    # Past 100,000 bytes: the members come in collection order from one seeder, and
    # a/big.bin (the third, after 76,805 bytes) has verified blocks to resume.
    slow.wait_for_line(r"progress [1-9]\d{5,} ")
    fast = [swarm.start(*fetch_args(swarm, out, tmp_path / f"fast{i}")) for i in range(2)]
    slow.kill()
    partial = tmp_path / "killed" / ".cascade-partial"
    assert partial.is_dir() and any(partial.iterdir()), "a killed fetch keeps its .part files"
    for proc in fast:
        assert proc.wait(TIMEOUT) == 0, proc.stderr
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
        assert doc["complete"] is True and doc["count"] == len(files) and len(doc["files"]) == len(files)
    for i in range(2):
        assert tree_bytes(tmp_path / f"fast{i}") == files
    resumed = swarm.start(*fetch_args(swarm, out, tmp_path / "killed"))
    assert resumed.wait(TIMEOUT) == 0, resumed.stderr
    doc = json.loads(resumed.stdout.strip().splitlines()[-1])
    by_path = {f["path"]: f for f in doc["files"]}
    assert by_path["a/big.bin"]["blocks_resumed"] > 0 or by_path["a/big.bin"]["bytes_downloaded"] == 0
    assert tree_bytes(tmp_path / "killed") == files
    assert not partial.exists(), "a finished fetch leaves only the members"
    assert not (tmp_path / "killed" / "link-out").exists() and not (tmp_path / "killed" / "fifo").exists()


def test_an_interrupted_fetch_says_so_in_one_line_and_resumes(
    tmp_path: Path, swarm: Swarm, tree: tuple[Path, dict[str, bytes]]
) -> None:
    # Ctrl-C is the user's choice: one line, as for one file, not a line per member left.
    root, files = tree
    big = bytes(range(251)) * 8000
    (root / "a" / "big.bin").write_bytes(big)
    files = {**files, "a/big.bin": big}
    for i in range(30):
        (root / "more" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (root / "more" / f"{i}.txt").write_bytes(b"%d\n" % i)
        files[f"more/{i}.txt"] = b"%d\n" % i
    out = create(root)
    seed_tree(swarm, out)
    slow = swarm.start(*fetch_args(swarm, out, tmp_path / "o", "--max-download-rate", "200K", "--progress-lines"))
    slow.wait_for_line(r"progress [1-9]\d{5,} ")
    slow.signal(signal.SIGINT)
    assert slow.wait(TIMEOUT) == 130, slow.stderr
    said = [line for line in slow.stderr.splitlines() if not line.startswith(("progress ", "peer listening "))]
    assert said == [
        f"peer fetch: interrupted; verified blocks are kept in {tmp_path / 'o' / '.cascade-partial'}, rerun to resume"
    ]
    doc = json.loads(slow.stdout.strip().splitlines()[-1])
    assert doc["complete"] is False
    # The empty member is made before the download: complete, though the whole is not; and
    # the count of complete files agrees with the files said complete.
    by_path = {f["path"]: f for f in doc["files"]}
    assert by_path["empty"] == {
        "path": "empty",
        "cascade_hash": by_path["empty"]["cascade_hash"],
        "complete": True,
        "bytes_downloaded": 0,
    }
    assert (tmp_path / "o" / "empty").read_bytes() == b""
    assert doc["complete_files"] == sum(f["complete"] for f in doc["files"])
    resumed = swarm.start(*fetch_args(swarm, out, tmp_path / "o"))
    assert resumed.wait(TIMEOUT) == 0, resumed.stderr
    assert tree_bytes(tmp_path / "o") == files


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], timeout=10).returncode:
        pytest.skip("this machine does not let us mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], timeout=10, check=True)


def test_a_full_disk_is_one_line_naming_the_member_and_the_rest_is_kept(
    tmp_path: Path, swarm: Swarm, small_tmpfs: Path
) -> None:
    root = tmp_path / "ds"
    files = {f"a/{i}.txt": b"%d\n" % i for i in range(5)} | {"b/big.bin": bytes(range(256)) * 800}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    coll = create(root)
    seed_tree(swarm, coll)
    out = small_tmpfs / "out"
    first = swarm.start(*fetch_args(swarm, coll, out))
    assert first.wait(TIMEOUT) == 1, first.stderr
    said = [line for line in first.stderr.splitlines() if not line.startswith("peer listening ")]
    big = f"{out / 'b' / 'big.bin'}: disk full: cannot reserve its 200.0 KiB (in {out / '.cascade-partial'})"
    assert said == [f"peer fetch: error: {big}"]
    assert tree_bytes(out) == {k: v for k, v in files.items() if k.startswith("a/")}  # the small ones fit: kept
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_tmpfs)], timeout=10, check=True)
    again = swarm.start(*fetch_args(swarm, coll, out))
    assert again.wait(TIMEOUT) == 0, again.stderr
    doc = json.loads(again.stdout.strip().splitlines()[-1])
    assert doc["bytes_downloaded"] == len(files["b/big.bin"])  # the members kept are not fetched again
    assert tree_bytes(out) == files


def test_fetch_never_writes_through_a_symlink_nor_over_a_foreign_file(
    tmp_path: Path, swarm: Swarm, tree: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = tree
    out = create(root)
    dest = tmp_path / "dest"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest.mkdir()
    (dest / "a").symlink_to(elsewhere, target_is_directory=True)  # a folder of the tree is a link here
    (dest / "top.txt").write_bytes(b"the user's own file\n")  # a member's name holds a foreign file
    seed_tree(swarm, out)
    proc = swarm.start(*fetch_args(swarm, out, dest))
    assert proc.wait(TIMEOUT) == 1, proc.stderr
    assert "'a' is a symbolic link" in proc.stderr
    assert "top.txt: exists and is not this file; not touching it" in proc.stderr
    assert list(elsewhere.iterdir()) == []
    assert (dest / "top.txt").read_bytes() == b"the user's own file\n"
    got = tree_bytes(dest)
    assert got["empty"] == b"" and got["zeros.d/nul-bytes"] == files["zeros.d/nul-bytes"]
    assert got["caf\u00e9/r\u00e9sum\u00e9 \u65e5\u672c.txt"] == files["caf\u00e9/r\u00e9sum\u00e9 \u65e5\u672c.txt"]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["complete"] is False and doc["complete_files"] == len(files) - 3


def test_fetch_a_collection_by_url(tmp_path: Path, tree: tuple[Path, dict[str, bytes]]) -> None:
    root, files = tree
    out = create(root)
    tracker = start_tracker()
    seeder = None
    try:
        url = run("cascade", "publish", str(out), "--tracker", tracker.http).stdout.strip()
        seeder = Proc(["peer", "seed", str(out), "--tracker", tracker.addr, "--listen", "127.0.0.1:0"])
        port = seeder.wait_listening()
        for m in parse_collection(out.read_bytes()).members:
            if m.data_length:
                wait_subscribed(tracker.port, m.cascade_hash, port)
        r = run("peer", "fetch", url, "--out", str(tmp_path / "by-url"), "--listen", "127.0.0.1:0")
        assert r.returncode == 0, r.stderr
        assert tree_bytes(tmp_path / "by-url") == files
        assert (tmp_path / "by-url.cascade").read_bytes() == out.read_bytes()
    finally:
        if seeder is not None:
            seeder.stop()
        tracker.proc.stop()


@pytest.mark.parametrize("name", [".cascade-partial", ".Cascade-Partial", ".cascade\u200c-partial"])
def test_fetch_refuses_a_member_in_the_partial_folder_before_writing(tmp_path: Path, name: str) -> None:
    bad = tmp_path / "x.cascade"
    bad.write_bytes(serialize_collection([Member(f"{name}/0-x.part", HELLO)]))
    r = run(
        "peer", "fetch", str(bad), "--tracker", "127.0.0.1:9", "--out", str(tmp_path / "o"), "--listen", "127.0.0.1:0"
    )
    assert r.returncode == 1 and "partial downloads" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr  # no "listening" line before it
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out_exists", [False, True], ids=["new-out", "empty-out"])
def test_fetch_with_no_tracker_answering_fails_at_once_with_one_line_and_writes_nothing(
    tmp_path: Path, out_exists: bool
) -> None:
    # As for one file: a tracker must answer before anything is created (the empty member
    # included), and an unreachable one is one line at once, not a minute of retries
    # followed by a line per member.
    coll = tmp_path / "x.cascade"
    empty = encode_cascade(0, 4, hashlib.sha256(b"").digest(), b"")
    coll.write_bytes(serialize_collection([Member(f"d/{i}.txt", HELLO) for i in range(30)] + [Member("empty", empty)]))
    out = tmp_path / "o"
    if out_exists:
        out.mkdir()
    args = ["peer", "fetch", str(coll), "--tracker", "127.0.0.1:9", "--out", str(out), "--listen", "127.0.0.1:0"]
    r = run(*args, "--json", "--timeout", "30")
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == ["peer fetch: error: tracker 127.0.0.1:9 unreachable: Connection refused"]
    assert json.loads(r.stdout.splitlines()[-1]) == {
        "complete": False,
        "error": "tracker 127.0.0.1:9 unreachable: Connection refused",
    }
    assert sorted(tmp_path.iterdir()) == ([out] if out_exists else []) + [coll]
    assert not out_exists or list(out.iterdir()) == []


def test_fetch_without_out_refuses_a_default_folder_holding_what_the_collection_does_not(tmp_path: Path) -> None:
    # Without --out the folder is named by the collection file or, for a URL, by the
    # tracker: a stranger could name one of the user's folders ("bin") and add files to
    # it. Such a folder is taken only if it holds nothing but the collection's own names
    # (an earlier run of this fetch); --out names a folder on purpose, and adds to it.
    coll = tmp_path / "bin.cascade"
    coll.write_bytes(serialize_collection([Member("d/0.txt", HELLO), Member("tool", HELLO)]))
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "mytool").write_bytes(b"mine\n")
    args = ["peer", "fetch", str(coll), "--tracker", "127.0.0.1:9", "--listen", "127.0.0.1:0"]
    r = run(*args)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        f"peer fetch: error: {folder}: exists and holds 'mytool', which this collection does not;"
        f" fetch into a new folder, or give --out {folder} to add the collection's files to it"
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["mytool"]
    # The collection's own names (in any case) and a .cascade-partial: a rerun, let through
    # (here to the unreachable tracker); so is the same folder named with --out.
    (folder / "mytool").unlink()
    (folder / "D").mkdir()
    (folder / ".cascade-partial").mkdir()
    for extra in ([], ["--out", str(folder)]):
        r = run(*args, *extra)
        assert r.returncode == 1 and "tracker 127.0.0.1:9 unreachable" in r.stderr, r.stderr


def test_a_member_complete_at_its_name_loses_the_part_an_earlier_run_left(tmp_path: Path) -> None:
    # A run killed between the hard link that names a member and the unlink of its .part
    # (or a second fetch into the same folder) leaves both; the next run finds the member
    # complete and must remove the .part, or .cascade-partial stays for good.
    coll = tmp_path / "x.cascade"
    parsed = parse_collection(serialize_collection([Member("a/hello.txt", HELLO), Member("b.txt", HELLO)]))
    coll.write_bytes(serialize_collection(parsed.members))
    out = tmp_path / "o"
    (out / "a").mkdir(parents=True)
    (out / "a" / "hello.txt").write_bytes(b"hello\n")
    (out / "b.txt").write_bytes(b"hello\n")
    (out / PARTIAL_DIR).mkdir()
    stale = out / PARTIAL_DIR / f"0-{parsed.members[0].cascade_hash.hex()[:16]}.part"
    stale.write_bytes(b"hello\n")
    # Every member is complete: no tracker is asked.
    r = run("peer", "fetch", str(coll), "--tracker", "127.0.0.1:9", "--out", str(out), "--listen", "127.0.0.1:0")
    assert r.returncode == 0, r.stderr
    assert not (out / PARTIAL_DIR).exists()
    assert tree_bytes(out) == {"a/hello.txt": b"hello\n", "b.txt": b"hello\n"}


def test_seed_serves_the_whole_copy_of_a_file_the_folder_holds_twice(tmp_path: Path, swarm: Swarm) -> None:
    # Two members with the same bytes have one cascade hash, served once: it was from the
    # first one met, so a damaged first copy hid a whole second one and no fetch completed.
    root = tmp_path / "ds"
    root.mkdir()
    data = bytes(range(256)) * 200  # 51,200 bytes: 4 blocks of 16 KiB
    (root / "a-copy.bin").write_bytes(data)
    (root / "b-copy.bin").write_bytes(data)
    out = create(root)
    coll = parse_collection(out.read_bytes())
    assert coll.members[0].cascade_hash == coll.members[1].cascade_hash
    (root / "a-copy.bin").write_bytes(b"\xff" * len(data))  # damaged after create
    seeder = swarm.start("peer", "seed", str(out), "--tracker", swarm.tracker, "--listen", "127.0.0.1:0")
    port = seeder.wait_listening()
    seeder.wait_for_line(r"ds.cascade: 1/2 files complete, 4/8 blocks verified")
    wait_subscribed(swarm.tracker_port, coll.members[0].cascade_hash, port)
    fetcher = swarm.start(*fetch_args(swarm, out, tmp_path / "got", "--timeout", "30"))
    assert fetcher.wait(TIMEOUT) == 0, fetcher.stderr
    assert tree_bytes(tmp_path / "got") == {"a-copy.bin": data, "b-copy.bin": data}


def test_seed_says_a_file_that_grew_since_create_is_not_the_collection_s_but_serves_its_blocks(
    tmp_path: Path, swarm: Swarm
) -> None:
    # cascade verify calls such a file incomplete; the seed log called it complete.
    root = tmp_path / "ds"
    root.mkdir()
    data = bytes(range(256)) * 200  # 51,200 bytes: 4 blocks of 16 KiB
    (root / "grows.bin").write_bytes(data)
    (root / "same.txt").write_bytes(b"hello\n")
    out = create(root)
    with (root / "grows.bin").open("ab") as f:
        f.write(b"appended later\n")
    seeder = swarm.start("peer", "seed", str(out), "--tracker", swarm.tracker, "--listen", "127.0.0.1:0")
    port = seeder.wait_listening()
    seeder.wait_for_line(r"ds.cascade: 1/2 files complete, 5/5 blocks verified")
    seeder.wait_for_line(
        rf"grows.bin: 4/4 blocks verified, but the file is {len(data) + 15} bytes, expected {len(data)}:"
        r" its blocks are served"
    )
    coll = parse_collection(out.read_bytes())
    wait_subscribed(swarm.tracker_port, coll.members[0].cascade_hash, port)
    fetcher = swarm.start(*fetch_args(swarm, out, tmp_path / "got", "--timeout", "30"))
    assert fetcher.wait(TIMEOUT) == 0, fetcher.stderr
    assert tree_bytes(tmp_path / "got") == {"grows.bin": data, "same.txt": b"hello\n"}
