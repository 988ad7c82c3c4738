"""The `cascade` command, run as a user runs it: a subprocess per call.

Every error path must give a non-zero exit, exactly one line on stderr and no
traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cascade.addresses import parse_hostport
from cascade.errors import UsageError
from cascade.units import format_size, parse_size
from peer import cascade_command as cli
from peer.cascade_command import default_block_size

REPO = Path(__file__).resolve().parents[1]


def cascade(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peer.cascade_command", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def reference_cascade(data: bytes, block_size: int) -> bytes:
    sizes = len(data).to_bytes(8, "big") + block_size.to_bytes(8, "big")  # u64 length, u64 block size
    header = b"CASCADE1" + bytes(8) + sizes + hashlib.sha256(data).digest()
    return header + b"".join(hashlib.sha256(data[i : i + block_size]).digest() for i in range(0, len(data), block_size))


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    """A 1000-byte data file (16 blocks of 64 bytes) with its notes.txt.cascade beside it."""
    f = tmp_path / "notes.txt"
    f.write_bytes(random.Random(42).randbytes(1000))
    (tmp_path / "notes.txt.cascade").write_bytes(reference_cascade(f.read_bytes(), 64))
    return f


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert proc.returncode not in (0, None), proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# --- success paths ----------------------------------------------------------


@pytest.mark.process
@pytest.mark.parametrize(("size_arg", "block_size"), [("64", 64), ("1K", 1024), ("3KiB", 3072), ("1M", 1 << 20)])
def test_create_writes_the_protocol_layout(tmp_path: Path, size_arg: str, block_size: int) -> None:
    data = random.Random(block_size).randbytes(5000)
    f = tmp_path / "d.bin"
    f.write_bytes(data)
    proc = cascade("create", f, "--block-size", size_arg)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    raw = (tmp_path / "d.bin.cascade").read_bytes()
    assert raw == reference_cascade(data, block_size)
    assert hashlib.sha256(raw).hexdigest() in proc.stdout


@pytest.mark.process
def test_create_empty_file_and_default_block_size(tmp_path: Path) -> None:
    f = tmp_path / "empty"
    f.write_bytes(b"")
    out = tmp_path / "elsewhere.cascade"
    proc = cascade("create", f, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == reference_cascade(b"", 256 << 10)
    assert len(out.read_bytes()) == 64
    assert cascade("verify", out, "--data", f).returncode == 0


@pytest.mark.process
def test_create_force_overwrites(notes: Path) -> None:
    out = notes.with_name("notes.txt.cascade")
    proc = cascade("create", notes, "--block-size", "100", "--force")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == reference_cascade(notes.read_bytes(), 100)
    assert [p.name for p in notes.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.process
def test_info_human_and_json(notes: Path) -> None:
    meta = notes.with_name("notes.txt.cascade")
    raw = meta.read_bytes()
    proc = cascade("info", meta)
    assert proc.returncode == 0 and proc.stderr == ""
    for text in ["notes.txt", "1000", "64", "16", "40", hashlib.sha256(raw).hexdigest()]:
        assert text in proc.stdout
    proc = cascade("info", meta, "--json")
    assert proc.returncode == 0 and proc.stderr == ""
    info = json.loads(proc.stdout)
    assert info["cascade_hash"] == hashlib.sha256(raw).hexdigest()
    assert info["file_hash"] == hashlib.sha256(notes.read_bytes()).hexdigest()
    assert (info["data_length"], info["block_size"], info["block_count"], info["last_block_length"]) == (
        1000,
        64,
        16,
        40,
    )
    assert info["data_file"] == "notes.txt"


@pytest.mark.process
def test_verify_complete(notes: Path) -> None:
    meta = notes.with_name("notes.txt.cascade")
    proc = cascade("verify", meta)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "16 of 16" in proc.stdout
    result = json.loads(cascade("verify", meta, "--json").stdout)
    assert result["complete"] is True
    assert (result["valid_blocks"], result["block_count"], result["missing"]) == (16, 16, [])


@pytest.mark.process
@pytest.mark.parametrize("bad_block", [0, 6, 15])
def test_verify_finds_one_corrupt_block_among_sixteen(notes: Path, bad_block: int) -> None:
    data = bytearray(notes.read_bytes())
    data[bad_block * 64 + 5] ^= 0xFF
    moved = notes.with_name("copy.bin")
    moved.write_bytes(data)
    meta = notes.with_name("notes.txt.cascade")
    proc = cascade("verify", meta, "--data", moved, "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["complete"] is False
    assert (result["valid_blocks"], result["block_count"], result["missing"]) == (15, 16, [bad_block])
    human = cascade("verify", meta, "--data", moved)
    assert human.returncode == 1
    assert "15 of 16 blocks valid" in human.stdout and str(bad_block) in human.stdout


@pytest.mark.process
def test_verify_wrong_length_is_incomplete(notes: Path) -> None:
    notes.write_bytes(notes.read_bytes() + b"x")
    proc = cascade("verify", notes.with_name("notes.txt.cascade"))
    assert proc.returncode == 1
    assert "1001 bytes, expected 1000" in proc.stdout


@pytest.mark.process
def test_sample_data_verifies_and_regenerates(tmp_path: Path) -> None:
    samples = sorted((REPO / "sample_data").glob("*.cascade"))
    assert len(samples) >= 2
    for meta in samples:
        assert cascade("verify", meta).returncode == 0, meta
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_sample_data.py"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for meta in samples:
        data = meta.with_name(meta.name.removesuffix(".cascade"))
        assert (tmp_path / meta.name).read_bytes() == meta.read_bytes(), meta.name
        assert (tmp_path / data.name).read_bytes() == data.read_bytes(), data.name


# --- error paths: one line, non-zero, no traceback ----------------------------


def truncated(notes: Path) -> Path:
    p = notes.with_name("trunc.cascade")
    p.write_bytes(notes.with_name("notes.txt.cascade").read_bytes()[:40])
    return p


def wrong_magic(notes: Path) -> Path:
    p = notes.with_name("magic.cascade")
    p.write_bytes(b"TORRENT1" + notes.with_name("notes.txt.cascade").read_bytes()[8:])
    return p


def wrong_count(notes: Path) -> Path:
    p = notes.with_name("count.cascade")
    p.write_bytes(notes.with_name("notes.txt.cascade").read_bytes()[:-32])
    return p


def zero_block_size(notes: Path) -> Path:
    raw = bytearray(notes.with_name("notes.txt.cascade").read_bytes())
    raw[24:32] = bytes(8)
    p = notes.with_name("zero.cascade")
    p.write_bytes(raw)
    return p


@pytest.mark.process
@pytest.mark.parametrize("command", ["info", "verify"])
@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda n: n.with_name("missing.cascade"), "no such file"),
        (truncated, "too short"),
        (wrong_magic, "not a .cascade file"),
        (wrong_count, "expected 16 block hashes"),
        (zero_block_size, "block size is 0"),
        (lambda n: n.parent, "directory"),
    ],
    ids=["missing", "truncated", "wrong-magic", "wrong-hash-count", "zero-block-size", "directory"],
)
def test_bad_cascade_file(notes: Path, command: str, make: object, phrase: str) -> None:
    assert callable(make)
    path = make(notes)
    assert_one_line_error(cascade(command, path), phrase, str(path))


@pytest.mark.process
@pytest.mark.parametrize(
    ("size", "phrase"),
    [
        ("0", "at least 1 byte"),
        ("1.5M", "invalid block size"),
        ("10XB", "invalid block size"),
        ("2MB", "invalid block size"),
        ("-5", "invalid block size"),
        ("", "invalid block size"),
        ("2G", "largest allowed"),
    ],
)
def test_create_bad_size(notes: Path, size: str, phrase: str) -> None:
    out = notes.with_name("new.cascade")
    assert_one_line_error(cascade("create", notes, "--block-size", size, "-o", out), phrase)
    assert not out.exists()


@pytest.mark.process
def test_create_refuses_existing_out(notes: Path) -> None:
    meta = notes.with_name("notes.txt.cascade")
    before = meta.read_bytes()
    assert_one_line_error(cascade("create", notes, "--block-size", "100"), "already exists", "--force")
    assert meta.read_bytes() == before


@pytest.mark.process
def test_create_refuses_to_overwrite_its_input(notes: Path) -> None:
    before = notes.read_bytes()
    assert_one_line_error(cascade("create", notes, "-o", notes, "--force"), "data file itself")
    assert notes.read_bytes() == before


@pytest.mark.process
@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["create", "{dir}/missing.bin"], "no such data file"),
        (["create", "{dir}", "-o", "{dir}/x.cascade"], "inside"),
        (["create", "{dir}/notes.txt", "-o", "{dir}/no/such/dir/x.cascade"], "No such file or directory"),
        (["create", "{dir}/notes.txt", "-o", "{dir}", "--force"], "directory"),
        (["verify", "{dir}/notes.txt.cascade", "--data", "{dir}/missing.bin"], "no such data file"),
        (["verify", "{dir}/notes.txt.cascade", "--data", "{dir}"], "directory"),
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["create"], "required"),
        (["info", "{dir}/notes.txt.cascade", "--bogus"], "unrecognized"),
    ],
    ids=[
        "create-missing",
        "create-collection-inside-its-folder",
        "create-out-in-missing-dir",
        "create-out-is-directory",
        "verify-missing-data",
        "verify-data-is-directory",
        "no-command",
        "unknown-command",
        "create-no-file",
        "unknown-option",
    ],
)
def test_error_paths(notes: Path, args: list[str], phrase: str) -> None:
    proc = cascade(*(a.format(dir=notes.parent) for a in args))
    assert_one_line_error(proc, phrase)


@pytest.mark.process
def test_verify_missing_default_data(notes: Path) -> None:
    notes.unlink()
    assert_one_line_error(cascade("verify", notes.with_name("notes.txt.cascade")), "no such data file", "--data")


@pytest.mark.process
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_data(notes: Path) -> None:
    notes.chmod(0)
    try:
        assert_one_line_error(cascade("verify", notes.with_name("notes.txt.cascade")), "Permission denied")
        assert_one_line_error(cascade("create", notes, "-o", notes.with_name("x.cascade")), "Permission denied")
    finally:
        notes.chmod(0o644)


@pytest.mark.unit
def test_interrupt_is_one_line_and_130(
    notes: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "create_metafile", interrupted)
    assert cli.main(["create", str(notes), "-o", str(notes.with_name("i.cascade"))]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["cascade: interrupted"]
    assert not notes.with_name("i.cascade").exists()


@pytest.mark.unit
def test_main_returns_codes_in_process(notes: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", str(notes.with_name("notes.txt.cascade"))]) == 0
    assert cli.main(["info", str(notes.with_name("nope.cascade"))]) == 1  # the operation failed
    assert cli.main(["--version"]) == 0
    assert cli.main([]) == 2
    capsys.readouterr()


@pytest.mark.unit
def test_format_ranges() -> None:
    assert cli.format_ranges([]) == ""
    assert cli.format_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert cli.format_ranges(list(range(0, 100, 2)), limit=2) == "0, 2, ... (48 more ranges)"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("100", 100),
        ("100B", 100),
        ("64K", 65536),
        ("64k", 65536),
        ("64KiB", 65536),
        ("1M", 1 << 20),
        ("2 MiB", 2 << 20),
        ("1G", 1 << 30),
        ("1gib", 1 << 30),
        (" 7 ", 7),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "K", "1.5M", "-1", "1KB", "1MB", "1GB", "1T", "1 M B", "١٢"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="K, M, G, KiB, MiB or GiB"):
        parse_size(text)


@pytest.mark.unit
@pytest.mark.parametrize("text", ["0", "0K", " 0 MiB"])
def test_parse_size_nonzero_rejects_zero_in_one_message(text: str) -> None:
    assert parse_size(text) == 0
    with pytest.raises(UsageError) as exc:
        parse_size(text, "file size", nonzero=True)
    assert str(exc.value) == f"invalid file size {text!r}: it must be at least 1 byte"


@pytest.mark.unit
def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1023, 1024, 1536, 1 << 20, 5 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "1.0 MiB",
        "5.0 GiB",
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "default_host", "value"),
    [
        ("127.0.0.1:8888", None, ("127.0.0.1", 8888)),
        ("[::1]:80", None, ("::1", 80)),
        (":0", "127.0.0.1", ("127.0.0.1", 0)),
        ("6666", "0.0.0.0", ("0.0.0.0", 6666)),
    ],
)
def test_parse_hostport(text: str, default_host: str | None, value: tuple[str, int]) -> None:
    assert parse_hostport(text, default_host=default_host) == value


@pytest.mark.unit
@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:", "host:65536", "host:-1", "host:٣", ":80"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_hostport(text)


@pytest.mark.unit
def test_progress_bar_only_on_a_terminal_for_large_work(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with cli.progress_bar(1 << 40, "x") as progress:
        assert progress is None  # not a terminal: silence
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    with cli.progress_bar(cli.PROGRESS_THRESHOLD - 1, "x") as progress:
        assert progress is None  # small work: no bar
    with cli.progress_bar(cli.PROGRESS_THRESHOLD, "hashing") as progress:
        assert progress is not None
        progress(cli.PROGRESS_THRESHOLD)
    assert "hashing" in tty.getvalue()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("length", "block_size"),
    [
        (0, 256 << 10),
        (256 << 10, 256 << 10),  # one block stays one block
        ((256 << 10) + 1, 64 << 10),
        (16 << 20, 64 << 10),  # never under 64 KiB, even with fewer than 512 blocks
        (32 << 20, 64 << 10),
        (64 << 20, 128 << 10),  # issue 11's 64 MiB swarm file: 512 blocks, not 256
        (127 << 20, 128 << 10),
        ((511 << 18) + 1, 256 << 10),  # 512 blocks of 256 KiB: the smallest file that keeps the default
        (1 << 30, 256 << 10),
        (16 << 30, 256 << 10),  # 65,536 blocks of 256 KiB: the last size that keeps the default
        ((16 << 30) + 1, 512 << 10),
        (64 << 30, 1 << 20),
        (1 << 40, 16 << 20),
        (1 << 62, 1 << 30),  # never beyond the largest block allowed
    ],
)
def test_the_default_block_size_keeps_a_file_within_512_to_65536_blocks(length: int, block_size: int) -> None:
    assert default_block_size(length) == block_size


@pytest.mark.unit
@pytest.mark.parametrize(
    ("head", "items"),
    [
        ({"count": 0}, []),
        ({"a": 1, "b": "x"}, [{"path": "caf\xe9\n\u202e", "length": 2}]),
        ({}, [{"p": 1}, {"q": [1, {"r": None}]}, {}]),
    ],
)
def test_a_long_json_list_is_printed_one_item_at_a_time_as_json_dumps_prints_it(
    head: dict[str, object], items: list[dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    # cascade info --json of a million members: the same text, without the million dicts and one huge string.
    cli.print_json_with_list(head, "members", iter(items))
    assert capsys.readouterr().out == json.dumps({**head, "members": items}, indent=2) + "\n"


def test_a_summary_after_the_long_list_is_printed_as_json_dumps_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    # cascade verify --json of a collection: the counts are known only once every file was checked.
    items = [{"path": "a", "ok": True}, {"path": "b", "ok": False}]
    tail = {"complete": False, "complete_files": 1, "nested": {"x": [1, 2]}}
    cli.print_json_with_list({"count": 2}, "files", iter(items), lambda: tail)
    assert capsys.readouterr().out == json.dumps({"count": 2, "files": items, **tail}, indent=2) + "\n"
    cli.print_json_with_list({}, "files", iter([]), lambda: {"complete": True})
    assert capsys.readouterr().out == json.dumps({"files": [], "complete": True}, indent=2) + "\n"
