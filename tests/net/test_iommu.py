"""virtio-net behind a vIOMMU (VIRTIO_F_ACCESS_PLATFORM) over a real TAP.

The Python front-end plays QEMU with an IOMMU: the device sees rings and
buffers at I/O virtual addresses, translated by IOTLB_MSG updates, and asks
for what it misses on the back-end channel. A packet socket in a namespace
plays the host.
"""

from __future__ import annotations

import socket
import time

import pytest

from pyvhost.devices.net import spec
from pyvhost.frontend.net import IOVA_OFFSET, NetFrontend
from pyvhost.memory.iommu import IOTLB_READ
from pyvhost.vhost_user.protocol import BackendRequest
from pyvhost.virtq.layout import VIRTIO_F_ACCESS_PLATFORM

from .conftest import GUEST_MAC, HOST_MAC, frame, ours

ACCESS_PLATFORM = 1 << VIRTIO_F_ACCESS_PLATFORM


def guest_frames(n: int) -> list[bytes]:
    return [frame(HOST_MAC, GUEST_MAC, i.to_bytes(4, "big") + bytes(100)) for i in range(n)]


def host_frames(n: int) -> list[bytes]:
    return [frame(GUEST_MAC, HOST_MAC, i.to_bytes(4, "big") + bytes(100)) for i in range(n)]


def until_received(fe: NetFrontend, host: socket.socket, n: int, timeout: float = 10):
    """Frames of ours on the host side, answering the device's IOTLB misses meanwhile."""
    host.setblocking(False)
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        fe.poll_backend_requests(timeout=0.05)
        while True:
            try:
                data = host.recv(70000)
            except BlockingIOError:
                break
            if ours(data):
                got.append(data)
    return got


def test_the_device_offers_access_platform_and_a_front_end_may_take_it(net_daemon):
    d = net_daemon()
    with NetFrontend.connect(d.sock, iommu=True) as fe:
        assert fe.features & ACCESS_PLATFORM and fe.iommu
    with NetFrontend.connect(d.sock) as fe:
        assert not fe.iommu


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_frames_flow_both_ways_through_an_iotlb_filled_up_front(net_daemon, netns, packed):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    with NetFrontend.connect(d.sock, iommu=True, packed=packed) as fe:
        sent = guest_frames(20)
        for f in sent:
            fe.send(f)
        assert until_received(fe, host, 20) == sent
        assert fe.iotlb_misses == []  # everything was translated up front
        fe.post_rx()
        back = host_frames(10)
        host.setblocking(True)
        for f in back:
            host.send(f)
        got = [f for f in fe.receive(count=10, timeout=5) if ours(f)]
        assert got == back
    host.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_misses_stall_the_rings_until_the_front_end_answers_and_nothing_is_lost(
    net_daemon, netns, packed
):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    with NetFrontend.connect(d.sock, iommu=True, iotlb_prefill=False, packed=packed) as fe:
        sent = guest_frames(30)
        for f in sent:
            fe.send(f)
        assert until_received(fe, host, 30) == sent  # in order, none lost, none doubled
        misses = fe.iotlb_misses
        assert misses and all(m.type == 1 for m in misses)  # IOTLB_MISS
        assert all(m.iova >= IOVA_OFFSET for m in misses)  # the device asked in IOVAs
        assert fe.backend_requests.count(BackendRequest.IOTLB_MSG) == len(misses)
    host.close()


def test_rings_the_viommu_maps_read_only_break_with_the_reason_and_the_daemon_serves_on(
    net_daemon, netns
):
    d = net_daemon()
    with NetFrontend.connect(d.sock, iommu=True, iotlb_prefill=False) as fe:
        fe.iotlb_perm = IOTLB_READ  # every page the device asks for comes back read-only
        fe.post_rx()
        fe.send(guest_frames(1)[0])
        rings = (spec.rx_queue(0), spec.tx_queue(0))  # both write their used rings
        errors = dict.fromkeys(rings, 0)
        deadline = time.monotonic() + 5
        while not all(errors.values()) and time.monotonic() < deadline:
            fe.poll_backend_requests(timeout=0.05)
            for i in rings:
                errors[i] += fe.ring_errors(i)  # reading the eventfd clears it
        assert all(errors.values()), errors  # their error eventfds fired
    host = netns.packet_socket(d.ifname)
    with NetFrontend.connect(d.sock, iommu=True) as fe:  # the next VM is served
        sent = guest_frames(3)
        for f in sent:
            fe.send(f)
        assert until_received(fe, host, 3) == sent
    host.close()


def test_iotlb_messages_without_access_platform_are_refused(net_daemon):
    from pyvhost.errors import PeerError

    d = net_daemon()
    with NetFrontend.connect(d.sock) as fe:
        with pytest.raises(PeerError, match="IOTLB_MSG"):
            fe.client.iotlb_update(IOVA_OFFSET, 4096, 0x7F00_0000_0000)
