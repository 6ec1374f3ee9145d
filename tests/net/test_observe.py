"""Hooks and capture on `pyvhost net`'s Python datapath: real TAP, real front-end."""

from __future__ import annotations

import subprocess
import sys
import time

from pyvhost.capture import read_pcapng
from pyvhost.control import request
from pyvhost.frontend.net import NetFrontend

from .conftest import GUEST_MAC, HOST_MAC, frame, ours, recv_ours


def hook_cmd(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyvhost", "hook", "--socket", d.sock, "pair0", *args],
        capture_output=True,
        text=True,
    )


def receive(fe: NetFrontend, n: int = 1, timeout: float = 3.0) -> list[bytes]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += [f for f in fe.receive(timeout=0.1, count=n) if ours(f)]
    return got


def test_a_capture_of_pyvhost_net_has_both_directions(net_daemon, netns, tmp_path):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(3)
    pcap = tmp_path / "net.pcapng"
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        cap = subprocess.Popen(
            [sys.executable, "-m", "pyvhost", "capture", "--socket", d.sock, "-w", str(pcap),
             "-c", "4"], stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1)
        for i in range(2):
            fe.send(frame(HOST_MAC, GUEST_MAC, b"out %d" % i))
            host.send(frame(GUEST_MAC, HOST_MAC, b"in %d" % i))
        assert cap.wait(10) == 0
        assert len(recv_ours(host, 2)) == 2 and len(receive(fe, 2)) == 2
    packets = [p for p in read_pcapng(pcap.read_bytes()) if ours(p[2])]
    assert sorted(packets) == [
        ("pair0", "in", frame(HOST_MAC, GUEST_MAC, b"out 0")),
        ("pair0", "in", frame(HOST_MAC, GUEST_MAC, b"out 1")),
        ("pair0", "out", frame(GUEST_MAC, HOST_MAC, b"in 0")),
        ("pair0", "out", frame(GUEST_MAC, HOST_MAC, b"in 1")),
    ]
    out = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count(" > ") == 4, out.stderr
    host.close()


def test_hooks_on_a_pair_drop_and_replace_frames_both_ways(net_daemon, netns):
    d = net_daemon()
    host = netns.packet_socket(d.ifname)
    host.settimeout(1)
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        r = hook_cmd(d, "set", "tests.switch.sample_hooks:drop_marked",
                     "tests.switch.sample_hooks:shout")  # fmt: skip
        assert r.returncode == 0 and "drop_marked" in r.stdout, r.stderr
        fe.send(frame(HOST_MAC, GUEST_MAC, b"DROP"))
        fe.send(frame(HOST_MAC, GUEST_MAC, b"quiet"))
        assert recv_ours(host, 1) == [frame(HOST_MAC, GUEST_MAC, b"QUIET")]
        host.send(frame(GUEST_MAC, HOST_MAC, b"xDROP"))
        host.send(frame(GUEST_MAC, HOST_MAC, b"xquiet"))
        assert receive(fe, 1) == [frame(GUEST_MAC, HOST_MAC, b"xQUIET")]
        assert receive(fe, 1, timeout=0.3) == []  # the dropped one never came
        stats = request(d.sock + ".stats", {"cmd": "stats"})
        assert stats["queues"]["tx0"]["drops"] == 1 and stats["queues"]["rx0"]["drops"] == 1
        assert stats["hooks"] == {
            "pair0": ["tests.switch.sample_hooks:drop_marked", "tests.switch.sample_hooks:shout"]
        }
        r = hook_cmd(d, "set")
        assert r.returncode == 0 and "no hooks" in r.stdout
        fe.send(frame(HOST_MAC, GUEST_MAC, b"DROP"))
        assert recv_ours(host, 1) == [frame(HOST_MAC, GUEST_MAC, b"DROP")]
    host.close()


def test_a_hook_that_raises_costs_its_frame_only(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME", "--hook", "pair0=tests.switch.sample_hooks:broken")
    host = netns.packet_socket(d.ifname)
    host.settimeout(2)
    with NetFrontend.connect(d.sock) as fe:
        fe.send(frame(HOST_MAC, GUEST_MAC, b"boom"))
        fe.send(frame(HOST_MAC, GUEST_MAC, b"fine"))
        assert recv_ours(host, 1) == [frame(HOST_MAC, GUEST_MAC, b"fine")]
    _, err = d.stop()
    assert "a bug in a user's hook" in err and "Traceback" in err
    host.close()
