"""Interoperability with a vhost-user peer nobody here wrote: DPDK's testpmd.

Needs root for hugepages (reserved for the test and given back after);
skipped, with the reason, only where the machine cannot provide them.
"""

from __future__ import annotations

import re
import time

import pytest

from pyvhost.frontend.net import NetFrontend
from pyvhost.testing.dpdk import Hugepages, HugepagesUnavailable, Testpmd
from pyvhost.testing.processes import PyvhostProcess

RUN_SECONDS = 3
FRAME = bytes.fromhex("ffffffffffff525400000001") + b"\x08\x00" + bytes(range(46))


@pytest.fixture(scope="module")
def hugepages():
    try:
        pages = Hugepages()
    except HugepagesUnavailable as e:
        pytest.skip(f"DPDK needs hugepages: {e}")
    yield
    pages.release()


def test_testpmd_virtio_user_frontend_drives_the_pyvhost_backend(hugepages, tmp_path):
    path = str(tmp_path / "pyvhost.sock")
    backend = PyvhostProcess(["loopback", "--socket", path], path)
    testpmd = None
    try:
        testpmd = Testpmd(
            f"net_virtio_user0,path={path},queues=1,queue_size=256",
            ["--forward-mode=io", "--tx-first"],
            prefix="pyvhost-virtio-user",
        )
        # Let the tx-first burst circulate: testpmd -> pyvhost -> testpmd -> ...
        time.sleep(RUN_SECONDS)
        stats = testpmd.stop()
    finally:
        if testpmd is not None:  # a missing testpmd must not leak the backend
            testpmd.kill()
        status, out, err = backend.stop()
    assert status == 0, err
    frames = int(re.search(r"loopback: frames=(\d+)", out).group(1))
    # Counted on both sides: every frame testpmd received went through pyvhost,
    # and pyvhost carried no frame testpmd did not send.
    assert stats.rx_packets >= 20_000
    assert stats.rx_packets <= frames <= stats.tx_packets
    assert stats.tx_packets - stats.rx_packets <= 2 * 256  # at most the rings' worth in flight


def test_the_pyvhost_frontend_drives_testpmd_vhost_backend(hugepages, tmp_path):
    path = str(tmp_path / "dpdk.sock")
    testpmd = Testpmd(
        f"net_vhost0,iface={path},queues=1",
        ["--forward-mode=io", "--auto-start"],
        prefix="pyvhost-vhost",
    )
    try:
        testpmd.wait_for_socket(path)
        sent = [FRAME + i.to_bytes(4, "big") for i in range(1000)]
        with NetFrontend.connect(path, queue_size=256) as fe:
            fe.post_rx()
            got = []
            for i in range(0, len(sent), 100):
                for f in sent[i : i + 100]:
                    fe.send(f)
                got += fe.receive(count=100, timeout=10)
            assert fe.tx_done() == len(sent)
        stats = testpmd.stop()
    finally:
        testpmd.kill()
    assert got == sent  # testpmd forwarded every frame back, in order, unchanged
    assert stats.rx_packets == len(sent) and stats.tx_packets == len(sent)
