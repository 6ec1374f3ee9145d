"""virtio-net on packed rings (VIRTIO_F_RING_PACKED) over a real TAP: the Python
front-end drives packed rings; a packet socket in a namespace plays the host."""

from __future__ import annotations

import time

import pytest

from pyvhost.devices.net import spec
from pyvhost.frontend.net import NetFrontend
from pyvhost.stats import fetch
from pyvhost.testing.frames import gso_header, tcp4_frame
from pyvhost.testing.processes import wait_for
from pyvhost.virtq.packed_layout import VIRTIO_F_RING_PACKED, unpack_position

from .conftest import GUEST_MAC, HOST_MAC, frame, receive_ours, recv_ours

PACKED = 1 << VIRTIO_F_RING_PACKED


def guest_frames(n: int, size: int = 100) -> list[bytes]:
    return [frame(HOST_MAC, GUEST_MAC, i.to_bytes(4, "big") + bytes(size)) for i in range(n)]


def host_frames(n: int, size: int = 100) -> list[bytes]:
    return [frame(GUEST_MAC, HOST_MAC, i.to_bytes(4, "big") + bytes(size)) for i in range(n)]


def send_all(fe: NetFrontend, frames: list[bytes]) -> None:
    """Send every frame, waiting for the back-end to return buffers when the
    small ring is full."""
    for f in frames:
        deadline = time.monotonic() + 5
        while True:
            try:
                fe.send(f)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)


def test_a_front_end_that_asks_gets_packed_rings(net_daemon):
    d = net_daemon()
    with NetFrontend.connect(d.sock, packed=True) as fe:
        assert fe.packed and fe.features & PACKED
    with NetFrontend.connect(d.sock) as fe:  # one that does not ask, does not
        assert not fe.packed


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("mrg_rxbuf", [True, False], ids=["mrg_rxbuf", "no_mrg_rxbuf"])
def test_frames_cross_packed_rings_both_ways_over_several_laps(
    net_daemon, netns, event_idx, mrg_rxbuf
):
    from pyvhost.frontend.net import WANTED_FEATURES
    from pyvhost.virtq.layout import VIRTIO_RING_F_EVENT_IDX

    features = WANTED_FEATURES
    if not event_idx:
        features &= ~(1 << VIRTIO_RING_F_EVENT_IDX)
    if not mrg_rxbuf:
        features &= ~(1 << spec.F_MRG_RXBUF)
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    # A ring of 16: 200 frames each way go round it a dozen times.
    with NetFrontend.connect(d.sock, packed=True, queue_size=16, features=features) as fe:
        assert fe.packed
        for batch in range(10):
            sent = guest_frames(20)
            send_all(fe, sent)
            assert recv_ours(host, 20) == sent, f"batch {batch}"
        fe.post_rx()
        for batch in range(10):
            sent = host_frames(10)
            for f in sent:
                host.send(f)
            assert receive_ours(fe, 10) == sent, f"batch {batch}"
    host.close()


def test_a_64k_gso_frame_is_merged_over_packed_rx_buffers(net_daemon, netns):
    d = net_daemon()
    injector = netns.packet_socket(d.ifname, vnet_hdr=True)
    with NetFrontend.connect(d.sock, packed=True, rx_buf_size=2048) as fe:
        fe.post_rx()
        big = tcp4_frame(64000, HOST_MAC, GUEST_MAC)
        injector.send(gso_header(10) + big)
        deadline = time.monotonic() + 5
        got = []
        while not got and time.monotonic() < deadline:
            got = [f for f in fe.receive(timeout=0.5, with_header=True) if len(f) > 60000]
        hdr_size = fe.hdr_size
    injector.close()
    [data] = got
    _, gso_type, _, gso_size, _, _, num_buffers = spec.HDR.unpack_from(data)
    assert gso_type == spec.GSO_TCPV4 and gso_size == 1448
    assert num_buffers == -(-len(data) // 2048) > 1
    assert data[hdr_size:] == big


def test_get_vring_base_reports_both_positions_and_wrap_counters(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock, packed=True, queue_size=16) as fe:
        send_all(fe, guest_frames(20))  # 20 one-descriptor frames: round the ring once, and 4
        assert len(recv_ours(host, 20)) == 20
        wait_for(lambda: fe.tx_done() == 20, 5, "TX completions")
        base = fe.client.get_vring_base(spec.tx_queue(0))
    host.close()
    avail, used = unpack_position(base & 0xFFFF), unpack_position(base >> 16)
    assert avail == (4, 0) and used == (4, 0)  # position 4, in the second lap


def test_a_ring_stopped_and_restarted_goes_on_from_its_packed_position(net_daemon, netns):
    """As QEMU stops and starts a device (a driver reset, the end of a migration):
    GET_VRING_BASE stops the ring and says where it was; SET_VRING_BASE with that
    value and a new kick start it there, mid-lap, and frames flow again."""
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    tx = spec.tx_queue(0)
    with NetFrontend.connect(d.sock, packed=True, queue_size=16) as fe:
        send_all(fe, guest_frames(20))
        assert len(recv_ours(host, 20)) == 20
        wait_for(lambda: fe.tx_done() == 20, 5, "TX completions")
        base = fe.client.get_vring_base(tx)
        ring = fe.rings[tx]
        fe.client.set_vring_base(tx, base)
        fe.client.set_vring_call(tx, ring.call)
        fe.client.set_vring_kick(tx, ring.kick)  # starts the ring again
        sent = guest_frames(30)
        send_all(fe, sent)
        assert recv_ours(host, 30) == sent
    host.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_gso_frame_waits_for_enough_rx_buffers_and_arrives_whole(net_daemon, netns, packed):
    """Too few buffers for a 64 KiB frame: the chains taken are given back (several
    at once), the frame waits, and arrives whole once the guest posts more."""
    d = net_daemon()
    injector = netns.packet_socket(d.ifname, vnet_hdr=True)
    with NetFrontend.connect(d.sock, packed=packed, rx_buf_size=2048) as fe:
        fe.post_rx(count=10)  # 20 KiB of room for a 64 KiB frame
        big = tcp4_frame(60000, HOST_MAC, GUEST_MAC)
        injector.send(gso_header(10) + big)
        time.sleep(0.5)
        rx = fetch(d.sock + ".stats")["queues"]["rx0"]
        assert rx["packets"] == rx["drops"] == 0  # waiting, not truncated or dropped
        fe.post_rx()  # (receive() would post buffers itself)
        deadline = time.monotonic() + 5
        got = []
        while not got and time.monotonic() < deadline:
            got = [f for f in fe.receive(timeout=0.5) if len(f) > 60000]
    injector.close()
    assert got == [big]
