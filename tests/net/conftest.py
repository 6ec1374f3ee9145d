from __future__ import annotations

import os
import time
import uuid

import pytest

from pyvhost.testing.netns import NetNamespace, link_exists
from pyvhost.testing.processes import PyvhostProcess

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
