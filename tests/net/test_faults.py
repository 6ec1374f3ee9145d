"""Traffic under faults (issue 10, part 2): the TAP going down and up, the
TAP's queue overflowing, the front-end killed in the middle of a batch.
Every frame is accounted for (sent = delivered + dropped + errors, with the
kernel's own TAP counters where the kernel drops), and nothing leaks."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import socket
import time

from pyvhost.frontend.net import NetFrontend
from pyvhost.stats import fetch
from pyvhost.testing.processes import wait_for

from .conftest import GUEST_MAC, HOST_MAC, frame, ours

SO_RCVBUFFORCE = 33


def tap_counter(netns, ifname: str, name: str) -> int:
    r = netns.run("cat", f"/sys/class/net/{ifname}/statistics/{name}", capture_output=True,
                  text=True, check=True)  # fmt: skip
    return int(r.stdout)


def send(fe: NetFrontend, data: bytes) -> None:
    """Send one frame, waiting for the back-end to return buffers when the ring is full."""
    while True:
        try:
            fe.send(data)
            return
        except BlockingIOError:
            fe.tx_done()
            time.sleep(0.0005)


def counters(d, queue: str) -> dict[str, int]:
    return fetch(d.sock + ".stats")["queues"][queue]


class Counted:
    """Frames of ours arriving on a packet socket, counted as they come."""

    def __init__(self, netns, ifname: str) -> None:
        self.sock = netns.packet_socket(ifname)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        self.sock.setblocking(False)
        self.count = 0

    def drain(self) -> int:
        while True:
            try:
                data = self.sock.recv(70000)
            except BlockingIOError:
                return self.count
            except OSError as e:  # ENETDOWN while the link is down
                if e.errno != errno.ENETDOWN:
                    raise
                return self.count
            if ours(data):
                self.count += 1


def test_frames_sent_while_the_tap_goes_down_and_up_are_all_accounted_for(net_daemon, netns):
    d = net_daemon()
    host = Counted(netns, d.ifname)
    sent = 3000
    with NetFrontend.connect(d.sock) as fe:
        for i in range(sent):
            send(fe, frame(HOST_MAC, GUEST_MAC, i.to_bytes(4, "big") + bytes(100)))
            if i == 1000:
                netns.ip("link", "set", "dev", d.ifname, "down")
            elif i == 2000:
                netns.ip("link", "set", "dev", d.ifname, "up")
            host.drain()
        wait_for(lambda: fe.tx_done() == sent, 20, "every chain to come back")
    time.sleep(0.2)
    delivered = host.drain()
    tx = counters(d, "tx0")
    kernel_dropped = tap_counter(netns, d.ifname, "rx_dropped")
    # Every chain pyvhost took is counted once: written to the TAP, or dropped
    # (a down TAP refuses writes, and the kernel counts each refusal too).
    assert tx["packets"] + tx["drops"] + tx["errors"] == sent, tx
    assert delivered == tx["packets"], (delivered, tx)  # none lost after the TAP took it
    assert kernel_dropped == tx["drops"] > 0, (kernel_dropped, tx)  # the fault was seen


def test_a_full_tap_queue_drops_are_counted_by_the_kernel(net_daemon, netns):
    d = net_daemon()
    netns.ip("link", "set", "dev", d.ifname, "txqueuelen", "64")
    host = netns.packet_socket(d.ifname)
    sent = 4000
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx(count=32)  # the guest is slow: few buffers, so the TAP's queue fills
        for i in range(sent):
            host.send(frame(GUEST_MAC, HOST_MAC, i.to_bytes(4, "big") + bytes(500)))
        received = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = [f for f in fe.receive(timeout=0.3) if ours(f)]
            received += len(got)
            fe.post_rx(count=32)
            if not got and received:
                break
    rx = counters(d, "rx0")
    kernel_dropped = tap_counter(netns, d.ifname, "tx_dropped")
    assert kernel_dropped > 0  # the queue did overflow: the test saw the fault
    assert received + rx["drops"] + rx["errors"] + kernel_dropped == sent, (
        received, rx, kernel_dropped)  # fmt: skip
    host.close()


def _stream_until_killed(path: str, ready) -> None:
    fe = NetFrontend.connect(path)
    ready.set()
    i = 0
    while True:  # SIGKILL ends this mid-batch
        send(fe, frame(HOST_MAC, GUEST_MAC, i.to_bytes(4, "big") + bytes(200)))
        i += 1


def test_a_frontend_killed_mid_batch_leaves_nothing_and_every_frame_is_counted(net_daemon, netns):
    d = net_daemon()
    host = Counted(netns, d.ifname)
    with NetFrontend.connect(d.sock) as fe:  # warm up: the daemon's own fds settle
        fe.post_rx()
    wait_for(lambda: not d.proc.maps("pyvhost-frontend-ram"), 10, "the warm-up to end")
    baseline = d.proc.settled_fds()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_stream_until_killed, args=(d.sock, ready))
    child.start()
    assert ready.wait(20)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        host.drain()
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    wait_for(lambda: not d.proc.maps("pyvhost-frontend-ram"), 10, "the memory to be unmapped")
    wait_for(lambda: d.proc.fds() == baseline, 10, "the session's fds to be closed")
    time.sleep(0.2)
    delivered = host.drain()
    tx = counters(d, "tx0")
    assert delivered > 0
    assert tx["packets"] == delivered + tap_counter(netns, d.ifname, "rx_dropped"), tx
    with NetFrontend.connect(d.sock) as fe:  # and the next front-end is served
        fe.send(frame(HOST_MAC, GUEST_MAC, b"after"))
        wait_for(lambda: host.drain() == delivered + 1, 10, "the next front-end's frame")
