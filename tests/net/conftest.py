from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid

import pytest

from pyvhost.backends.tap import Tap
from pyvhost.control import request
from pyvhost.frontend.net import NetFrontend
from pyvhost.testing.netns import NetNamespace, link_exists
from pyvhost.testing.processes import PyvhostProcess, wait_for

GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("02000000aa01")
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental: nothing else on the link uses it


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + ETHERTYPE + payload


def ours(data: bytes) -> bool:
    return data[12:14] == ETHERTYPE


def recv_ours(sock, n: int = 1) -> list[bytes]:
    """Frames of ours from a packet socket (the kernel's own IPv6 chatter skipped)."""
    out = []
    while len(out) < n:
        data = sock.recv(70000)
        if ours(data):
            out.append(data)
    return out


def receive_ours(fe, n: int, pair: int = 0, timeout: float = 5.0, **kw) -> list[bytes]:
    """Up to `n` frames of ours received by the Python front-end on `pair`."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for f in fe.receive(pair, timeout=0.2, count=n - len(got), **kw):
            if ours(f[fe.hdr_size :] if kw.get("with_header") else f):
                got.append(f)
    return got


@contextlib.contextmanager
def io_uring_disabled():
    """kernel.io_uring_disabled=2 (no process may create a ring), restored after."""
    path = "/proc/sys/kernel/io_uring_disabled"
    if not os.path.exists(path) or not os.access(path, os.W_OK):
        pytest.skip("needs root and a kernel with kernel.io_uring_disabled (6.6+)")
    with open(path) as f:
        before = f.read().strip()
    with open(path, "w") as f:
        f.write("2")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(before)


@pytest.fixture
def netns():
    with NetNamespace() as ns:
        yield ns


class NetDaemon:
    """A `pyvhost net` process, its TAP moved into a namespace."""

    def __init__(self, tmp_path, netns: NetNamespace, netdev: str, *extra: str, move=True):
        self.ifname = f"pv{uuid.uuid4().hex[:8]}"
        self.sock = str(tmp_path / "net.sock")
        self.netns = netns
        netdev = netdev.replace("IFNAME", self.ifname)
        self.proc = PyvhostProcess(
            ["net", "--socket", self.sock, "--netdev", netdev, *extra], self.sock
        )
        if move:
            netns.adopt(self.ifname, ipv6=False)  # a quiet link: every frame is a test's

    def stop(self):
        status, out, err = self.proc.stop()
        assert status == 0, err
        assert not os.path.exists(self.sock), "socket file left behind"
        assert not os.path.exists(self.sock + ".stats"), "stats socket left behind"
        assert not link_exists(self.ifname, self.netns.name), "TAP left behind"
        return out, err


@pytest.fixture
def net_daemon(tmp_path, netns):
    daemons = []

    def start(netdev: str = "tap,ifname=IFNAME", *extra: str, move: bool = True) -> NetDaemon:
        d = NetDaemon(tmp_path, netns, netdev, *extra, move=move)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        if d.proc.proc.poll() is None:
            d.stop()


# --- helpers shared by the datapath tests of every engine -------------------------------

SO_RCVBUFFORCE = 33


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def numbered(n: int, start: int = 0, out: bool = True) -> list[bytes]:
    """Frames carrying their sequence number: out (guest to host) or in."""
    dst, src = (HOST_MAC, GUEST_MAC) if out else (GUEST_MAC, HOST_MAC)
    return [frame(dst, src, (start + i).to_bytes(4, "big") + bytes(60)) for i in range(n)]


def big_socket(netns, ifname: str, vnet_hdr: bool = False) -> socket.socket:
    s = netns.packet_socket(ifname, vnet_hdr=vnet_hdr)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    s.settimeout(20)
    return s


def switch_under_traffic(d: NetDaemon, netns, kinds: list[str], total: int = 3000) -> None:
    """Numbered frames stream both ways while pair 0 moves to each datapath in
    `kinds` in turn; every frame must arrive once, in order."""
    netns.ip("link", "set", "dev", d.ifname, "txqueuelen", "20000")
    host = big_socket(netns, d.ifname)
    stats = d.sock + ".stats"
    received_out: list[bytes] = []
    stop = threading.Event()

    def host_side():
        """Collect what reaches the TAP; meanwhile send numbered frames in."""
        sent = 0
        host.settimeout(0.01)
        while not stop.is_set():
            if sent < total:
                host.send(numbered(1, start=sent, out=False)[0])
                sent += 1
            try:
                data = host.recv(2000)
            except TimeoutError:
                continue
            if ours(data) and data[:6] == HOST_MAC:
                received_out.append(data)

    with NetFrontend.connect(d.sock, queue_size=512) as fe:
        fe.post_rx()
        thread = threading.Thread(target=host_side)
        thread.start()
        outgoing = numbered(total)
        got_in: list[bytes] = []
        sent = switches = 0
        try:
            while sent < total or len(got_in) < total:
                for f in outgoing[sent : sent + 100]:
                    fe.send(f)
                sent = min(sent + 100, total)
                got_in += [f for f in fe.receive(timeout=0.05, count=512) if ours(f)]
                if sent % 300 == 0 and switches < len(kinds):
                    reply = request(stats, {"cmd": "datapath", "to": kinds[switches]})
                    assert reply["ok"], reply
                    switches += 1
                wait_for(lambda s=sent: fe.tx_done() == s, 20, "TX completions")
            wait_for(lambda: len(received_out) >= total, 20, "the frames at the TAP")
        finally:
            stop.set()
            thread.join(10)
    assert switches == len(kinds)
    assert received_out == outgoing  # guest to host: none lost, doubled or reordered
    assert got_in == numbered(total, out=False)  # host to guest: likewise
    host.close()


def hot_plug_reaches_the_engine(d: NetDaemon, netns) -> None:
    """Frames sent from a region added while the rings run reach the TAP; after
    the region is removed, a descriptor into it breaks the ring (error eventfd):
    whatever serves the rings (a worker, the kernel) has the new map."""
    from pyvhost.devices.net import spec

    host = big_socket(netns, d.ifname)
    with NetFrontend.connect(d.sock, use_add_mem_reg=True) as fe:
        desc, dimm = fe.add_region(1 << 32, 1 << 20)
        sent = numbered(20)
        for i, f in enumerate(sent):  # sent from the DIMM: only there if the engine knows it
            fe.send(f, buffer=dimm.guest_base + 4096 * i)
        assert recv_ours(host, 20) == sent
        wait_for(lambda: fe.tx_done() == 20, 20, "completions")
        fe.remove_region(desc)
        after = numbered(20, start=20)
        for f in after:
            fe.send(f)
        assert recv_ours(host, 20) == after
        tx = fe.rings[spec.tx_queue(0)]
        tx.inflight[tx.queue.add(readable=[(desc.guest_addr, 90)])] = None
        tx.queue.kick()
        wait_for(lambda: fe.ring_errors(spec.tx_queue(0)) > 0, 20, "the ring's error")
    host.close()


@contextlib.contextmanager
def tap_in(netns):
    """A TAP with 12-byte virtio-net headers, its link in `netns`, and a packet
    socket there: what the host side sends, the TAP's reader gets."""
    name = f"pu{os.getpid() % 100000}"
    tap = Tap.open(name, vnet_hdr=True, multi_queue=False)
    try:
        tap.set_vnet_hdr_size(12)
        netns.adopt(name, ipv6=False)
        host = netns.packet_socket(name)
        try:
            yield tap, host
        finally:
            host.close()
    finally:
        tap.close()
