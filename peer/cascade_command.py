"""The ``cascade`` command: create, inspect and verify ``.cascade`` files.

Each subcommand is one ``cmd_*`` function taking the parsed arguments and
returning an exit code, plus one ``register_*`` function adding its parser;
:data:`SUBCOMMANDS` lists the registrations. :func:`main` runs them through
:func:`cascade.command.run_command`, the boundary shared with ``peer`` and
``tracker`` where errors become one line on stderr and an exit code (0
success, 1 failed or ``verify`` found the data incomplete, 2 bad usage, 130
interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cascade import __version__
from cascade.collection import Collection, Member, parse_collection
from cascade.command import EXIT_FAILED, EXIT_OK, OneLineErrorParser, run_command
from cascade.errors import DataError, UsageError, from_os_error
from cascade.metafile import (
    MAX_BLOCK_SIZE,
    CascadeFile,
    default_cascade_path,
    default_data_path,
    parse_cascade,
)
from cascade.units import format_size, parse_size
from peer.collection_local import MemberCheck, check_members, create_collection, walk_tree
from peer.localdata import Progress, check_data, create_metafile
from peer.metafiles import read_metafile
from peer.publish_command import register_publish

# The default follows the file's size, as BitTorrent tools size pieces (for a 64 MiB file
# Transmission's makemeta picks 64 KiB, libtorrent 2.1's create_torrent 128 KiB, and 256 KiB
# for 256 MiB): a swarm's start and tail each cost a few block times on every hop, so what
# must stay large is the block count, not the block. From 256 KiB,
# a file of more than one block is cut in halves down to 64 KiB until it has DEFAULT_MIN_BLOCKS
# blocks. On the emulated LAN a 64 MiB file (256 blocks of 256 KiB) fetched by 16 hosts at
# 40 Mbit/s took 16.1 s in 128 KiB blocks against 17.2 s in 256 KiB, every other scenario as
# fast or faster (BENCHMARKS.md "The default block size follows the file size"). 64 KiB blocks
# (1,024) took 15.8 s, but their CPU rose past the 256 KiB figure of issue 11's baseline with
# slow fetchers (10.6 s against 9.3); under 64 KiB the fixed cost of a block (a request, a
# header, a hash call, Python) would make a fast link CPU-bound. From 128 MiB up the default is
# 256 KiB: measured faster than 1 MiB on the emulated LAN and, blocks being written behind the
# connection, on loopback (BENCHMARKS.md "Default block size"), where every block costs CPU.
# Larger files get the smallest power of two that keeps them within DEFAULT_MAX_BLOCKS blocks:
# the hash list and have maps stay small.
DEFAULT_BLOCK_SIZE = 256 << 10
DEFAULT_MIN_BLOCK_SIZE = 64 << 10
DEFAULT_MIN_BLOCKS = 512
DEFAULT_MAX_BLOCKS = 65536

# Below this size hashing takes well under a second, so a progress bar would only flicker.
PROGRESS_THRESHOLD = 64 << 20

EXIT_INCOMPLETE = EXIT_FAILED  # verify found missing or corrupt data: the check failed

Command = Callable[[argparse.Namespace], int]


# --- progress ---------------------------------------------------------------


@contextlib.contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Progress | None]:
    """A tqdm bar on stderr for large work when stderr is a terminal; otherwise nothing."""
    if total < PROGRESS_THRESHOLD or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm  # imported here: most runs never draw a bar

    with tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False
    ) as bar:
        yield bar.update


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # the real error surfaces when the file is opened


# --- create -----------------------------------------------------------------


def default_block_size(data_length: int) -> int:
    """What ``cascade create`` picks without ``--block-size`` for a file of ``data_length`` bytes.

    256 KiB, doubled until the file has at most 65,536 blocks, or halved (down to
    64 KiB) while it has fewer than 512 and more than one block.
    """
    size = DEFAULT_BLOCK_SIZE
    while -(-data_length // size) > DEFAULT_MAX_BLOCKS and size < MAX_BLOCK_SIZE:
        size *= 2
    while size > DEFAULT_MIN_BLOCK_SIZE and data_length > size and -(-data_length // size) < DEFAULT_MIN_BLOCKS:
        size //= 2
    return size


def _size_arg(size: int) -> str:
    """``size`` as a ``--block-size`` value (a power of two of at least 1 KiB)."""
    return f"{size >> 20}MiB" if size >= 1 << 20 else f"{size >> 10}KiB"


def parse_block_size(text: str) -> int:
    """A ``--block-size`` value: 1 byte to ``MAX_BLOCK_SIZE``; raises :class:`UsageError`."""
    size = parse_size(text, "block size", nonzero=True)
    if size > MAX_BLOCK_SIZE:
        raise UsageError(f"invalid block size {text!r}: the largest allowed is {format_size(MAX_BLOCK_SIZE)}")
    return size


# A hash list beyond this many blocks is absurd (a .cascade of 32 MiB; 1 TB at 1 MiB blocks).
MAX_SANE_BLOCKS = 1_000_000
# Blocks under 1 KiB cost more in per-block work and hash bytes than they carry;
# a file of more than this many of them is a mistake (arbitrary: a toy or test
# file of a few dozen tiny blocks is harmless).
MIN_SANE_BLOCK_SIZE = 1024
MAX_SMALL_BLOCKS = 1024


def check_block_size(data_length: int, block_size: int) -> None:
    """Raise :class:`UsageError` when ``block_size`` is absurd for a file of ``data_length`` bytes.

    The message gives the block count, the .cascade size and a sensible size.
    """
    count = -(-data_length // block_size)
    if count <= MAX_SANE_BLOCKS and (block_size >= MIN_SANE_BLOCK_SIZE or count <= MAX_SMALL_BLOCKS):
        return
    raise UsageError(
        f"a block size of {block_size} bytes cuts {format_size(data_length)} into {count:,} blocks "
        f"(a .cascade of {format_size(32 * count)}); use --block-size {_size_arg(default_block_size(data_length))}, "
        "or --force to write it anyway"
    )


def _write_new(path: Path, data: bytes, force: bool) -> None:
    """Write ``data`` to ``path``: exclusively without ``force``, else atomically replacing it.

    Raises :class:`UsageError` for an existing ``path`` without ``force``, :class:`DataError`.
    """
    if not force:
        try:
            with path.open("xb") as f:
                f.write(data)
        except FileExistsError as exc:
            raise UsageError(f"{path} already exists; use --force to overwrite it") from exc
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise from_os_error(exc, path, "write the .cascade file") from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise from_os_error(exc, path, "write the .cascade file") from exc
    finally:
        tmp.unlink(missing_ok=True)


def cmd_create(args: argparse.Namespace) -> int:
    given = parse_block_size(args.block_size) if args.block_size is not None else None
    data_path = Path(args.file)
    if data_path.is_dir():
        return _create_collection(args, data_path, given)
    block_size = given if given is not None else default_block_size(_size_of(data_path))
    out = Path(args.output) if args.output else default_cascade_path(data_path)
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; use --force to overwrite it")
    if out.exists() and data_path.exists() and out.samefile(data_path):
        raise UsageError(f"{out} is the data file itself; choose another output path")
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give a file name with -o")
    if not args.force:
        check_block_size(_size_of(data_path), block_size)
    with progress_bar(_size_of(data_path), f"hashing {data_path.name}") as progress:
        raw = create_metafile(data_path, block_size, progress=progress)
    _write_new(out, raw, args.force)
    cf = parse_cascade(raw, str(out))
    blocks = f"{cf.block_count} block{'s' if cf.block_count != 1 else ''}"
    print(f"wrote {out}: {cf.data_length} bytes in {blocks} of {format_size(block_size)}")
    print(f"cascade hash {cf.cascade_hash.hex()}")
    return EXIT_OK


def _create_collection(args: argparse.Namespace, folder: Path, given: int | None) -> int:
    """``cascade create DIR``: write ``DIR.cascade``, a collection of every regular file under DIR.

    Every member in blocks of ``given``; else each in the default for its own length, the
    block size ``cascade create FILE`` gives that file, so that it keeps the cascade hash
    (and swarm) of its single-file share (docs/collection-format.md section 7).
    """
    name = folder.resolve().name
    if not name:
        raise UsageError(f"{folder}: cannot name a collection after the root folder; give -o OUT")
    # "ds" and "ds/" give ds.cascade; "." and ".." are named after the folder they are.
    default = (
        default_cascade_path(folder) if folder.name not in ("", "..") else folder.resolve().with_name(name + ".cascade")
    )
    out = Path(args.output) if args.output else default
    if out.exists() and not args.force:
        raise UsageError(f"{out} already exists; use --force to overwrite it")
    if out.is_dir():
        raise UsageError(f"{out} is a directory; give a file name with -o")
    if out.resolve().is_relative_to(folder.resolve()):
        raise UsageError(f"{out} is inside {folder}; write the collection outside the folder it describes")
    tree = walk_tree(folder)  # every path checked, no clash, before anything is hashed
    for line in tree.skipped[:SKIPPED_SHOWN]:
        print(f"cascade create: warning: {folder}: {line}", file=sys.stderr)
    if len(tree.skipped) > SKIPPED_SHOWN:
        print(
            f"cascade create: warning: {folder}: {len(tree.skipped) - SKIPPED_SHOWN} more links or special files"
            " skipped",
            file=sys.stderr,
        )
    if given is not None and not args.force:
        for f in tree.files:
            try:
                check_block_size(f.size, given)
            except UsageError as exc:
                raise UsageError(f"{folder / f.on_disk}: {exc}") from exc
    with progress_bar(tree.total, f"hashing {name}") as progress:
        raw = create_collection(folder, tree, given if given is not None else default_block_size, progress=progress)
    _write_new(out, raw, args.force)
    coll = parse_collection(raw, str(out))
    files = f"{len(coll.members)} file{'s' if len(coll.members) != 1 else ''}"
    sizes = sorted({m.block_size for m in coll.members})
    blocks = format_size(sizes[0]) + (f" to {format_size(sizes[-1])}" if len(sizes) > 1 else "")
    print(f"wrote {out}: {files}, {coll.total_length} bytes in blocks of {blocks}")
    print(f"collection hash {coll.collection_hash.hex()}")
    return EXIT_OK


# Warnings for skipped links and special files beyond this many are counted, not listed (arbitrary).
SKIPPED_SHOWN = 20


def register_create(sub: Any) -> None:
    p = sub.add_parser(
        "create",
        help="write FILE.cascade describing FILE (or DIR.cascade, a collection, describing a folder)",
        description="Hash FILE into a .cascade, or every regular file under DIR into the collection DIR.cascade.",
    )
    p.add_argument("file", metavar="FILE|DIR", help="the data file, or the folder, to describe")
    p.add_argument(
        "--block-size",
        metavar="SIZE",
        help="bytes per block, with an optional K, M, G, KiB, MiB or GiB suffix (default: 256KiB, halved"
        " down to 64KiB while a file under 128 MiB has fewer than 512 blocks, doubled for files over"
        " 16 GiB to keep them within 65,536 blocks; in a folder, each file's own)",
    )
    p.add_argument(
        "-o", "--output", metavar="OUT", help="where to write the .cascade (default: FILE.cascade or DIR.cascade)"
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite OUT if it exists; accept a block size absurd for FILE"
    )
    p.set_defaults(run=cmd_create)


# --- info -------------------------------------------------------------------


def describe(cf: CascadeFile, cascade_path: Path) -> dict[str, Any]:
    """The fields of ``cascade info --json`` (hashes in lowercase hex)."""
    return {
        "cascade_file": str(cascade_path),
        "data_file": default_data_path(cascade_path).name,
        "data_length": cf.data_length,
        "block_size": cf.block_size,
        "block_count": cf.block_count,
        "last_block_length": cf.last_block_length,
        "file_hash": cf.file_hash.hex(),
        "cascade_hash": cf.cascade_hash.hex(),
        "first_block_hash": cf.block_hash(0).hex() if cf.block_count else None,
        "last_block_hash": cf.block_hash(cf.block_count - 1).hex() if cf.block_count else None,
    }


def describe_collection(coll: Collection, path: Path) -> dict[str, Any]:
    """The fields of ``cascade info --json`` for a collection (hashes in lowercase hex)."""
    return {**_collection_head(coll, path), "members": [_member_fields(m) for m in coll.members]}


def _collection_head(coll: Collection, path: Path) -> dict[str, Any]:
    """The fields of :func:`describe_collection` but its members."""
    return {
        "collection_file": str(path),
        "folder": default_data_path(path).name,
        "collection_hash": coll.collection_hash.hex(),
        "count": len(coll.members),
        "total_length": coll.total_length,
    }


def _member_fields(m: Member) -> dict[str, Any]:
    return {"path": m.path, "length": m.data_length, "block_size": m.block_size, "cascade_hash": m.cascade_hash.hex()}


def print_json_with_list(
    head: dict[str, Any],
    key: str,
    items: Iterable[dict[str, Any]],
    tail: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Print ``json.dumps({**head, key: list(items), **tail()}, indent=2)``, the same text, one item made at a time.

    For a collection's members: a million of them as dicts, then as one string,
    took gigabytes where the parsed collection takes a few hundred megabytes.
    ``tail`` is called once the items are out (a summary counted while they were made).
    """
    text = json.dumps({**head, key: []}, indent=2)  # ends with '"KEY": []\n}': the list goes there
    out = sys.stdout
    out.write(text[: -len("]\n}")])
    sep = "\n"
    encode = json.JSONEncoder(indent=2).encode  # one encoder, not one per item as json.dumps makes
    for item in items:
        out.write(sep + "    " + encode(item).replace("\n", "\n    "))
        sep = ",\n"
    out.write("]" if sep == "\n" else "\n  ]")
    for name, value in (tail() if tail is not None else {}).items():
        out.write(",\n  " + json.dumps(name) + ": " + encode(value).replace("\n", "\n  "))
    out.write("\n}\n")
    out.flush()


def tree_lines(coll: Collection) -> Iterator[str]:
    """The members as an indented tree: each folder once, then its files with their sizes."""
    shown: list[str] = []  # the folders of the previous path
    for m in coll.members:
        *dirs, name = m.path.split("/")
        common = 0
        while common < min(len(dirs), len(shown)) and dirs[common] == shown[common]:
            common += 1
        for depth in range(common, len(dirs)):
            yield f"{'  ' * (depth + 1)}{dirs[depth]}/"
        shown = dirs
        yield f"{'  ' * (len(dirs) + 1)}{name}  {format_size(m.data_length)}"


def _info_collection(args: argparse.Namespace, path: Path, coll: Collection) -> int:
    info = _collection_head(coll, path)
    if args.json:
        print_json_with_list(info, "members", map(_member_fields, coll.members))
        return EXIT_OK
    count = len(coll.members)
    size = format_size(coll.total_length)
    print(f"collection:     {info['folder']}/, {count} file{'s' if count != 1 else ''}, {size}")
    print(f"collection hash {info['collection_hash']}")
    print(f"{info['folder']}/")
    for line in tree_lines(coll):
        print(line)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.cascade)
    read = read_metafile(path)
    if isinstance(read, Collection):
        return _info_collection(args, path, read)
    cf = read
    info = describe(cf, path)
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    rows = [
        ("data file", info["data_file"]),
        ("data length", f"{cf.data_length} bytes ({format_size(cf.data_length)})"),
        ("block size", f"{cf.block_size} bytes ({format_size(cf.block_size)})"),
        ("block count", str(cf.block_count)),
        ("last block", f"{cf.last_block_length} bytes"),
        ("file hash", info["file_hash"]),
        ("cascade hash", info["cascade_hash"]),
    ]
    for name, value in rows:
        print(f"{name + ':':<14}{value}")
    return EXIT_OK


def register_info(sub: Any) -> None:
    p = sub.add_parser("info", help="show what a .cascade file describes", description="Show a .cascade file.")
    p.add_argument("cascade", metavar="FILE.cascade")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_info)


# --- verify -----------------------------------------------------------------


def format_ranges(indices: Sequence[int], limit: int = 20) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``, cut after ``limit`` ranges."""
    ranges: list[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        ranges.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    shown = ", ".join(ranges[:limit])
    return shown + (f", ... ({len(ranges) - limit} more ranges)" if len(ranges) > limit else "")


def _verify_collection(args: argparse.Namespace, path: Path, coll: Collection) -> int:
    folder = Path(args.data) if args.data else default_data_path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (give the collection's folder with --data)")
    complete = 0
    count = len(coll.members)

    def checked(progress: Progress | None) -> Iterator[tuple[MemberCheck, bool]]:
        nonlocal complete
        for mc, _fd in check_members(folder, coll, whole_file=True, progress=progress):
            ok = mc.check.complete and mc.present
            complete += ok
            yield mc, ok

    with progress_bar(coll.total_length, f"verifying {folder.name}") as progress:
        if args.json:
            # One file's fields at a time: a million members as dicts first took gigabytes.
            head = {
                "data_folder": str(folder),
                "collection_hash": coll.collection_hash.hex(),
                "count": count,
                "total_length": coll.total_length,
            }
            print_json_with_list(
                head,
                "files",
                (_verified_fields(mc, ok) for mc, ok in checked(progress)),
                lambda: {"complete": complete == count, "complete_files": complete},
            )
            return EXIT_OK if complete == count else EXIT_INCOMPLETE
        for mc, _ok in checked(progress):
            if mc.problem is not None:
                print(f"{mc.problem}: counted as missing")
            elif not mc.present:
                print(f"{folder / mc.member.path}: missing")
            else:
                check = mc.check
                print(
                    _verdict(
                        folder / mc.member.path,
                        mc.cf,
                        check.valid_count,
                        check.size,
                        bool(check.file_hash_ok),
                        check.missing(),
                    )
                )
    if complete == count:
        print(f"{folder}: complete, all {count} files valid ({format_size(coll.total_length)})")
        return EXIT_OK
    print(f"{folder}: incomplete, {complete} of {count} files complete")
    return EXIT_INCOMPLETE


def _verified_fields(mc: MemberCheck, ok: bool) -> dict[str, Any]:
    """One file of ``cascade verify --json`` of a collection."""
    return {
        "path": mc.member.path,
        "complete": ok,
        "present": mc.present,
        "valid_blocks": mc.check.valid_count,
        "block_count": mc.cf.block_count,
        "data_length": mc.check.size,
        "expected_length": mc.cf.data_length,
        "file_hash_ok": bool(mc.check.file_hash_ok),
        "problem": mc.problem,
    }


def cmd_verify(args: argparse.Namespace) -> int:
    cascade_path = Path(args.cascade)
    read = read_metafile(cascade_path)
    if isinstance(read, Collection):
        return _verify_collection(args, cascade_path, read)
    cf = read
    data_path = Path(args.data) if args.data else default_data_path(cascade_path)
    if not data_path.exists():
        raise DataError(f"{data_path}: no such data file (give its path with --data)")
    with progress_bar(min(_size_of(data_path), cf.data_length), f"verifying {data_path.name}") as progress:
        check = check_data(data_path, cf, whole_file=True, progress=progress)
    missing = check.missing()
    if args.json:
        result = {
            "data_file": str(data_path),
            "complete": check.complete,
            "valid_blocks": check.valid_count,
            "block_count": cf.block_count,
            "missing": missing,
            "data_length": check.size,
            "expected_length": cf.data_length,
            "file_hash_ok": bool(check.file_hash_ok),
        }
        print(json.dumps(result, indent=2))
    else:
        print(_verdict(data_path, cf, check.valid_count, check.size, bool(check.file_hash_ok), missing))
    return EXIT_OK if check.complete else EXIT_INCOMPLETE


def _verdict(data_path: Path, cf: CascadeFile, valid: int, size: int, file_ok: bool, missing: list[int]) -> str:
    counts = f"{valid} of {cf.block_count} blocks valid"
    if file_ok and valid == cf.block_count:
        return f"{data_path}: complete, {counts}, whole-file hash matches"
    if missing:
        return f"{data_path}: incomplete, {counts}; missing or corrupt: {format_ranges(missing)}"
    if size != cf.data_length:
        return f"{data_path}: incomplete, {counts}, but the file is {size} bytes, expected {cf.data_length}"
    return f"{data_path}: incomplete, {counts}, but the whole-file hash does not match the .cascade"


def register_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="check a data file block by block",
        description="Check a data file against its .cascade. Exit 0 if complete, 1 if not or on an error, "
        "2 for bad usage.",
    )
    p.add_argument("cascade", metavar="FILE.cascade")
    p.add_argument(
        "--data",
        metavar="PATH",
        help="the data file, or a collection's folder (default: FILE or DIR beside FILE.cascade or DIR.cascade)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=cmd_verify)


def cmd_demo(args: argparse.Namespace) -> int:
    from peer import demo  # imported here: only the demo starts processes

    return demo.run(fetchers=args.fetchers, keep=args.keep)


def register_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run a tracker, a seeder and fetchers on this machine and watch a file cascade",
        description="Start a tracker, an upload-limited seeder of a random sample file and a few fetchers on "
        "127.0.0.1, show their progress, check every copy and print where each block came from.",
    )
    p.add_argument("--fetchers", type=int, default=4, metavar="N", help="how many fetchers to start (default 4)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the swarm and its status page running until Ctrl-C, and keep the folder with the files and logs",
    )
    p.set_defaults(run=cmd_demo)


# --- the command ------------------------------------------------------------

# To add a subcommand: write cmd_X(args) -> int and register_X(sub), and list register_X here.
SUBCOMMANDS: list[Callable[[Any], None]] = [
    register_create,
    register_info,
    register_verify,
    register_demo,
    register_publish,
]


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="cascade", description="Create, inspect and verify .cascade files.")
    parser.add_argument("--version", action="version", version=f"cascade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    run: Command = args.run
    try:
        return run(args)
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`); nothing left to say.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cascade`` command; returns the exit code (:mod:`cascade.command`)."""
    return run_command("cascade", build_parser(), argv, _run)


if __name__ == "__main__":
    raise SystemExit(main())
