"""Probe a real `tracker run` process the way issue 3's checker does, from PROTOCOL.md section 2 only.

    python scripts/probe_tracker.py        # about 5 s; prints PASS/FAIL per check, exit 1 on any FAIL

It starts `python -m tracker run --port 0 --peer-ttl 2 --state TMP/x.db`, talks
raw bytes from 127.0.0.2 and 127.0.0.3 (loopback aliases, so 0.0.0.0 handling
and requester exclusion are seen per address), and checks: the good flag,
last-seen, requester exclusion, 0.0.0.0, an error status and message for a
wrong magic, version, command or length, a list answered within 2 s while 40
idle connections are held, SIGTERM exit 0 within 2 s, a restart on --state
with the swarm intact, and expiry with --peer-ttl 2. Every process it starts
is stopped by its PID.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HASH = bytes.fromhex("ab" * 32)
REPO = Path(__file__).resolve().parents[1]
Record = tuple[str, int, int, int]  # ip, port, last seen, good flag


class Prober:
    def __init__(self, folder: Path) -> None:
        self.state = folder / "x.db"
        self.log = folder / "tracker.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: object = "") -> None:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}" + (f"  [{detail}]" if detail != "" else ""), flush=True)

    def start(self) -> None:
        seen = self.log.read_text().count("listening on") if self.log.exists() else 0
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tracker", "run", "--port", "0", "--peer-ttl", "2", "--state", str(self.state)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=REPO,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            found = re.findall(r"tracker listening on \S+:(\d+)", self.log.read_text(errors="replace"))
            if len(found) > seen:
                self.port = int(found[-1])
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise SystemExit(f"the tracker did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> tuple[int, float]:
        """SIGTERM by PID; returns (exit code, seconds it took); SIGKILL after 5 s."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        return code, time.monotonic() - started

    def send(self, data: bytes, src: str = "127.0.0.1", half_close: bool = False, timeout: float = 5.0) -> bytes:
        with socket.socket() as s:
            s.settimeout(timeout)
            s.bind((src, 0))
            s.connect(("127.0.0.1", self.port))
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def ask(self, command: int, ip: str, port: int, src: str) -> tuple[int, list[Record] | str]:
        return parse(self.send(request(command, ip, port), src))


def request(command: int, ip: str, port: int, magic: bytes = b"CASC", version: int = 1, length: int = 38) -> bytes:
    return magic + struct.pack(">III", version, command, length) + HASH + socket.inet_aton(ip) + struct.pack(">H", port)


def parse(reply: bytes) -> tuple[int, list[Record] | str]:
    """(status, peer records) on success, (status, message) on error."""
    status, length = struct.unpack(">BI", reply[:5])
    body = reply[5:]
    if len(body) != length:
        raise ValueError(f"body is {len(body)} bytes, the header says {length}")
    if status != 0:
        return status, body.decode()
    records = []
    for i in range(0, length, 12):
        port, last_seen, good, reserved = struct.unpack(">HIBB", body[i + 4 : i + 12])
        if reserved:
            raise ValueError("reserved byte is not zero")
        records.append((socket.inet_ntoa(body[i : i + 4]), port, last_seen, good))
    return status, records


def peers(answer: tuple[int, list[Record] | str]) -> list[tuple[str, int, int]]:
    status, body = answer
    assert status == 0 and isinstance(body, list), answer
    return [(ip, port, good) for ip, port, _, good in body]


def probe(p: Prober) -> None:
    p.start()
    now = time.time()
    p.check("subscribe 0.0.0.0:7001 from 127.0.0.2: empty swarm", p.ask(2, "0.0.0.0", 7001, "127.0.0.2") == (0, []))
    answer = p.ask(1, "0.0.0.0", 7002, "127.0.0.3")
    p.check("list from 127.0.0.3 sees 127.0.0.2:7001 good", peers(answer) == [("127.0.0.2", 7001, 1)], answer)
    body = answer[1]
    p.check("last-seen is UNIX seconds, now", isinstance(body, list) and abs(body[0][2] - now) <= 2, body)
    answer = p.ask(1, "0.0.0.0", 7001, "127.0.0.2")
    p.check("list from 127.0.0.2 sees 127.0.0.3:7002 not good, not itself", peers(answer) == [("127.0.0.3", 7002, 0)])
    p.ask(2, "10.9.8.7", 7003, "127.0.0.2")
    got = peers(p.ask(1, "0.0.0.0", 7009, "127.0.0.3"))
    want = {("127.0.0.2", 7001, 1), ("10.9.8.7", 7003, 1), ("127.0.0.3", 7002, 0)}
    p.check("a subscriber stays good after listing; a named ip is kept", set(got) == want, got)
    p.check("good peers first", [g for _, _, g in got] == sorted((g for _, _, g in got), reverse=True), got)
    got = peers(p.ask(1, "127.0.0.3", 7002, "127.0.0.3"))
    p.check("the requester is left out when it names its own ip", ("127.0.0.3", 7002, 0) not in got, got)

    bad = {
        "wrong magic": request(1, "1.2.3.4", 1, magic=b"XASC"),
        "version 2": request(1, "1.2.3.4", 1, version=2),
        "command 3": request(3, "1.2.3.4", 1),
        "command 0": request(0, "1.2.3.4", 1),
        "length 37": request(1, "1.2.3.4", 1, length=37),
        "length 39": request(1, "1.2.3.4", 1, length=39),
    }
    for name, data in bad.items():
        try:
            status, message = parse(p.send(data))
        except (OSError, ValueError) as exc:
            p.check(f"{name}: error status and message", False, exc)
            continue
        p.check(
            f"{name}: error status and message", status != 0 and isinstance(message, str) and len(message) > 3, message
        )
    status, message = parse(p.send(request(1, "1.2.3.4", 1)[:20], half_close=True))
    p.check("20 bytes then EOF: error status and message", status != 0, message)

    idle = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(40)]
    try:
        started = time.monotonic()
        answer = parse(p.send(request(1, "0.0.0.0", 7010), "127.0.0.3", timeout=2))
        took = time.monotonic() - started
        p.check("a list is answered within 2 s while 40 idle connections are held", answer[0] == 0, f"{took:.3f} s")
    finally:
        for s in idle:
            s.close()

    p.ask(2, "0.0.0.0", 7001, "127.0.0.2")  # fresh, so the 2 s TTL does not end it during the restart
    code, took = p.stop()
    p.check("SIGTERM: exit 0 within 2 s", code == 0 and took < 2, f"exit {code}, {took:.2f} s")
    p.start()
    got = peers(p.ask(1, "0.0.0.0", 7020, "127.0.0.3"))
    p.check("restarted on --state: the subscriber is still there, still good", ("127.0.0.2", 7001, 1) in got, got)
    time.sleep(2.5)  # past --peer-ttl 2
    got = peers(p.ask(1, "0.0.0.0", 7021, "127.0.0.3"))
    p.check("--peer-ttl 2: every peer not seen for 2.5 s is gone", got == [], got)
    code, _ = p.stop()
    p.check("second SIGTERM: exit 0", code == 0, code)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="probe-tracker-") as folder:
        p = Prober(Path(folder))
        try:
            probe(p)
        finally:
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
    print("all checks passed" if not p.failed else f"{p.failed} checks failed")
    return 1 if p.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
