"""``bench/netlab.py`` against the real kernel: the queue under each host's upload class, and clean-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from bench.netlab import Lab, Sampler, sh
from bench.procs import BenchError

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(
        os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
        reason="network namespaces need root and iproute2",
    ),
]


@pytest.fixture(autouse=True)
def _namespaces_allowed() -> None:
    """Root alone is not enough in a container without CAP_SYS_ADMIN: try one namespace first."""
    name = f"cprobe{os.getpid()}"
    try:
        sh("ip", "netns", "add", name)
    except BenchError as exc:
        pytest.skip(f"cannot create a network namespace here: {str(exc).splitlines()[0]}")
    sh("ip", "netns", "del", name)


def _qdiscs(netns: str) -> str:
    return sh("tc", "-n", netns, "qdisc", "show", "dev", "eth0")


@pytest.mark.parametrize(("queue", "leaf"), [("pfifo", "pfifo"), ("pfifo_fast", "pfifo_fast")])
def test_each_shaped_host_queues_its_upload_in_the_queue_asked_for(queue: str, leaf: str) -> None:
    lab = Lab(f"ctest{os.getpid()}-")
    try:
        lab.build([("seed", 40.0), ("tracker", None)], queue)
        shaped = _qdiscs(lab.host("seed").netns)
        assert "qdisc htb 1: root" in shaped
        # The kernel's default leaf is not listed; an explicit one is, under the host's class.
        assert (f"qdisc {leaf} 10: parent 1:10" in shaped) == (queue != "pfifo")
        assert "htb" not in _qdiscs(lab.host("tracker").netns)
    finally:
        lab.close()
    assert f"ctest{os.getpid()}-" not in sh("ip", "netns", "list")


def test_an_unknown_queue_is_refused_before_anything_is_made() -> None:
    lab = Lab(f"ctest{os.getpid()}-")
    with pytest.raises(BenchError, match="unknown queue 'fq_codel'"):
        lab.build([("seed", 40.0)], "fq_codel")
    assert lab.created == []


def test_the_sampler_reads_the_upload_class_counter_that_tc_prints() -> None:
    # The counter of the class, in bytes on the wire, is the one the seeder's copies come from;
    # the device's counter would miss the headers of segmentation-offload batches.
    lab = Lab(f"ctest{os.getpid()}-")
    try:
        lab.build([("seed", 100.0), ("peer", None)])
        seed, peer = lab.host("seed"), lab.host("peer")
        send = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for _ in range(200): s.sendto(bytes(1000), ({peer.ip!r}, 9))"
        )
        subprocess.run(["ip", "netns", "exec", seed.netns, sys.executable, "-c", send], check=True, timeout=30)
        least = 200 * (1000 + 8 + 20 + 14)  # each datagram with its UDP, IP and Ethernet headers
        deadline = time.monotonic() + 10.0
        while (before := lab.sent_bytes(seed)) < least and time.monotonic() < deadline:
            time.sleep(0.01)
        sampler = Sampler([seed], 0.01)
        sampler.start()
        try:
            while not sampler.samples and sampler.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            sampler.stop()
        after = lab.sent_bytes(seed)
    finally:
        lab.close()
    assert sampler.error is None
    assert least <= before <= sampler.samples[0][1][0] <= after
