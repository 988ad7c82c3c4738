"""Collection overhead (issue 13): file size, serialize/parse time and memory per member.

Run ``python -m bench.collection_scale [--many N]``. Pure: the member ``.cascade`` files
are made up (correct lengths, repeated hashes), nothing is read or written. The figures
are in docs/collection-format.md, section 9.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import tracemalloc

from cascade.collection import Member, parse_collection, serialize_collection
from cascade.metafile import block_count_for, encode_cascade

KIB, MIB = 1 << 10, 1 << 20


def made_up_cascade(length: int, block_size: int, seed: int) -> bytes:
    h = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return encode_cascade(length, block_size, h, h * block_count_for(length, block_size))


def measure(count: int, length: int, block_size: int) -> dict[str, float | int]:
    members = [
        Member(f"data/part-{i // 1000:05d}/file-{i:06d}.bin", made_up_cascade(length, block_size, i))
        for i in range(count)
    ]
    start = time.perf_counter()
    raw = serialize_collection(members)
    serialize = time.perf_counter() - start
    del members
    start = time.perf_counter()
    parse_collection(raw)
    parse = time.perf_counter() - start
    # Memory is measured in a second parse: tracemalloc slows allocation down severalfold.
    tracemalloc.start()
    try:
        parsed = parse_collection(raw)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(parsed.members) == count
    return {
        "files": count,
        "file_length": length,
        "block_size": block_size,
        "collection_bytes": len(raw),
        "bytes_per_member": round(len(raw) / count),
        "percent_of_data": round(100 * len(raw) / (count * length), 3),
        "serialize_s": round(serialize, 3),
        "parse_s": round(parse, 3),
        "parsed_bytes_per_member": round(held / count),
        "peak_mb": round(peak / 1e6, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", type=int, default=100_000, help="files of 4 KiB in the largest case")
    args = parser.parse_args()
    for count, length, block_size in [
        (10_000, 4 * KIB, MIB),
        (10, 400 * MIB, MIB),
        (10, 400 * MIB, 64 * KIB),
        (args.many, 4 * KIB, MIB),
    ]:
        print(json.dumps(measure(count, length, block_size)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
