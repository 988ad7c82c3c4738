"""Child processes for the benchmarks: started with logs in files, waited on with ``os.wait4``.

``os.wait4`` gives the exit time (polled every few ms). Peak RSS is the
``VmHWM`` of /proc/PID/status, read at every poll while the child lives: a
high-water mark, so the last read is the peak up to the last few ms. (The
``ru_maxrss`` of ``wait4`` is no use here: Linux carries the parent's RSS at
fork/vfork time into the child's, so every child "peaked" at the harness's size.)
Every process is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LISTENING = re.compile(r"listening on (\S+):(\d+)")
POLL = 0.005  # seconds between exit/log polls: small against the ~1 s runs timed here


class BenchError(RuntimeError):
    """A benchmark could not run (a process failed or a deadline passed)."""


class Child:
    """One child process with stdout and stderr in files under ``logdir``."""

    def __init__(self, name: str, argv: Sequence[str], logdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        self.rc: int | None = None
        self.maxrss_kib = 0  # peak RSS in KiB (as VmHWM), from the kernel's accounting once reaped
        self.cpu_seconds = 0.0  # user + system time of this process (not its children), once reaped
        self.ended = 0.0
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.started = time.perf_counter()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            )
        self.pid = self.popen.pid

    @classmethod
    def python(cls, name: str, args: Sequence[str], logdir: Path, netns: str | None = None) -> Child:
        return cls(name, in_netns(netns, [sys.executable, *args]), logdir)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def poll(self) -> int | None:
        """Reap the child if it has exited; record exit time, status and peak RSS."""
        if self.rc is not None:
            return self.rc
        # Nothing else here: a run's fetchers are polled every POLL seconds on the cores they
        # share. Reading each one's /proc status at every poll (for its peak RSS) cost the
        # driver 0.23 s of CPU in a 4.8 s swarm of 1 + 8 (BENCHMARKS.md); wait4 reports the peak.
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.ended = time.perf_counter()
        self.rc = os.waitstatus_to_exitcode(status)
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        self.maxrss_kib = usage.ru_maxrss  # KiB on Linux, where the bench runs
        self.popen.returncode = self.rc  # so Popen does not try to reap it again
        return self.rc

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.poll()
            if rc is not None:
                return rc
            time.sleep(POLL)
        raise BenchError(f"{self.name} still running after {timeout:.0f}s\n{self.tail()}")

    def wait_for(self, pattern: re.Pattern[str], timeout: float, stream: str = "err") -> re.Match[str]:
        """Poll the log until a line matches; fail if the process exits first."""
        path = self.err_path if stream == "err" else self.out_path
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(path.read_text(errors="replace"))
            if m:
                return m
            if self.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.rc} before {pattern.pattern!r}\n{self.tail()}")
            time.sleep(POLL)
        raise BenchError(f"{self.name}: no {pattern.pattern!r} within {timeout:.0f}s\n{self.tail()}")

    def wait_listening(self, timeout: float = 30.0, stream: str = "err") -> int:
        return int(self.wait_for(LISTENING, timeout, stream).group(2))

    def vm_hwm_kib(self) -> int:
        """Peak RSS so far from /proc (0 once the process is gone)."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        m = re.search(r"VmHWM:\s+(\d+) kB", text)
        return int(m.group(1)) if m else 0

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM by PID, SIGKILL after ``timeout``; returns the exit code."""
        if self.poll() is not None:
            return self.rc
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll() is not None:
                return self.rc
            time.sleep(POLL)
        os.kill(self.pid, signal.SIGKILL)
        return self.wait(timeout)

    def tail(self, lines: int = 8) -> str:
        text = (self.stderr + self.stdout).strip().splitlines()
        return "\n".join(f"  [{self.name}] {line}" for line in text[-lines:])


class Group:
    """Children started by one case; ``stop_all`` stops each by its PID."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[Child] = []

    def python(self, name: str, args: Sequence[str], netns: str | None = None) -> Child:
        """Start ``python ARGS``, inside network namespace ``netns`` when given."""
        child = Child.python(name, args, self.logdir, netns)
        self.children.append(child)
        return child

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, self.logdir, env)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(OSError, BenchError):  # already gone: nothing left to stop
                child.stop()


def in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the named network namespace (``ip netns exec`` execs it: same PID, same rusage)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def wait_all(children: Sequence[Child], timeout: float) -> float:
    """Wait until every child exits; return the time from the first start to the last exit."""
    deadline = time.monotonic() + timeout
    pending = list(children)
    while pending and time.monotonic() < deadline:
        pending = [c for c in pending if c.poll() is None]
        if pending:
            time.sleep(POLL)
    if pending:
        raise BenchError(f"{len(pending)} of {len(children)} still running after {timeout:.0f}s\n{pending[0].tail()}")
    return max(c.ended for c in children) - min(c.started for c in children)


def free_port() -> int:
    """A port free on 127.0.0.1 right now, for programs that cannot take port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
