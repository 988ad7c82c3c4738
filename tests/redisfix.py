"""A real ``redis-server`` for tests: a free port on 127.0.0.1, no persistence, stopped by PID.

Never the default port 6379: a developer's own Redis must not be touched. The
server can be stopped and started again on the same port, to test that
trackers recover. Tests that need it skip (with the reason) when
``redis-server`` is not installed; ``scripts/test.sh`` installs it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

_START_DEADLINE = 10.0  # seconds for redis-server to answer PING; generous for a loaded machine


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; :meth:`start` and :meth:`stop` may be called again and again."""

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.port = free_port()
        self._dir = tempfile.mkdtemp(prefix="cascade-redis-")
        self.log_path = Path(self._dir) / "redis.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on :attr:`port` and wait for PING with a deadline; raises RuntimeError."""
        # A port freed by a stopped server can be taken meanwhile; then a new one is picked (bounded).
        for _ in range(3):
            args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            args += ["--dir", self._dir, "--logfile", str(self.log_path)]
            self.popen = subprocess.Popen(
                [self.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + _START_DEADLINE
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    break
                if _ping(self.port):
                    return
                time.sleep(0.02)
            self.stop()
            if "Address already in use" not in self.log_text():
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGKILL (Redis going away abruptly, as in a crash) and wait for it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)
        self.popen = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def command(self, *args: str) -> bytes:
        """Send one inline command and return the first reply line (for flushing between tests)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(4096)
