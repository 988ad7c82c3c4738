"""The tracker's status page, rendered by a real headless Chromium.

`scripts/test.sh` installs Debian's `chromium` when it is missing (as root,
with apt); without a browser this test is skipped, saying why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.procs import Proc

pytestmark = pytest.mark.process

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"
CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = name if os.path.isabs(name) and os.access(name, os.X_OK) else shutil.which(name)
        if path:
            return path
    return None


def dump_dom(browser: str, url: str) -> str:
    with tempfile.TemporaryDirectory(prefix="cascade-chromium-") as profile:
        r = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=45,
            stdin=subprocess.DEVNULL,
        )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_status_page_in_chromium_shows_a_running_seeders_swarm(tmp_path: Path) -> None:
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium found (tried /usr/bin/chromium and PATH); scripts/test.sh installs it on CI")
    shutil.copy(SAMPLES / "poem.txt", tmp_path)
    shutil.copy(SAMPLES / "poem.txt.cascade", tmp_path)
    cascade_hash = hashlib.sha256((tmp_path / "poem.txt.cascade").read_bytes()).hexdigest()
    tracker = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"])
    seeder: Proc | None = None
    try:
        tracker.wait_listening()
        http = int(tracker.wait_for_line(r"tracker http on (\S+):(\d+)").group(2))
        url = f"http://127.0.0.1:{http}/"
        seeder = Proc(["peer", "seed", str(tmp_path / "poem.txt.cascade"), "--tracker", url, "--listen", "127.0.0.1:0"])
        deadline = time.monotonic() + 10
        while requests.get(f"{url}api/v1/swarms/{cascade_hash}/peers", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the seeder never reached the tracker:\n" + seeder.stderr
            time.sleep(0.05)
        requests.put(
            f"{url}api/v1/cascades",
            data=(tmp_path / "poem.txt.cascade").read_bytes(),
            timeout=5,
            params={"name": "poem.txt"},
        ).raise_for_status()
        dom = dump_dom(browser, url)
        assert "Cascade tracker" in dom
        assert cascade_hash in dom
        assert "poem.txt" in dom
        assert '<meta http-equiv="refresh"' in dom
    finally:
        if seeder is not None:
            seeder.stop()
        tracker.stop()
