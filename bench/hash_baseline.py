"""Single-core hashlib over a file: the baseline of the verify case.

``python -m bench.hash_baseline FILE [BLOCK_SIZE]`` reads the file in 4 MiB
``readinto`` chunks on one thread and feeds one ``hashlib.sha256`` (one pass).
With BLOCK_SIZE it also hashes every block, as ``cascade verify`` must: the
same two passes of work on one core. Prints ``{"seconds": S}``, timed in-process.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

CHUNK = 4 << 20


def main(argv: list[str]) -> int:
    path = argv[0]
    block = int(argv[1]) if len(argv) > 1 else 0
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    t0 = time.perf_counter()
    whole = hashlib.sha256()
    sha = hashlib.sha256
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            whole.update(mv[:n])
            if block:
                for i in range(0, n, block):
                    sha(mv[i : min(n, i + block)]).digest()
    whole.digest()
    print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
