"""virtio-net over a real TAP: the Python front-end plays the guest, a packet
socket in a network namespace plays the host."""

from __future__ import annotations

import signal
import socket
import struct
import time
import uuid

import pytest

from pyvhost.backends.tap import Tap
from pyvhost.devices.net import spec
from pyvhost.devices.net.datapath import TX_BUDGET
from pyvhost.frontend.net import NetFrontend
from pyvhost.stats import fetch
from pyvhost.testing.frames import gso_header, tcp4_frame
from pyvhost.testing.processes import wait_for

from .conftest import GUEST_MAC, HOST_MAC, big_socket, frame, receive_ours, recv_ours

GSO_PAYLOAD = 64000
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: SO_RCVBUF past rmem_max (we are root)


def host_frames(n: int, size: int = 100) -> list[bytes]:
    return [frame(GUEST_MAC, HOST_MAC, i.to_bytes(4, "big") + bytes(size)) for i in range(n)]


def guest_frames(n: int, size: int = 100) -> list[bytes]:
    return [frame(HOST_MAC, GUEST_MAC, i.to_bytes(4, "big") + bytes(size)) for i in range(n)]


# --- TX and RX -----------------------------------------------------------------------------


def test_frames_from_the_guest_reach_the_tap_byte_for_byte(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:
        sent = guest_frames(20)
        for f in sent:
            fe.send(f)
        assert recv_ours(host, 20) == sent
    host.close()


@pytest.mark.parametrize("io_uring", ["on", "off"])
def test_frames_reach_the_tap_in_order_whether_batched_or_one_by_one(net_daemon, netns, io_uring):
    """With --io-uring=on a one-buffer frame goes in a batch, a frame whose header
    has a descriptor of its own goes by writev: interleaved, their order holds."""
    d = net_daemon("tap,ifname=IFNAME", f"--io-uring={io_uring}")
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:
        sent = guest_frames(120)
        for i, f in enumerate(sent):
            fe.send(f, split_header=i % 7 in (3, 4), kick=i % 40 == 39)
        assert recv_ours(host, 120) == sent
        wait_for(lambda: fe.tx_done() == 120, 5, "every chain to come back")
    tx = fetch(d.sock + ".stats")["queues"]["tx0"]
    assert (tx["packets"], tx["errors"], tx["drops"]) == (120, 0, 0)
    host.close()


def tap_reads_batch_here() -> bool:
    """Whether this kernel's TAP gives a ring for batched reads: they need
    RWF_NOWAIT (Linux 6.1's TAP lacks it: pyvhost then reads frame by frame)."""
    tap = Tap.open(f"pv{uuid.uuid4().hex[:8]}", vnet_hdr=True, multi_queue=False)
    try:
        reader = tap.open_span_reader()
        if reader is not None:
            reader.close()
        return reader is not None
    finally:
        tap.close()


@pytest.mark.parametrize("io_uring", ["on", "off"])
def test_stats_say_how_each_started_ring_reads_and_writes_the_tap(net_daemon, netns, io_uring):
    if io_uring == "on":
        expected = {"rx": "io_uring" if tap_reads_batch_here() else "readv", "tx": "io_uring"}
    else:
        expected = {"rx": "readv", "tx": "writev"}
    d = net_daemon("tap,ifname=IFNAME", f"--io-uring={io_uring}")
    stats = d.sock + ".stats"
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        assert fetch(stats)["host_io"] == [expected]
    wait_for(lambda: fetch(stats)["host_io"] == [{}], 5, "the rings to stop with the front-end")


def test_frames_from_the_host_reach_the_guest_byte_for_byte(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        sent = host_frames(20)
        for f in sent:
            host.send(f)
        assert receive_ours(fe, 20) == sent
    host.close()


def test_a_64k_tso_frame_from_the_guest_reaches_the_host_whole(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:
        assert fe.features & (1 << spec.F_HOST_TSO4) and fe.features & (1 << spec.F_CSUM)
        big = tcp4_frame(GSO_PAYLOAD, GUEST_MAC, HOST_MAC)
        fe.send(big, header=gso_header(fe.hdr_size))
        while True:  # the packet socket sees the GSO packet before segmentation
            got = host.recv(70000)
            if got[12:14] == b"\x08\x00":
                break
    assert got == big
    host.close()


def test_a_stream_of_large_frames_from_the_guest_is_drained_on_a_timer_whole_and_in_order(
    net_daemon, netns
):
    d = net_daemon()  # --tx-defer-us at its default
    host = big_socket(netns, d.ifname)  # the frames of a deferred drain come together
    sizes = [20000 + 100 * i for i in range(12)]
    with NetFrontend.connect(d.sock) as fe:
        for n in sizes:
            # Header and frame in two buffers, as a TSO frame comes from a Linux guest.
            fe.send(tcp4_frame(n, GUEST_MAC, HOST_MAC), header=gso_header(fe.hdr_size),
                    split_header=True)  # fmt: skip
            time.sleep(0.002)  # a kick a frame, as a stream paced by its ACKs
        got = []
        while len(got) < len(sizes):
            frame = host.recv(70000)
            if frame[12:14] == b"\x08\x00":  # the GSO packets, before segmentation
                got.append(frame)
        stats = queue_stats(d, "tx0")
    assert [len(f) - 54 for f in got] == sizes  # whole, in order (54: the frame's headers)
    assert got[-1] == tcp4_frame(sizes[-1], GUEST_MAC, HOST_MAC)
    assert stats["deferrals"] > 0 and stats["errors"] == stats["drops"] == 0
    host.close()


def test_a_64k_gso_frame_from_the_host_arrives_merged_over_many_buffers(net_daemon, netns):
    d = net_daemon()
    injector = netns.packet_socket(d.ifname, vnet_hdr=True)
    with NetFrontend.connect(d.sock, rx_buf_size=2048) as fe:
        assert fe.features & (1 << spec.F_GUEST_TSO4) and fe.features & (1 << spec.F_MRG_RXBUF)
        fe.post_rx()
        big = tcp4_frame(GSO_PAYLOAD, HOST_MAC, GUEST_MAC)
        injector.send(gso_header(10) + big)  # a 10-byte virtio_net_hdr for PACKET_VNET_HDR
        deadline = time.monotonic() + 5
        got = []
        while not got and time.monotonic() < deadline:
            got = [f for f in fe.receive(timeout=0.5, with_header=True) if len(f) > 60000]
    [data] = got
    flags, gso_type, _, gso_size, _, _, num_buffers = spec.HDR.unpack_from(data)
    assert gso_type == spec.GSO_TCPV4 and gso_size == 1448  # not segmented: offload on
    assert num_buffers == -(-len(data) // 2048) > 1  # merged over that many 2 KiB buffers
    assert data[fe.hdr_size :] == big
    injector.close()


def test_a_stream_of_large_frames_from_the_host_is_read_in_deferred_batches_whole_and_in_order(
    net_daemon, netns
):
    d = net_daemon()  # --rx-defer-us at its default
    injector = netns.packet_socket(d.ifname, vnet_hdr=True)
    sizes = [20000 + 100 * i for i in range(12)]  # each over several 4 KiB buffers
    with NetFrontend.connect(d.sock, rx_buf_size=4096) as fe:
        fe.post_rx()
        for n in sizes:
            injector.send(gso_header(10) + tcp4_frame(n, HOST_MAC, GUEST_MAC))
            time.sleep(0.002)  # one frame a TAP event, as a stream paced by its ACKs
        got = fe.receive(timeout=5, count=len(sizes))
        stats = queue_stats(d, "rx0")
    assert [len(f) - 54 for f in got] == sizes  # whole, in order (54: the frame's headers)
    assert got[-1] == tcp4_frame(sizes[-1], HOST_MAC, GUEST_MAC)
    assert stats["deferrals"] > 0 and stats["errors"] == stats["drops"] == 0
    injector.close()


def test_without_vnet_hdr_no_offload_is_offered_and_headers_are_added_and_removed(
    net_daemon, netns
):
    d = net_daemon("tap,ifname=IFNAME,vnet_hdr=off")
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:
        assert not fe.features & (1 << spec.F_CSUM | 1 << spec.F_GUEST_TSO4)
        fe.post_rx()
        [out] = guest_frames(1)
        fe.send(out)
        assert recv_ours(host) == [out]
        [back] = host_frames(1)
        host.send(back)
        [got] = receive_ours(fe, 1, with_header=True)
        assert got[: fe.hdr_size] == b"\0" * 10 + b"\x01\x00"  # a clean header, 1 buffer
        assert got[fe.hdr_size :] == back
    host.close()


def test_with_no_rx_buffers_frames_wait_in_the_tap_and_none_is_dropped(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    with NetFrontend.connect(d.sock) as fe:
        sent = host_frames(50)
        for f in sent:
            host.send(f)
        time.sleep(0.3)  # pyvhost has had every chance to read (and drop) them
        assert fetch(d.sock + ".stats")["queues"]["rx0"]["drops"] == 0
        fe.post_rx()
        assert receive_ours(fe, 50) == sent
    host.close()


def test_every_queue_pair_carries_traffic(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME,queues=4")
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock, queue_pairs=4) as fe:
        fe.set_queue_pairs(4)
        for pair in range(4):
            fe.post_rx(pair)
            fe.send(frame(HOST_MAC, GUEST_MAC, bytes([pair]) * 60), pair=pair)
        assert sorted(f[14] for f in recv_ours(host, 4)) == [0, 1, 2, 3]
        # Many flows from the host: the TAP spreads them over its queues by hash.
        for port in range(256):
            udp = struct.pack("!HHHH", 1000 + port, 2000, 8, 0)
            ip = struct.pack(
                "!BBHHHBBH4s4s",
                0x45,
                0,
                28,
                0,
                0,
                64,
                17,
                0,
                bytes([10, 0, 1, port]),
                bytes([10, 0, 0, 9]),
            )
            host.send(GUEST_MAC + HOST_MAC + b"\x08\x00" + ip + udp)
        time.sleep(0.5)
        got = {pair: fe.receive(pair, timeout=0.5, count=256) for pair in range(4)}
    stats = fetch(d.sock + ".stats")["queues"]
    assert all(stats[f"tx{p}"]["packets"] >= 1 for p in range(4))
    assert all(len(got[p]) >= 1 for p in range(4)), {p: len(v) for p, v in got.items()}
    assert sum(len(v) for v in got.values()) >= 256
    host.close()


# --- control queue, config, protocol-level requests -----------------------------------------


def test_control_commands(net_daemon):
    d = net_daemon()
    with NetFrontend.connect(d.sock) as fe:
        assert fe.features & (1 << spec.F_CTRL_VQ)
        assert fe.command(spec.CTRL_RX, spec.CTRL_RX_PROMISC, b"\x01") == spec.CTRL_OK
        assert fe.command(spec.CTRL_RX, spec.CTRL_RX_ALLMULTI, b"\x00") == spec.CTRL_OK
        new_mac = bytes.fromhex("5254000000aa")
        assert fe.command(spec.CTRL_MAC, spec.CTRL_MAC_ADDR_SET, new_mac) == spec.CTRL_OK
        assert fe.client.get_config(0, 6) == new_mac
        table = struct.pack("<I", 1) + new_mac + struct.pack("<I", 0)
        assert fe.command(spec.CTRL_MAC, spec.CTRL_MAC_TABLE_SET, table) == spec.CTRL_OK
        assert fe.command(spec.CTRL_MAC, spec.CTRL_MAC_TABLE_SET, table[:7]) == spec.CTRL_ERR
        tso4 = (1 << spec.F_GUEST_CSUM | 1 << spec.F_GUEST_TSO4).to_bytes(8, "little")
        assert (
            fe.command(spec.CTRL_GUEST_OFFLOADS, spec.CTRL_GUEST_OFFLOADS_SET, tso4) == spec.CTRL_OK
        )
        ufo = (1 << spec.F_GUEST_UFO).to_bytes(8, "little")  # never offered
        assert (
            fe.command(spec.CTRL_GUEST_OFFLOADS, spec.CTRL_GUEST_OFFLOADS_SET, ufo) == spec.CTRL_ERR
        )
        assert fe.command(99, 0) == spec.CTRL_ERR
        # MQ was not negotiated (one pair): the command is refused.
        assert fe.command(spec.CTRL_MQ, spec.CTRL_MQ_VQ_PAIRS_SET, b"\x01\x00") == spec.CTRL_ERR
    stats = fetch(d.sock + ".stats")["queues"]["ctrl"]
    assert stats["packets"] == 5 and stats["errors"] == 4


def test_link_status_follows_the_tap(net_daemon, netns):
    d = net_daemon()
    with NetFrontend.connect(d.sock) as fe:
        status = lambda: struct.unpack("<H", fe.client.get_config(6, 2))[0]  # noqa: E731
        assert status() & spec.S_LINK_UP
        netns.ip("link", "set", "dev", d.ifname, "down")
        assert not status() & spec.S_LINK_UP
        netns.ip("link", "set", "dev", d.ifname, "up")
        assert status() & spec.S_LINK_UP


def test_config_reports_mac_pairs_and_mtu(net_daemon):
    d = net_daemon("tap,ifname=IFNAME,queues=2", "--mac", "52:54:00:ab:cd:ef", "--mtu", "1400")
    with NetFrontend.connect(d.sock) as fe:
        assert fe.features & (1 << spec.F_MTU)
        mac, _, pairs, mtu = spec.CONFIG.unpack(fe.client.get_config(0, spec.CONFIG.size))
        assert (mac, pairs, mtu) == (bytes.fromhex("525400abcdef"), 2, 1400)


def test_net_set_mtu_sets_the_tap_mtu(net_daemon, netns):
    d = net_daemon()
    with NetFrontend.connect(d.sock) as fe:
        fe.client.net_set_mtu(9000)
        assert "mtu 9000" in netns.ip("link", "show", "dev", d.ifname).stdout
        assert struct.unpack("<H", fe.client.get_config(10, 2))[0] == 9000


def test_send_rarp_announces_the_mac_on_the_host_side(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:
        fe.client.send_rarp(GUEST_MAC)
        while (got := host.recv(2000))[12:14] != b"\x80\x35":
            pass
    assert got[:6] == b"\xff" * 6 and got[6:12] == GUEST_MAC and got[22:28] == GUEST_MAC
    host.close()


def test_a_tx_chain_with_only_a_header_is_counted_as_an_error(net_daemon):
    d = net_daemon()
    with NetFrontend.connect(d.sock) as fe:
        fe.send(b"", header=bytes(fe.hdr_size))
        wait_for(lambda: fe.tx_done() == 1, 5, "the chain to come back")
    assert fetch(d.sock + ".stats")["queues"]["tx0"]["errors"] == 1


def test_counters_are_printed_on_sigusr1_and_at_exit(net_daemon):
    d = net_daemon()
    with NetFrontend.connect(d.sock) as fe:
        for f in guest_frames(3):
            fe.send(f)
        wait_for(lambda: fe.tx_done() == 3, 5, "TX completions")
    d.proc.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: fetch(d.sock + ".stats")["sessions"] == 1, 5, "stats")
    time.sleep(0.3)
    out, _ = d.stop()
    tables = [line for line in out.splitlines() if line.startswith("tx0")]
    assert len(tables) == 2  # one for SIGUSR1, one at exit
    assert tables[-1].split()[1] == "3"


# --- busy polling and interrupt moderation ---------------------------------------------


def queue_stats(d, name: str = "tx0") -> dict:
    return fetch(d.sock + ".stats")["queues"][name]


def signal_decisions(d, name: str) -> int:
    """Times the device decided whether to signal: sent, or suppressed by the
    driver's own request (EVENT_IDX). Moderation decides when to ask."""
    s = queue_stats(d, name)
    return s["notifications_sent"] + s["notifications_suppressed"]


def test_while_busy_polling_frames_posted_without_a_kick_are_sent(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME", "--poll-us", "1000000")  # a 1 s window
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:
        first, *rest = guest_frames(5)
        kicks = queue_stats(d)["kicks"]
        fe.send(first)
        assert recv_ours(host, 1) == [first]
        for f in rest:
            fe.send(f, kick=False)
        assert recv_ours(host, 4) == rest
        assert queue_stats(d)["kicks"] == kicks + 1
    host.close()


def test_without_busy_polling_a_frame_waits_for_its_kick(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME", "--poll-us", "0")
    host = netns.packet_socket(d.ifname)
    host.settimeout(0.5)
    with NetFrontend.connect(d.sock) as fe:
        first, second = guest_frames(2)
        fe.send(first)
        assert recv_ours(host, 1) == [first]
        wait_for(lambda: fe.tx_done() == 1, 5, "the first completion")
        time.sleep(0.3)  # let the back-end finish that kick and go back to sleep
        fe.send(second, kick=False)
        with pytest.raises(TimeoutError):
            recv_ours(host, 1)
        fe.kick(spec.tx_queue(0))
        host.settimeout(5)
        assert recv_ours(host, 1) == [second]
    host.close()


@pytest.mark.parametrize("poll_us", ["0", "1000"])
def test_a_burst_beyond_the_tx_budget_is_sent_whole_after_one_kick(net_daemon, netns, poll_us):
    """More frames than one drain may take (TX_BUDGET) behind a single kick:
    the rest go out after the loop's other work, with no kick needed."""
    d = net_daemon("tap,ifname=IFNAME", "--poll-us", poll_us)
    host = netns.packet_socket(d.ifname)
    host.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # room for it all
    host.settimeout(5)
    with NetFrontend.connect(d.sock, queue_size=1024) as fe:
        sent = guest_frames(TX_BUDGET + 100)
        for f in sent:
            fe.send(f, kick=False)
        kicks = queue_stats(d)["kicks"]
        fe.kick(spec.tx_queue(0))
        assert recv_ours(host, len(sent)) == sent
        assert queue_stats(d)["kicks"] == kicks + 1
    host.close()


def test_busy_polling_ends_and_kicks_are_asked_for_again(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME", "--poll-us", "1000")
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:
        kicks = queue_stats(d)["kicks"]
        for f in guest_frames(3):
            fe.send(f)
            time.sleep(0.1)  # far beyond the window: every frame needs its kick
        assert len(recv_ours(host, 3)) == 3
        assert queue_stats(d)["kicks"] == kicks + 3
    host.close()


def test_tx_completions_inside_the_window_are_signalled_once_at_its_end(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME", "--tx-usecs", "1000000", "--poll-us", "0")
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:
        for i, f in enumerate(guest_frames(4)):  # one at a time: four completions
            fe.send(f)
            wait_for(lambda n=i + 1: fe.tx_done() == n, 5, "a TX completion")  # at once
        assert len(recv_ours(host, 4)) == 4
        assert signal_decisions(d, "tx0") == 1  # the first; the rest wait
        wait_for(lambda: signal_decisions(d, "tx0") == 2, 5, "the deferred signal")
    host.close()


def test_rx_is_signalled_at_once_unless_the_guest_is_streaming_out(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME", "--rx-usecs", "1000000")
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)

    def rx_signals() -> int:
        return signal_decisions(d, "rx0")

    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        for f in host_frames(3):  # request/response: each answer signalled at once
            host.send(f)
            assert len(receive_ours(fe, 1)) == 1
        assert rx_signals() == 3
        big = tcp4_frame(GSO_PAYLOAD, GUEST_MAC, HOST_MAC)
        fe.send(big, header=gso_header(fe.hdr_size))  # now the guest streams out
        wait_for(lambda: fe.tx_done() == 1, 5, "the TSO frame")
        host.send(host_frames(1)[0])
        assert len(receive_ours(fe, 1)) == 1  # the used entry is there at once...
        assert rx_signals() == 3  # ...but its signal waits for the window's end
        wait_for(lambda: rx_signals() == 4, 5, "the deferred RX signal")
    host.close()


def test_the_link_going_down_and_up_is_pushed_to_the_frontend(net_daemon, netns):
    """BACKEND_REQ: a config change message on the back-end's channel each time
    the TAP's link changes (acked: REPLY_ACK is negotiated), and the config's
    status follows."""
    d = net_daemon()
    with NetFrontend.connect(d.sock) as fe:
        assert fe.backend_channel is not None  # SET_BACKEND_REQ_FD was accepted
        status = lambda: spec.CONFIG.unpack(fe.client.get_config(0, spec.CONFIG.size))[1]  # noqa: E731
        assert status() & spec.S_LINK_UP
        netns.ip("link", "set", "dev", d.ifname, "down")
        assert fe.poll_backend_requests(timeout=5) == [2]  # CONFIG_CHANGE_MSG
        assert not status() & spec.S_LINK_UP
        netns.ip("link", "set", "dev", d.ifname, "up")
        assert fe.poll_backend_requests(timeout=5) == [2]
        assert status() & spec.S_LINK_UP


def test_a_frontend_that_refuses_config_changes_is_kept_away_while_the_link_is_down(
    net_daemon, netns
):
    """As QEMU does (its virtio-net has no config notifier for vhost-user): the
    only way left to show the guest a down link is to be gone, as QEMU sets a
    vhost-user NIC's link down while its back-end is away."""
    import os

    d = net_daemon()
    fe = NetFrontend.connect(d.sock)
    netns.ip("link", "set", "dev", d.ifname, "down")
    assert fe.poll_backend_requests(timeout=5, status=1) == [2]  # refused, like QEMU
    wait_for(lambda: not os.path.exists(d.sock), 5, "pyvhost to stop listening")
    fe.close()
    netns.ip("link", "set", "dev", d.ifname, "up")
    wait_for(lambda: os.path.exists(d.sock), 5, "pyvhost to listen again")
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
    _, err = d.stop()
    assert "disconnecting it until the link is up again" in err
