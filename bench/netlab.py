"""Emulated hosts for ``bench/wan.py``: network namespaces on a bridge, each host's upload shaped.

One run builds, under a prefix unique to it (``cwan<pid>-``):

- a namespace ``<prefix>br`` holding a Linux bridge ``br0``;
- one namespace per host, with a veth pair whose ``eth0`` end is in the host and whose
  other end is a port of the bridge; the host gets 10.77.0.x/24 on ``eth0``;
- on each shaped host's ``eth0``, an ``htb`` root qdisc with one class at the host's rate:
  everything the host sends goes through it, so that class is the host's upload link.
  The class queues packets in a plain FIFO (the kernel's default leaf, ``pfifo``), or in
  ``pfifo_fast`` when asked: the default root queue of a Linux host without ``fq_codel``,
  which sends packets of a higher socket priority first (``peer fetch`` marks its downloads so).
  Downloads are not shaped (the bridge side has no qdisc): a fetcher's download is limited
  only by the uploads of the hosts it fetches from, as on a switched LAN.

Nothing is created or changed in the root namespace: both veth ends are created inside
namespaces of this run, and the addresses exist only there. ``close`` deletes every
namespace the lab created, which removes their veths, qdiscs and bridge with them.

Upload rates over time come from each shaped host's upload class: its byte counter, the one
``tc -s class show`` prints and the seeder's copies are counted from, read every ``period``
seconds over an rtnetlink socket that a thread made in each namespace (``setns`` on that
thread only): no process per sample. The counter is in bytes on the wire. The device's own
transmit counter (``/proc/net/dev``) is not: it counts a TCP segmentation-offload batch of up
to 64 KiB as one packet with one set of headers, and so showed a full 40 Mbit/s link at about
38.4 (1.01 bytes per payload byte, against the 1.049 the class counts).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

from bench.procs import BenchError

SUBNET = "10.77.0"  # private, and only ever configured inside this lab's namespaces
CLONE_NEWNET = 0x40000000
CMD_TIMEOUT = 20.0  # seconds for one ip/tc command: they take milliseconds
SENT = re.compile(r"Sent (\d+) bytes")
# The queues a host's upload class may use (see the module docstring); the first is the
# kernel's default leaf, which is left in place.
QUEUES = ("pfifo", "pfifo_fast")
DEFAULT_QUEUE = QUEUES[0]
UPLOAD_CLASS = (1 << 16) | 0x10  # the htb class 1:10 that Lab.build gives each shaped host

# rtnetlink, for the class counters (linux/netlink.h, linux/rtnetlink.h, linux/gen_stats.h)
NETLINK_ROUTE = 0
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWTCLASS = 40
RTM_GETTCLASS = 42
TCA_STATS2 = 7
TCA_STATS_BASIC = 1
NLA_TYPE_MASK = 0x3FFF  # without the nested / byte-order flags
NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
TCMSG = struct.Struct("=BxxxiIII")  # family, interface index, handle, parent, info
RTATTR = struct.Struct("=HH")  # length, type
U64 = struct.Struct("=Q")


def have_root() -> bool:
    """True when this process may create namespaces and qdiscs (it runs as root)."""
    return os.geteuid() == 0


def sh(*argv: str) -> str:
    """Run one ip/tc command; its stdout. Raises BenchError with its stderr when it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


@dataclass(frozen=True)
class Host:
    name: str  # short, e.g. "seed", "f3", "tracker"
    netns: str
    ip: str
    mbit: float | None  # upload rate; None = not shaped


@dataclass
class Lab:
    """The namespaces of one scenario; ``close`` (idempotent) deletes them all."""

    prefix: str
    hosts: list[Host] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    def netns(self, short: str) -> str:
        return f"{self.prefix}{short}"

    def build(self, uploads: list[tuple[str, float | None]], queue: str = DEFAULT_QUEUE) -> None:
        """Create the bridge and one host per ``(name, mbit)``; addresses .1, .2, ... in that order.

        ``queue`` (one of :data:`QUEUES`) replaces the kernel's default leaf under each shaped host's class.

        Raises BenchError (after deleting what it created) when a command fails.
        """
        if len(uploads) > 250:
            raise BenchError("at most 250 hosts fit in the lab's /24")
        if queue not in QUEUES:
            raise BenchError(f"unknown queue {queue!r}; one of {', '.join(QUEUES)}")
        try:
            bridge = self._add_netns("br")
            sh("ip", "-n", bridge, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", bridge, "link", "set", "br0", "up")
            for i, (name, mbit) in enumerate(uploads):
                ns = self._add_netns(f"h{i}")
                port = f"p{i}"
                sh("ip", "-n", bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                sh("ip", "-n", bridge, "link", "set", port, "master", "br0", "up")
                ip = f"{SUBNET}.{i + 1}"
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                if mbit is not None:
                    # One class, so quantum only silences htb's "quantum is big" warning (value arbitrary).
                    sh("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10")
                    rate = f"{mbit:g}mbit"
                    sh(
                        "tc",
                        "-n",
                        ns,
                        "class",
                        "add",
                        "dev",
                        "eth0",
                        "parent",
                        "1:",
                        "classid",
                        "1:10",
                        "htb",
                        "rate",
                        rate,
                        "ceil",
                        rate,
                        "quantum",
                        "60000",
                    )
                    if queue != DEFAULT_QUEUE:
                        sh("tc", "-n", ns, "qdisc", "add", "dev", "eth0", "parent", "1:10", "handle", "10:", queue)
                self.hosts.append(Host(name, ns, ip, mbit))
        except BaseException:
            self.close()
            raise

    def _add_netns(self, short: str) -> str:
        ns = self.netns(short)
        sh("ip", "netns", "add", ns)
        self.created.append(ns)
        return ns

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def sent_bytes(self, host: Host) -> int:
        """Bytes the host's htb class has sent (``tc -s class show``), headers included."""
        m = SENT.search(sh("tc", "-n", host.netns, "-s", "class", "show", "dev", "eth0"))
        if not m:
            raise BenchError(f"no htb class counter on {host.netns}")
        return int(m.group(1))

    def close(self) -> None:
        """Delete every namespace this lab created (their veths, qdiscs and bridge go with them)."""
        while self.created:
            ns = self.created.pop()
            with contextlib.suppress(BenchError):  # already gone: nothing left to delete
                sh("ip", "netns", "del", ns)
        self.hosts.clear()


class ClassCounter:
    """The byte counter of the upload class (htb 1:10) on ``eth0`` of the namespace it was made in.

    Make it on a thread that is in the host's namespace: its netlink socket and the
    interface index belong to that namespace from then on, whichever namespace reads.
    """

    def __init__(self) -> None:
        self._ifindex = socket.if_nametoindex("eth0")
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.settimeout(CMD_TIMEOUT)
        self._seq = 0

    def read(self) -> int:
        """Bytes the class has sent, headers included.

        Raises OSError (the kernel refused the dump, or did not answer) or ValueError
        (no such class, or a reply too short for what it claims to hold).
        """
        self._seq += 1
        head = NLMSGHDR.pack(NLMSGHDR.size + TCMSG.size, RTM_GETTCLASS, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0)
        self._sock.send(head + TCMSG.pack(socket.AF_UNSPEC, self._ifindex, 0, 0, 0))
        found: int | None = None
        while True:
            data = self._sock.recv(1 << 16)
            pos = 0
            while pos + NLMSGHDR.size <= len(data):
                length, kind, _flags, seq, _port = NLMSGHDR.unpack_from(data, pos)
                if length < NLMSGHDR.size or pos + length > len(data):
                    raise ValueError("truncated netlink message")
                body = pos + NLMSGHDR.size
                if seq == self._seq:
                    if kind == NLMSG_DONE:
                        if found is None:
                            raise ValueError("no htb class 1:10 on eth0")
                        return found
                    if kind in (NLMSG_ERROR, RTM_NEWTCLASS) and length < NLMSGHDR.size + TCMSG.size:
                        raise ValueError("truncated netlink message")  # both bodies are longer than an int
                    if kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, body)
                        if code:  # 0 is an acknowledgement, which the dump did not ask for
                            raise OSError(-code, f"class dump refused: {os.strerror(-code)}")
                    if kind == RTM_NEWTCLASS and TCMSG.unpack_from(data, body)[2] == UPLOAD_CLASS:
                        found = _basic_bytes(data, body + TCMSG.size, pos + length)
                pos += (length + 3) & ~3

    def close(self) -> None:
        self._sock.close()


def _attrs(data: bytes, pos: int, end: int) -> dict[int, tuple[int, int]]:
    """The netlink attributes in ``data[pos:end]``: type -> (start, end) of each one's payload."""
    found = {}
    while pos + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, pos)
        if length < RTATTR.size or pos + length > end:
            raise ValueError("truncated netlink attribute")
        found[kind & NLA_TYPE_MASK] = (pos + RTATTR.size, pos + length)
        pos += (length + 3) & ~3
    return found


def _basic_bytes(data: bytes, pos: int, end: int) -> int:
    """The ``bytes`` of a class's basic statistics (``TCA_STATS2`` / ``TCA_STATS_BASIC``)."""
    stats = _attrs(data, pos, end).get(TCA_STATS2)
    basic = None if stats is None else _attrs(data, *stats).get(TCA_STATS_BASIC)
    if basic is None or basic[1] - basic[0] < U64.size:
        raise ValueError("a class without its byte counter")
    return int(U64.unpack_from(data, basic[0])[0])


class Sampler(threading.Thread):
    """Reads the byte counter of each shaped host's upload class every ``period`` s until ``stop``."""

    def __init__(self, hosts: list[Host], period: float) -> None:
        super().__init__(name="wan-sampler", daemon=True)
        self.hosts = hosts
        self.period = period
        self.samples: list[tuple[float, list[int]]] = []  # (time.time(), bytes per host)
        self.error: str | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        counters: list[ClassCounter] = []
        try:
            for h in self.hosts:
                fd = os.open(f"/run/netns/{h.netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                finally:
                    os.close(fd)
                counters.append(ClassCounter())
            while True:
                now = time.time()
                self.samples.append((now, [c.read() for c in counters]))
                if self._stop_event.wait(self.period):
                    return
        except (OSError, ValueError) as exc:  # a namespace vanished under us: keep what we have
            self.error = str(exc)
        finally:
            for c in counters:
                c.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5.0)
