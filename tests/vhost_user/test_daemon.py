"""The daemon through a real Unix socket, driven by the Python front-end."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from pyvhost.devices.net import spec
from pyvhost.frontend.client import VhostUserClient
from pyvhost.frontend.net import NetFrontend
from pyvhost.testing.memfd import memfd
from pyvhost.testing.processes import PyvhostProcess, wait_for
from pyvhost.vhost_user.messages import U64, Header, MemoryRegionDesc
from pyvhost.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    VERSION,
    ProtocolFeature as PF,
    Request as R,
    mask,
)

FRAME = bytes.fromhex("ffffffffffff525400000001") + b"\x08\x00" + bytes(range(50))


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "vhost.sock")


@pytest.fixture
def daemon(sock_path):
    d = PyvhostProcess(["loopback", "--socket", sock_path, "--queue-pairs", "2"], sock_path)
    yield d
    status, _, err = d.stop()
    assert status == 0, err
    assert not os.path.exists(sock_path), "the socket file outlived the daemon"


def frames(n: int) -> list[bytes]:
    return [FRAME + n.to_bytes(2, "big") + bytes(i % 7) for i in range(n)]


def test_negotiation_and_traffic_through_a_real_socket(daemon, sock_path):
    with NetFrontend.connect(sock_path) as fe:
        assert fe.features & (1 << spec.F_MRG_RXBUF) and fe.features & (1 << 32)
        assert fe.client.protocol_features & (1 << PF.REPLY_ACK)
        fe.post_rx()
        sent = frames(100)
        for f in sent:
            fe.send(f)
        assert fe.receive(count=100, timeout=5) == sent
        assert fe.tx_done() == 100


def test_every_queue_pair_carries_its_own_traffic(daemon, sock_path):
    with NetFrontend.connect(sock_path, queue_pairs=2) as fe:
        for pair in (0, 1):
            fe.post_rx(pair)
        for pair in (0, 1):
            for i in range(20):
                fe.send(FRAME + bytes([pair, i]), pair=pair)
        for pair in (0, 1):
            got = fe.receive(pair, count=20, timeout=5)
            assert got == [FRAME + bytes([pair, i]) for i in range(20)]


def test_get_vring_base_after_traffic_reports_where_each_ring_stopped(daemon, sock_path):
    with NetFrontend.connect(sock_path) as fe:
        fe.post_rx(count=30)
        for f in frames(25):
            fe.send(f)
        assert len(fe.receive(count=25, timeout=5)) == 25
        bases = fe.stop_rings()
        assert bases[spec.tx_queue(0)] == 25
        assert bases[spec.rx_queue(0)] == 25


def test_a_frontend_that_vanishes_mid_traffic_leaves_nothing_behind(daemon, sock_path):
    wait_for(lambda: True)
    baseline = daemon.fds()
    fe = NetFrontend.connect(sock_path)
    for f in frames(10):
        fe.send(f)  # no RX buffers: these stay in flight
    assert daemon.maps("pyvhost-frontend-ram")
    fe.close()  # gone, without GET_VRING_BASE or anything
    wait_for(lambda: not daemon.maps("pyvhost-frontend-ram"), 5, "the guest RAM to be unmapped")
    wait_for(lambda: daemon.fds() == baseline, 5, "the session's fds to be closed")

    with NetFrontend.connect(sock_path) as fe2:  # the next front-end is served
        fe2.post_rx()
        fe2.send(FRAME)
        assert fe2.receive(timeout=5) == [FRAME]


def test_memory_regions_can_be_added_and_removed_while_traffic_flows(daemon, sock_path):
    with NetFrontend.connect(sock_path, use_add_mem_reg=True) as fe:
        desc, dimm = fe.add_region(1 << 32, 1 << 20)
        assert daemon.maps("pyvhost-frontend-dimm")
        fe.post_rx()
        fe.send(FRAME)
        assert fe.receive(timeout=5) == [FRAME]
        fe.remove_region(desc)
        wait_for(lambda: not daemon.maps("pyvhost-frontend-dimm"), 5, "the DIMM to be unmapped")
        fe.send(FRAME)
        assert fe.receive(timeout=5) == [FRAME]


# --- hostile messages -------------------------------------------------------------------


def acked_client(path: str) -> VhostUserClient:
    c = VhostUserClient.connect(path)
    c.get_features()
    c.set_protocol_features(c.get_protocol_features())
    return c


def raw(request: int, body: bytes, size: int | None = None) -> bytes:
    size = len(body) if size is None else size
    return Header(request, VERSION | FLAG_NEED_REPLY, size).pack() + body


REGION = MemoryRegionDesc(0, 1 << 20, 0x7F0000000000, 0).pack()
OVERLAP = MemoryRegionDesc(0x80000, 1 << 20, 0x7F1000000000, 0).pack()

MALFORMED = {
    "size-does-not-match": (raw(R.SET_VRING_NUM, bytes(4)), 0),
    "payload-too-long": (raw(R.SET_VRING_NUM, bytes(16)), 0),
    "payload-too-short": (raw(R.SET_FEATURES, bytes(3)), 0),
    "more-fds-than-taken": (raw(R.SET_OWNER, b""), 3),
    "unknown-request": (raw(77, bytes(8)), 1),
    "ring-index-out-of-range": (raw(R.SET_VRING_NUM, struct.pack("=II", 200, 256)), 0),
    "overlapping-regions": (raw(R.SET_MEM_TABLE, struct.pack("=II", 2, 0) + REGION + OVERLAP), 2),
    "too-many-regions": (raw(R.SET_MEM_TABLE, struct.pack("=II", 9, 0) + REGION * 9), 8),
    "oversized-payload": (raw(R.SET_CONFIG, bytes(100_000)), 0),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_message_is_refused_and_the_daemon_serves_on(daemon, sock_path, case):
    data, nfds = MALFORMED[case]
    c = acked_client(sock_path)
    wait_for(lambda: True)
    before = daemon.fds()
    fds = [memfd(1 << 20, "pyvhost-test-hostile") for _ in range(nfds)]
    try:
        c.send_raw(data, fds)
    finally:
        for fd in fds:
            os.close(fd)
    frame = c.conn.receive_blocking(5)
    assert frame.header.flags & 0x4 and U64.unpack(frame.body).value != 0  # a failure ack
    # Still serving, on the same connection, with nothing leaked.
    assert c.get_features() & (1 << 32)
    assert daemon.fds() == before
    assert not daemon.maps("pyvhost-test-hostile")
    c.close()


def test_hostile_bytes_without_need_reply_are_survived(daemon, sock_path):
    c = acked_client(sock_path)
    c.send_raw(Header(R.SET_VRING_ADDR, VERSION, 3).pack() + b"abc")
    c.send_raw(Header(R.GET_FEATURES, 0x7, 0).pack())  # a request posing as a reply
    assert c.get_features() & (1 << 32)
    c.close()


# --- modes and the socket file ------------------------------------------------------------


def test_client_mode_connects_to_a_listening_frontend_and_comes_back(tmp_path):
    path = str(tmp_path / "frontend.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    d = PyvhostProcess(["loopback", "--socket", path, "--client"])
    try:
        for _ in range(2):  # the daemon reconnects after the front-end drops it
            fe = NetFrontend(VhostUserClient.accept(listener, timeout=10))
            fe.setup()
            fe.post_rx()
            fe.send(FRAME)
            assert fe.receive(timeout=5) == [FRAME]
            fe.close()
    finally:
        status, _, err = d.stop()
        listener.close()
    assert status == 0, err
    assert os.path.exists(path)  # the front-end's socket is not the daemon's to remove


def test_a_stale_socket_file_is_replaced(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    s.close()  # a socket file nobody listens on, as a killed process leaves it
    d = PyvhostProcess(["loopback", "--socket", sock_path], sock_path)
    with NetFrontend.connect(sock_path) as fe:
        assert fe.features
    assert d.stop()[0] == 0


def test_a_socket_path_in_use_is_an_error_naming_the_option(daemon, sock_path):
    other = PyvhostProcess(["loopback", "--socket", sock_path], None)
    status, _, err = other.wait(timeout=10)
    assert status == 2
    assert "--socket" in err and "in use" in err


def test_a_socket_path_that_is_not_a_socket_is_an_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("precious")
    other = PyvhostProcess(["loopback", "--socket", str(path)], None)
    status, _, err = other.wait(timeout=10)
    assert status == 2 and "not a socket" in err
    assert path.read_text() == "precious"


def test_mq_reports_queue_pairs(daemon, sock_path):
    c = VhostUserClient.connect(sock_path)
    c.get_features()
    c.set_protocol_features(mask(PF.MQ, PF.REPLY_ACK))
    assert c.get_queue_num() == 2
    c.close()


# --- a front-end that leaves at once -------------------------------------------------------


def setup_and_hang_up(path: str) -> None:
    """A normal set-up (memory, kick and call for two rings) sent in one go, then
    EOF at once: nothing waits for the back-end to read any of it."""
    from pyvhost.vhost_user.codec import encode
    from pyvhost.vhost_user.messages import MemoryTable, VringFd

    c = VhostUserClient.connect(path)
    ram = memfd(1 << 20, "pyvhost-test-hangup")
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(4)]
    try:
        desc = MemoryRegionDesc(0, 1 << 20, 0x7F0000000000, 0)
        c.send_raw(encode(R.SET_MEM_TABLE, MemoryTable((desc,))), [ram])
        for i, ring in enumerate((0, 1)):
            c.send_raw(encode(R.SET_VRING_KICK, VringFd(ring, False)), [fds[2 * i]])
            c.send_raw(encode(R.SET_VRING_CALL, VringFd(ring, False)), [fds[2 * i + 1]])
    finally:
        c.close()
        for fd in [ram, *fds]:
            os.close(fd)


def test_a_frontend_that_hangs_up_right_after_setup_leaks_no_fd(daemon, sock_path):
    with NetFrontend.connect(sock_path) as fe:  # warm up: the daemon's own fds settle
        fe.post_rx()
    wait_for(lambda: not daemon.maps("pyvhost-frontend-ram"), 5, "the first session to end")
    baseline = daemon.settled_fds()
    for _ in range(50):
        setup_and_hang_up(sock_path)
    wait_for(lambda: daemon.fds() == baseline, 5, "the daemon's fds to return to baseline")
    assert not daemon.maps("pyvhost-test-hangup")
