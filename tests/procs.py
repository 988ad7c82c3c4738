"""Start real Cascade processes for tests and stop them by PID.

Processes are started as ``python -m tracker|peer|cascade ...`` so tests do not
depend on PATH. Their stderr goes to a log file; :meth:`Proc.wait_for_line`
polls that file with a deadline instead of sleeping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LISTENING = re.compile(r"listening on (\S+):(\d+)")
# Server log lines start with the time (2026-11-30T19:17:31.916); tests compare what follows.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} ", re.MULTILINE)


def messages(log: str) -> list[str]:
    """The lines of a server log without their timestamps."""
    return TIMESTAMP.sub("", log).splitlines()


# The module each command runs as: ``cascade`` lives in the peer package
# (its pure core, ``cascade/``, has no command-line program of its own).
MODULES = {"cascade": "peer.cascade_command", "peer": "peer", "tracker": "tracker"}


def command_line(args: Sequence[str]) -> list[str]:
    """``python -m MODULE ARGS`` for a command line such as ``["peer", "seed", ...]``."""
    return [sys.executable, "-m", MODULES.get(args[0], args[0]), *args[1:]]


class Proc:
    """A child process with its stderr captured in a file."""

    def __init__(
        self,
        args: Sequence[str],
        cwd: str | os.PathLike[str] | None = None,
        stdout_to_file: bool = True,
        env: Mapping[str, str] | None = None,
    ):
        """Start ``args`` (see :func:`command_line`); ``env`` adds to (not replaces) this environment."""
        self.args = list(args)
        self._dir = tempfile.mkdtemp(prefix="cascade-proc-")
        # The logs outlive stop() (tests read them afterwards) but not this object.
        weakref.finalize(self, shutil.rmtree, self._dir, True)
        self.err_path = Path(self._dir) / "stderr"
        self.out_path = Path(self._dir) / "stdout"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in stop()
        self._out = open(self.out_path, "wb")  # noqa: SIM115
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.popen = subprocess.Popen(
            command_line(self.args),
            stdout=self._out if stdout_to_file else subprocess.DEVNULL,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=child_env,
        )
        self.pid = self.popen.pid

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for_line(self, pattern: str | re.Pattern[str], timeout: float = 15.0) -> re.Match[str]:
        """Poll stderr until a line matches ``pattern``; fail if the process dies or time runs out."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.stderr.splitlines():
                m = rx.search(line)
                if m:
                    return m
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.popen.returncode}:\n{self.stderr}")
            time.sleep(0.02)
        raise TimeoutError(f"{self.args}: no line matching {rx.pattern!r} in {timeout}s:\n{self.stderr}")

    def wait_for_json(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll stdout until its last line is a whole JSON object (``--json`` of a process that goes on, say
        ``peer fetch --seed``); fail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.stdout.strip().splitlines()
            if lines and lines[-1].endswith("}"):
                try:
                    doc: dict[str, Any] = json.loads(lines[-1])
                    return doc
                except ValueError:
                    pass  # written in part so far
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.args} exited with {self.popen.returncode}:\n{self.stderr}")
            time.sleep(0.02)
        raise TimeoutError(f"{self.args}: no JSON in {timeout} s:\n{self.stderr}")

    def wait_listening(self, timeout: float = 15.0) -> int:
        """Wait for ``... listening on HOST:PORT`` and return the port."""
        return int(self.wait_for_line(LISTENING, timeout).group(2))

    def wait(self, timeout: float = 60.0) -> int:
        return self.popen.wait(timeout)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; always closes the log files."""
        try:
            if self.popen.poll() is None:
                os.kill(self.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.kill(self.pid, signal.SIGKILL)
                    self.popen.wait(timeout)
            return self.popen.returncode
        finally:
            self._err.close()
            self._out.close()

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)


@dataclass
class TrackerProcess:
    """A ``tracker run`` process with its binary port and its HTTP base URL."""

    proc: Proc
    port: int
    http: str

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_tracker(*extra: str) -> TrackerProcess:
    """``tracker run`` on free ports of 127.0.0.1 with an HTTP face; ``extra`` adds options (``--store URL``)."""
    proc = Proc(["tracker", "run", "--host", "127.0.0.1", "--port", "0", "--http-port", "0", *extra])
    try:
        port = proc.wait_listening()
        http_port = int(proc.wait_for_line(r"tracker http on \S+:(\d+)").group(1))
    except BaseException:
        proc.stop()
        raise
    return TrackerProcess(proc, port, f"http://127.0.0.1:{http_port}")
