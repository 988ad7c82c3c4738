"""Regenerate sample_data/: small files made by the project itself, and their .cascade files.

Deterministic (seeded), so running it again gives byte-identical files:

    python scripts/make_sample_data.py [OUT_DIR]     # default: sample_data/
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from cascade.metafile import default_cascade_path
from peer.localdata import create_metafile

SEED = 20261121
WORDS = [
    "block",
    "peer",
    "tracker",
    "swarm",
    "hash",
    "seed",
    "leech",
    "cascade",
    "verify",
    "fetch",
    "serve",
    "chunk",
    "byte",
    "file",
    "river",
    "stone",
    "light",
    "wind",
    "field",
    "north",
    "quiet",
    "early",
    "green",
    "small",
    "bright",
    "open",
    "slow",
]

# (name, block size): the text is an exact multiple of its block size, the binary
# file ends in a short last block.
TEXT = ("poem.txt", 16 << 10)
BINARY = ("noise.bin", 64 << 10)
TEXT_LENGTH = 128 << 10  # 8 blocks of 16 KiB exactly
BINARY_LENGTH = 200_123  # 3 blocks of 64 KiB and a last block of 3,515 bytes


def make_text(rng: random.Random, length: int) -> bytes:
    """Lines of pseudo-random words, cut to exactly ``length`` bytes and ending in a newline."""
    out = bytearray()
    while len(out) < length:
        words = 3 + rng.getrandbits(3)
        out += (" ".join(WORDS[rng.getrandbits(16) % len(WORDS)] for _ in range(words)) + "\n").encode()
    return bytes(out[: length - 1]) + b"\n"


def make_binary(rng: random.Random, length: int) -> bytes:
    """Random bytes with runs of NUL bytes in them (NULs trip up careless text handling)."""
    data = bytearray(rng.getrandbits(8 * length).to_bytes(length, "little"))
    for _ in range(16):
        start = rng.getrandbits(24) % length
        end = min(length, start + 1 + rng.getrandbits(10))
        data[start:end] = bytes(end - start)
    return bytes(data[:length])


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "sample_data"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    files = [(TEXT, make_text(rng, TEXT_LENGTH)), (BINARY, make_binary(rng, BINARY_LENGTH))]
    for (name, block_size), data in files:
        path = out / name
        path.write_bytes(data)
        default_cascade_path(path).write_bytes(create_metafile(path, block_size))
        print(f"wrote {path} ({len(data)} bytes) and {default_cascade_path(path).name} (blocks of {block_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
