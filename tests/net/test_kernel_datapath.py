"""vhost=on: the guest's rings served by the kernel's vhost-net, pyvhost the control plane.

These need /dev/vhost-net, which this CI machine's kernel lacks; the e2e test
tests/e2e/test_kernel_datapath.py runs this file inside a TCG guest whose
kernel has it (with this machine's root, Python and pyvhost). Run it
directly wherever vhost_net is loaded.
"""

from __future__ import annotations

import os
import time

import pytest

from pyvhost.devices.net import spec
from pyvhost.frontend.net import NetFrontend
from pyvhost.guest.vhost_guest import vhost_net_here
from pyvhost.stats import fetch
from pyvhost.testing.frames import gso_header, tcp4_frame
from pyvhost.testing.processes import PyvhostProcess, wait_for

from .conftest import (
    GUEST_MAC,
    HOST_MAC,
    big_socket,
    cpu_seconds,
    frame,
    hot_plug_reaches_the_engine,
    numbered,
    receive_ours,
    recv_ours,
    switch_under_traffic,
)

pytestmark = pytest.mark.skipif(
    not vhost_net_here(),
    reason="needs /dev/vhost-net; tests/e2e/test_kernel_datapath.py runs these in a guest",
)


def test_frames_cross_both_ways_with_no_python_per_packet(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME,vhost=on")
    host = big_socket(netns, d.ifname)
    assert fetch(d.sock + ".stats")["datapaths"] == ["kernel"]
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        assert fetch(d.sock + ".stats")["host_io"] == [{"rx": "kernel", "tx": "kernel"}]
        cpu0 = cpu_seconds(d.proc.pid)
        sent = numbered(2000)
        for i, f in enumerate(sent):
            fe.send(f)
            if i % 200 == 199:
                wait_for(lambda i=i: fe.tx_done() == i + 1, 20, "the kernel's TX completions")
        assert recv_ours(host, len(sent)) == sent
        back = numbered(2000, out=False)
        got: list[bytes] = []
        for i in range(0, len(back), 200):  # paced: the TAP's queue holds 1000
            for f in back[i : i + 200]:
                host.send(f)
            got += receive_ours(fe, 200, timeout=20)
        assert got == back
        cpu = cpu_seconds(d.proc.pid) - cpu0
        stats = fetch(d.sock + ".stats")
    # The Python datapath never saw them, and the daemon barely ran.
    assert stats["queues"]["tx0"]["packets"] == stats["queues"]["rx0"]["packets"] == 0
    assert cpu < 0.5, f"pyvhost used {cpu:.2f} s of CPU for 4000 frames"
    host.close()


def udp4_frame(src_port: int, dst: bytes, src: bytes, payload: bytes = b"x" * 32) -> bytes:
    """Ethernet + IPv4 + UDP (checksums left 0 for UDP): a flow the TAP can hash."""
    import struct

    udp = struct.pack("!HHHH", src_port, 9, 8 + len(payload), 0) + payload
    total = 20 + len(udp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    s = sum(int.from_bytes(ip[i : i + 2], "big") for i in range(0, 20, 2))
    s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
    return dst + src + b"\x08\x00" + ip + udp


def test_two_queue_pairs_each_carry_traffic_through_their_own_vhost_net(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME,queues=2,vhost=on")
    host = big_socket(netns, d.ifname)
    with NetFrontend.connect(d.sock, queue_pairs=2) as fe:
        assert fe.features & (1 << spec.F_MQ)
        fe.set_queue_pairs(2) if fe.features & (1 << spec.F_CTRL_VQ) else None
        for pair in (0, 1):
            fe.post_rx(pair)
            sent = [frame(HOST_MAC, GUEST_MAC, bytes([pair, i]) * 30) for i in range(50)]
            for f in sent:
                fe.send(f, pair=pair)
            assert recv_ours(host, 50) == sent
        # Many flows from the host: the multiqueue TAP spreads them over both pairs.
        flows = [udp4_frame(1000 + i, GUEST_MAC, HOST_MAC) for i in range(256)]
        for f in flows:
            host.send(f)
        got = {0: 0, 1: 0}
        deadline = time.monotonic() + 20
        while sum(got.values()) < len(flows) and time.monotonic() < deadline:
            for pair in (0, 1):
                got[pair] += len([f for f in fe.receive(pair, timeout=0.1, count=256)
                                  if f[12:14] == b"\x08\x00"])  # fmt: skip
        assert sum(got.values()) == len(flows) and got[0] > 0 and got[1] > 0, got
        assert fetch(d.sock + ".stats")["datapaths"] == ["kernel", "kernel"]
    host.close()


def test_a_vhostfd_opened_by_a_parent_is_used(tmp_path, netns):
    vhost = os.open("/dev/vhost-net", os.O_RDWR)
    sock = str(tmp_path / "net.sock")
    ifname = "pvk" + os.urandom(3).hex()
    d = PyvhostProcess(
        ["net", "--socket", sock, "--netdev", f"tap,ifname={ifname},vhostfd={vhost}"],
        sock,
        pass_fds=(vhost,),
    )
    os.close(vhost)  # pyvhost holds its own copy now
    try:
        netns.adopt(ifname, ipv6=False)
        host = big_socket(netns, ifname)
        with NetFrontend.connect(sock) as fe:
            sent = numbered(100)
            for f in sent:
                fe.send(f)
            assert recv_ours(host, 100) == sent
        assert fetch(sock + ".stats")["datapaths"] == ["kernel"]
        host.close()
    finally:
        status, out, err = d.stop()
    assert status == 0, err
    assert "datapath=kernel" in out


def test_a_64k_tso_frame_crosses_the_kernel_datapath_both_ways(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME,vhost=on")
    host = big_socket(netns, d.ifname)
    injector = big_socket(netns, d.ifname, vnet_hdr=True)
    with NetFrontend.connect(d.sock, rx_buf_size=2048) as fe:
        assert fe.features & (1 << spec.F_HOST_TSO4) and fe.features & (1 << spec.F_GUEST_TSO4)
        out = tcp4_frame(64000, GUEST_MAC, HOST_MAC)
        fe.send(out, header=gso_header(fe.hdr_size))
        while (got := host.recv(70000))[12:14] != b"\x08\x00":
            pass
        assert got == out  # the packet socket sees it before segmentation: whole
        fe.post_rx()
        back = tcp4_frame(64000, HOST_MAC, GUEST_MAC)
        injector.send(gso_header(10) + back)
        deadline = time.monotonic() + 20
        frames: list[bytes] = []
        while not frames and time.monotonic() < deadline:
            frames = [f for f in fe.receive(timeout=0.5, with_header=True) if len(f) > 60000]
    [data] = frames
    _, gso_type, _, gso_size, _, _, num_buffers = spec.HDR.unpack_from(data)
    assert gso_type == spec.GSO_TCPV4 and num_buffers > 1  # merged, not segmented
    assert data[fe.hdr_size :] == back
    host.close()
    injector.close()


def test_hot_added_and_removed_memory_reaches_the_kernel_table(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME,vhost=on")
    hot_plug_reaches_the_engine(d, netns)


def test_switching_between_kernel_and_python_loses_doubles_and_reorders_nothing(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME,vhost=on")
    switch_under_traffic(d, netns, ["python", "kernel"] * 5)


def test_a_frontend_that_leaves_leaves_nothing_and_the_next_is_served(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME,vhost=on")
    host = big_socket(netns, d.ifname)
    with NetFrontend.connect(d.sock) as fe:  # the daemon's own fds settle
        fe.send(numbered(1)[0])
        recv_ours(host, 1)
    wait_for(lambda: not d.proc.maps("pyvhost-frontend-ram"), 10, "the session to end")
    baseline = d.proc.settled_fds()
    for _ in range(3):
        fe = NetFrontend.connect(d.sock)
        fe.post_rx()
        sent = numbered(10)
        for f in sent:
            fe.send(f)
        assert recv_ours(host, 10) == sent
        bases = fe.stop_rings()  # GET_VRING_BASE: the kernel's own index
        assert bases[spec.tx_queue(0)] == 10
        fe.close()
        wait_for(lambda: not d.proc.maps("pyvhost-frontend-ram"), 10, "the memory to go")
        try:
            wait_for(lambda: d.proc.fds() == baseline, 10, "the session's fds to close")
        except TimeoutError:
            left = {fd: _target(d.proc.pid, fd) for fd in d.proc.fds() ^ baseline}
            raise AssertionError(f"fds differing from the idle daemon's: {left}") from None
    host.close()


def _target(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return "(closed)"


def test_the_memory_slot_limit_is_the_kernels(net_daemon):
    from pyvhost.backends.vhost_net import max_mem_regions

    d = net_daemon("tap,ifname=IFNAME,vhost=on")
    with NetFrontend.connect(d.sock) as fe:
        assert fe.client.get_max_mem_slots() == max_mem_regions()  # 64 unless tuned


def test_a_hook_or_a_capture_moves_a_kernel_pair_to_python_and_back(net_daemon, netns, tmp_path):
    import subprocess
    import sys

    d = net_daemon("tap,ifname=IFNAME,vhost=on")
    host = big_socket(netns, d.ifname)
    stats = d.sock + ".stats"

    def pyvhost(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pyvhost", *args], capture_output=True,
                              text=True)  # fmt: skip

    def datapaths() -> list[str]:
        return fetch(stats)["datapaths"]

    with NetFrontend.connect(d.sock) as fe:
        assert datapaths() == ["kernel"]
        r = pyvhost("hook", "--socket", d.sock, "pair0", "add",
                    "tests.switch.sample_hooks:drop_marked")  # fmt: skip
        assert r.returncode == 0 and "datapath: python" in r.stdout, r.stderr
        fe.send(frame(HOST_MAC, GUEST_MAC, b"DROP"))
        fe.send(frame(HOST_MAC, GUEST_MAC, b"kept"))
        assert recv_ours(host, 1) == [frame(HOST_MAC, GUEST_MAC, b"kept")]  # the hook ran
        r = pyvhost("datapath", "--socket", d.sock, "kernel")
        assert r.returncode == 2 and "hooks or a capture attached" in r.stderr
        r = pyvhost("hook", "--socket", d.sock, "pair0", "remove",
                    "tests.switch.sample_hooks:drop_marked")  # fmt: skip
        assert r.returncode == 0 and "datapath: kernel" in r.stdout, r.stderr
        fe.send(frame(HOST_MAC, GUEST_MAC, b"DROP"))
        assert recv_ours(host, 1) == [frame(HOST_MAC, GUEST_MAC, b"DROP")]  # no hook now
        pcap = tmp_path / "k.pcapng"
        cap = subprocess.Popen([sys.executable, "-m", "pyvhost", "capture", "--socket", d.sock,
                                "-w", str(pcap), "-c", "3"])  # fmt: skip
        wait_for(lambda: datapaths() == ["python"], 20, "the capture to move the pair")
        sent = numbered(3)
        for f in sent:
            fe.send(f)
        assert recv_ours(host, 3) == sent
        assert cap.wait(20) == 0
        wait_for(lambda: datapaths() == ["kernel"], 20, "the pair to go back to the kernel")
    from pyvhost.capture import read_pcapng

    assert [f for _, _, f in read_pcapng(pcap.read_bytes())] == sent
    host.close()


def test_the_kernel_logs_its_writes_while_a_migration_runs(net_daemon, netns):
    from pyvhost.memory import LOG_PAGE
    from pyvhost.virtq.layout import used_ring_size

    def pages(addr: int, length: int) -> set[int]:
        return set(range(addr // LOG_PAGE, (addr + length - 1) // LOG_PAGE + 1))

    d = net_daemon("tap,ifname=IFNAME,vhost=on")
    host = big_socket(netns, d.ifname)
    with NetFrontend.connect(d.sock) as fe:
        rx, tx = fe.rings[spec.rx_queue(0)], fe.rings[spec.tx_queue(0)]
        rx_used = pages(rx.queue.used_addr, used_ring_size(fe.queue_size))
        tx_used = pages(tx.queue.used_addr, used_ring_size(fe.queue_size))
        fe.post_rx()
        rx_buffers = set().union(*(pages(s, rx.slot_size) for s in rx.inflight.values()))
        fe.start_logging()  # VHOST_SET_LOG_BASE, LOG_ALL, the rings' log addresses
        assert fetch(d.sock + ".stats")["datapaths"] == ["kernel"]
        fe.dirty_pages()
        back = numbered(20, out=False)
        for f in back:
            host.send(f)
        assert receive_ours(fe, 20, timeout=20) == back
        dirty = fe.dirty_pages()
        assert dirty & rx_buffers and rx_used <= dirty  # the kernel logged its RX writes
        assert dirty <= rx_buffers | rx_used
        sent = numbered(10)
        for f in sent:
            fe.send(f)
        assert recv_ours(host, 10) == sent
        wait_for(lambda: fe.tx_done() == 10, 10, "the kernel's TX completions")
        dirty = fe.dirty_pages()
        assert dirty and dirty <= tx_used  # TX writes only its used ring
        fe.stop_logging()
        host.send(back[0])
        assert receive_ours(fe, 1, timeout=20) == back[:1]
        assert fe.dirty_pages() == set()
    host.close()
