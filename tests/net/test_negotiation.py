"""What a front-end negotiates is input: every combination is survived.

A real `pyvhost net` on a real TAP; the Python front-end plays a driver that
acks a chosen subset of the offered features.
"""

from __future__ import annotations

import itertools
import time

import pytest

from pyvhost.devices.net import spec
from pyvhost.devices.net.device import OFFLOAD_FEATURES, tun_offloads
from pyvhost.errors import PeerError
from pyvhost.frontend.net import WANTED_FEATURES, WANTED_PROTOCOL, NetFrontend
from pyvhost.testing.frames import gso_header, tcp4_frame
from pyvhost.vhost_user.protocol import ProtocolFeature as PF

from .conftest import GUEST_MAC, HOST_MAC, frame, ours, recv_ours

OFFLOAD_MASK = sum(1 << b for b in OFFLOAD_FEATURES)
BASE_FEATURES = WANTED_FEATURES & ~OFFLOAD_MASK


def _receive_ours(fe: NetFrontend, timeout: float = 5.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [f for f in fe.receive(timeout=0.2) if ours(f)]
        if got:
            return got
    return []


def test_tun_offloads_follow_qemu_rules():
    b = {n: 1 << n for n in OFFLOAD_FEATURES}
    assert tun_offloads(0) == 0
    assert tun_offloads(b[spec.F_GUEST_TSO4]) == 0  # TSO without checksum offload: nothing
    assert tun_offloads(b[spec.F_GUEST_CSUM] | b[spec.F_GUEST_ECN]) == 0x01  # ECN needs TSO
    assert tun_offloads(b[spec.F_GUEST_CSUM] | b[spec.F_GUEST_TSO6] | b[spec.F_GUEST_ECN]) == (
        0x01 | 0x04 | 0x08
    )


def test_every_combination_of_offload_features_is_survived_and_carries_frames(net_daemon, netns):
    """All 2**9 subsets of the offload bits, one session each: pyvhost stays up,
    and a frame crosses each way (the TAP is always given offloads it accepts)."""
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    bits = [1 << b for b in OFFLOAD_FEATURES]
    for n, combo in enumerate(itertools.product((0, 1), repeat=len(bits))):
        chosen = sum(bit for bit, on in zip(bits, combo, strict=True) if on)
        with NetFrontend.connect(d.sock, features=BASE_FEATURES | chosen, queue_size=16) as fe:
            assert fe.features & OFFLOAD_MASK == chosen
            out = frame(HOST_MAC, GUEST_MAC, n.to_bytes(2, "big") + b"out")
            fe.send(out)
            assert recv_ours(host) == [out], f"features 0x{chosen:x}"
            fe.post_rx()
            back = frame(GUEST_MAC, HOST_MAC, n.to_bytes(2, "big") + b"back")
            host.send(back)
            assert _receive_ours(fe) == [back], f"features 0x{chosen:x}"
        assert d.proc.proc.poll() is None
    host.close()


def test_ecn_without_tso_gets_segmented_frames_instead_of_an_exit(net_daemon, netns):
    """QEMU's guest_tso4=off,guest_tso6=off leaves GUEST_CSUM|GUEST_ECN: the
    kernel refuses TSO_ECN alone, so the TAP segments GSO frames for us."""
    d = net_daemon()
    injector = netns.packet_socket(d.ifname, vnet_hdr=True)
    wanted = BASE_FEATURES | 1 << spec.F_GUEST_CSUM | 1 << spec.F_GUEST_ECN | 1 << spec.F_CSUM
    with NetFrontend.connect(d.sock, features=wanted) as fe:
        fe.post_rx()
        big = tcp4_frame(8000, HOST_MAC, GUEST_MAC)
        injector.send(gso_header(10) + big)
        got: list[bytes] = []
        deadline = time.monotonic() + 5
        while sum(len(f) for f in got) < 8000 and time.monotonic() < deadline:
            got += [f for f in fe.receive(timeout=0.2) if f[12:14] == b"\x08\x00"]
        assert len(got) > 1 and max(len(f) for f in got) <= 1514  # segmented by the TAP
    assert d.proc.proc.poll() is None
    injector.close()


def test_more_queue_pairs_than_offered_are_refused_and_the_daemon_serves_on(net_daemon, netns):
    """DPDK's virtio_user queues=2 against one pair: rings 2 and 3 are refused
    by name, nothing crashes, and the next front-end gets its frames."""
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    no_mq = WANTED_PROTOCOL & ~(1 << PF.MQ)
    wanted = WANTED_FEATURES & ~(1 << spec.F_CTRL_VQ | 1 << spec.F_MQ)
    with pytest.raises(PeerError, match="SET_VRING"):
        NetFrontend.connect(d.sock, queue_pairs=2, features=wanted, protocol_features=no_mq)
    with NetFrontend.connect(d.sock) as fe:
        out = frame(HOST_MAC, GUEST_MAC, b"after")
        fe.send(out)
        assert recv_ours(host) == [out]
    assert d.proc.proc.poll() is None
    out, err = d.stop()
    assert "ring 2 is not a queue of this device" in err
    host.close()


def test_with_vhost_on_only_ring_features_the_kernel_has_are_withheld():
    from pyvhost.devices.net.kernel import kernel_mask

    supported = 1 << 15 | 1 << 28 | 1 << 32  # a kernel without EVENT_IDX, say
    withheld = kernel_mask(supported)
    assert withheld & (1 << 29)  # EVENT_IDX: not offered then
    assert not withheld & (1 << 15 | 1 << 28 | 1 << 32)
    assert not withheld & (1 << spec.F_CSUM | 1 << spec.F_CTRL_VQ)  # pyvhost's and the TAP's
    assert "RING_EVENT_IDX" in spec.feature_names(withheld)
