"""Test data and machine facts for the benchmarks."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
_BASE = 16 * MiB
_SHIFT = 64 * 1024


def make_file(path: Path, size: int) -> None:
    """Write ``size`` incompressible bytes quickly.

    os.urandom runs at ~0.3 GB/s here, too slow for 4 GiB, so each 16 MiB
    chunk is a differently shifted window of one random buffer: no two blocks
    of 1 KiB or more repeat within a few GiB.
    """
    base = memoryview(os.urandom(_BASE + _SHIFT))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        i = 0
        while off < size:
            n = min(_BASE, size - off)
            shift = (i * 4099) % _SHIFT  # 4099 is prime: windows differ for 2**16 chunks
            view = base[shift : shift + n]
            while view:
                written = os.write(fd, view)
                view = view[written:]
            off += n
            i += 1
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Single-threaded SHA-256 of a file, hex; the baseline and the output check."""
    h = hashlib.sha256()
    buf = bytearray(4 * MiB)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(mv[:n])
    return h.hexdigest()


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
    }


def loadavg() -> float:
    return os.getloadavg()[0]


def tmp_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free
