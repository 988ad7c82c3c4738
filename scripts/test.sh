#!/usr/bin/env bash
# The project's test command: install with the test extra, lint, type-check, run pytest.
# Works on a fresh machine with only Python 3.11+ and pip.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

# The browser test needs chromium; install it when we can (root, apt), else it skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing chromium for the browser test" >&2
    # Bounded in time: a machine without a usable mirror must not stall the suite.
    if ! { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium; } </dev/null >&2; then
        echo "test.sh: warning: could not install chromium; the browser test will be skipped" >&2
    fi
fi

# The Redis store tests need redis-server (tests start their own, on a free port, never 6379);
# install it the same way when we can, else those tests skip and say why.
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing redis-server for the Redis store tests" >&2
    if ! { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends redis-server; } </dev/null >&2; then
        echo "test.sh: warning: could not install redis-server; the Redis store tests will be skipped" >&2
    fi
fi

# The test of a collection fetch onto a file system without hard links mounts a real exFAT
# (FUSE): install its tools the same way when we can, else that test skips and says why.
if ! command -v mount.exfat-fuse >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing exfat-fuse and exfatprogs for the exFAT test" >&2
    if ! { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends exfat-fuse exfatprogs; } </dev/null >&2; then
        echo "test.sh: warning: could not install exfat-fuse; the exFAT test will be skipped" >&2
    fi
fi

# A distribution's own Python (PEP 668 "externally managed") refuses pip installs
# outside a virtualenv; a throwaway CI machine or container is exactly where we want one.
PIP_FLAGS=(--quiet --disable-pip-version-check)
if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not (sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))'; then
    PIP_FLAGS+=(--break-system-packages)
fi
"$PYTHON" -m pip install "${PIP_FLAGS[@]}" -e '.[test]'
"$PYTHON" -m ruff check .
"$PYTHON" -m mypy
"$PYTHON" -m pytest "$@"
# The server and fetcher tests once more with the portable fallbacks forced (select(), no
# sendfile/pwrite/preadv/posix_fallocate): the code a macOS or Windows user runs (README, "Platforms").
# Every in-process server test (socketpair, loopback) and a few whole-process swarms marked
# `portable`: the other process tests run the same server and fetcher code through the same
# oscompat calls, and repeating all of them would double the suite's time (~4.5 of its 10 minutes).
CASCADE_PORTABLE=1 "$PYTHON" -m pytest -m "socketpair or loopback or portable" "$@"
