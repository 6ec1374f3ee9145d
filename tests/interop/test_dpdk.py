"""Interoperability with a vhost-user peer nobody here wrote: DPDK's testpmd.

Needs root for hugepages (reserved for the test and given back after);
skipped, with the reason, only where the machine cannot provide them.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from pyvhost.frontend.net import NetFrontend
from pyvhost.stats import fetch
from pyvhost.testing.dpdk import Hugepages, HugepagesUnavailable, Testpmd
from pyvhost.testing.netns import NetNamespace
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


# virtio_user options users run (DPDK's defaults, then each variant): every one
# must interoperate. packed_vq=1 asks for a packed ring, which pyvhost serves.
VIRTIO_USER_VARIANTS = {
    "defaults": "",
    "mrg_rxbuf=0": "mrg_rxbuf=0",
    "in_order=1": "in_order=1",
    "packed_vq=1": "packed_vq=1",
    "packed_vq=1,in_order=1": "packed_vq=1,in_order=1",
    "packed_vq=1,mrg_rxbuf=0": "packed_vq=1,mrg_rxbuf=0",
    "vectorized=1": "vectorized=1",
    "server=1": "server=1",
}


@pytest.mark.parametrize("variant", list(VIRTIO_USER_VARIANTS))
def test_testpmd_virtio_user_frontend_drives_the_pyvhost_backend(hugepages, tmp_path, variant):
    path = str(tmp_path / "pyvhost.sock")
    options = VIRTIO_USER_VARIANTS[variant]
    server = "server=1" in options
    testpmd = backend = None
    try:
        if not server:
            backend = PyvhostProcess(["loopback", "--socket", path, "-v"], path)
        testpmd = Testpmd(
            f"net_virtio_user0,path={path},queues=1,queue_size=256"
            + (f",{options}" * bool(options)),
            ["--forward-mode=io", "--tx-first"],
            prefix="pyvhost-virtio-user",
        )
        if server:  # testpmd listens; pyvhost connects to it
            testpmd.wait_for_socket(path)
            backend = PyvhostProcess(["loopback", "--socket", path, "--client", "-v"])
        # Let the tx-first burst circulate: testpmd -> pyvhost -> testpmd -> ...
        time.sleep(RUN_SECONDS)
        stats = testpmd.stop()
    finally:
        if testpmd is not None:  # a missing testpmd must not leak the backend
            testpmd.kill()
        if backend is not None:
            status, out, err = backend.stop()
    assert status == 0, err
    frames = int(re.search(r"loopback: frames=(\d+)", out).group(1))
    # Counted on both sides: every frame testpmd received went through pyvhost,
    # and pyvhost carried no frame testpmd did not send.
    assert stats.rx_packets >= 10_000
    assert stats.rx_packets <= frames <= stats.tx_packets
    assert stats.tx_packets - stats.rx_packets <= 2 * 256  # at most the rings' worth in flight
    acked = re.search(r"features acked: (.+)$", err, re.M).group(1).split("|")
    assert ("RING_PACKED" in acked) == ("packed_vq=1" in options), acked


def test_virtio_user_asking_for_more_queue_pairs_than_offered_is_refused_not_fatal(
    hugepages, tmp_path
):
    """queues=2 against one pair: no ring beyond the pair is served, pair 0
    carries its frames to the TAP, pyvhost stays responsive under the flood,
    and exits cleanly when asked."""
    path = str(tmp_path / "pyvhost.sock")
    ifname = "pvq" + uuid.uuid4().hex[:8]
    with NetNamespace() as ns:
        backend = PyvhostProcess(
            ["net", "--socket", path, "--netdev", f"tap,ifname={ifname}"], path
        )
        testpmd = None
        try:
            ns.adopt(ifname, ipv6=False)
            testpmd = Testpmd(
                f"net_virtio_user0,path={path},queues=2,queue_size=256",
                ["--forward-mode=txonly", "--auto-start"],
                prefix="pyvhost-virtio-user-q2",
            )
            testpmd.wait_started()
            time.sleep(1)
            # A guest that refills TX as fast as pyvhost drains it does not
            # starve the rest of the loop: the stats socket answers at once.
            for _ in range(5):
                sent = fetch(path + ".stats", timeout=1.0)["queues"]["tx0"]["packets"]
                time.sleep(0.2)
            assert backend.proc.poll() is None
            testpmd.stop()
        finally:
            if testpmd is not None:
                testpmd.kill()
            status, out, err = backend.stop()
    assert status == 0, err
    assert sent > 1000  # pair 0 works
    assert "Traceback" not in err
    # DPDK 22.11 starts rings 2 and 3 anyway (refused, by name); 24.11 sees no
    # MQ offered and keeps to one pair itself.
    queues = int(re.search(r"RX queue number: (\d+)", testpmd.output).group(1))
    assert queues == 1 or "ring 2 is not a queue of this device" in err


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_the_pyvhost_frontend_drives_testpmd_vhost_backend(hugepages, tmp_path, packed):
    path = str(tmp_path / "dpdk.sock")
    testpmd = Testpmd(
        f"net_vhost0,iface={path},queues=1",
        ["--forward-mode=io", "--auto-start"],
        prefix="pyvhost-vhost",
    )
    probe = FRAME + b"probe"
    try:
        testpmd.wait_for_socket(path)
        sent = [FRAME + i.to_bytes(4, "big") for i in range(1000)]
        with NetFrontend.connect(path, queue_size=256, packed=packed) as fe:
            assert fe.packed == packed  # DPDK's vhost offers packed rings
            fe.post_rx()
            # DPDK 24.11 drops what arrives before its port is up: wait for a
            # probe to come back, then every frame must.
            deadline = time.monotonic() + 15
            while probe not in fe.receive(timeout=0.2, count=64):
                assert time.monotonic() < deadline, "testpmd's vhost port never came up"
                fe.send(probe)
            fe.receive(timeout=0.5, count=64)  # probes still on their way
            got = []
            for i in range(0, len(sent), 100):
                for f in sent[i : i + 100]:
                    fe.send(f)
                got += [f for f in fe.receive(count=100, timeout=10) if f != probe]
        stats = testpmd.stop()
    finally:
        testpmd.kill()
    assert got == sent  # testpmd forwarded every frame back, in order, unchanged
    assert stats.rx_packets >= len(sent) and stats.tx_packets >= len(sent)
