from __future__ import annotations

import os

import pytest

from pyvhost.device import QueueNotifier, VirtioDevice
from pyvhost.eventloop import EventLoop
from pyvhost.frontend.client import eventfd
from pyvhost.testing import GuestRam
from pyvhost.testing.memfd import open_fds
from pyvhost.vhost_user.backend import Backend
from pyvhost.vhost_user.codec import REQUESTS, MessageReader, decode_reply, encode
from pyvhost.vhost_user.messages import U64, Empty, MemoryRegionDesc, MemoryTable
from pyvhost.vhost_user.protocol import VHOST_USER_F_PROTOCOL_FEATURES, Request as R
from pyvhost.virtq import VIRTIO_F_VERSION_1, DriverQueue, SplitQueue, ring_footprint

FRONTEND_BASE = 0x7F00_0000_0000
EMPTY = Empty()


class RecordingDevice(VirtioDevice):
    """A device model that records what the protocol layer tells it.

    On a kick it pops every available chain and holds it (buffers in flight)
    until the test calls complete(). The protocol layer under test is real;
    this stands in for virtio-net so each protocol rule is seen in isolation.
    """

    name = "recording"

    def __init__(self, queues: int = 2) -> None:
        self.queues = queues
        self.events: list[tuple] = []
        self.started: dict[int, tuple[SplitQueue, QueueNotifier]] = {}
        self.held: dict[int, list] = {}
        self.acked_features = 0

    def features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1

    def num_queues(self) -> int:
        return self.queues

    def config(self) -> bytes:
        return bytes(range(16))

    def queue_started(self, index, queue, notifier) -> None:
        self.events.append(("started", index))
        self.started[index] = (queue, notifier)

    def queue_stopped(self, index) -> None:
        self.events.append(("stopped", index))
        self.started.pop(index, None)
        self.held.pop(index, None)

    def queue_enabled(self, index, enabled) -> None:
        self.events.append(("enabled" if enabled else "disabled", index))

    def queue_kicked(self, index) -> None:
        queue = self.started[index][0]
        self.held.setdefault(index, []).extend(queue.pop_batch(queue.size))

    def complete(self, index: int) -> None:
        queue, notifier = self.started[index]
        queue.push_used_batch([(c.head, 0) for c in self.held.pop(index, [])])
        notifier.notify()

    def reset(self) -> None:
        self.events.append(("reset",))


class Session:
    """A back-end fed encoded requests directly: the protocol without a socket."""

    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.loop = EventLoop()
        device.attach(self.loop)  # as the daemon does
        self.backend = Backend(device, self.loop)
        self.reader = MessageReader()
        self.owned_fds: list[int] = []

    def send(self, request: R, payload=EMPTY, fds=(), need_reply=False):
        """One request; returns the decoded reply payload, the ack code, or None."""
        fds = [os.dup(fd) for fd in fds]  # what SCM_RIGHTS would hand the back-end
        [frame] = self.reader.feed(encode(request, payload, need_reply=need_reply), fds)
        reply = self.backend.handle(frame)
        if reply is None:
            return None
        [rframe] = MessageReader().feed(reply)
        if rframe.header.size == 0:
            return "empty"
        return decode_reply(rframe, request, REQUESTS[request].reply or U64)

    def eventfd(self) -> int:
        fd = eventfd()
        self.owned_fds.append(fd)
        return fd

    def negotiate(self, features: int | None = None, protocol: int | None = None) -> None:
        offered = self.send(R.GET_FEATURES).value
        if protocol is not None:
            self.send(R.SET_PROTOCOL_FEATURES, U64(protocol))
        self.send(R.SET_OWNER)
        self.send(R.SET_FEATURES, U64(offered if features is None else features))

    def share(self, ram: GuestRam) -> None:
        desc = MemoryRegionDesc(ram.guest_base, ram.size, FRONTEND_BASE + ram.guest_base, 0)
        assert self.send(R.SET_MEM_TABLE, MemoryTable((desc,)), [ram.fd], need_reply=True) in (
            None,
            U64(0),
        )

    def start_ring(self, ram: GuestRam, index: int, size: int = 16, kick: int | None = None):
        from pyvhost.vhost_user.messages import VringAddr, VringFd, VringState

        base = ram.alloc(ring_footprint(size), align=4096)
        driver = DriverQueue.layout(ram.memory, base, size)
        self.send(R.SET_VRING_NUM, VringState(index, size))
        self.send(R.SET_VRING_BASE, VringState(index, 0))
        self.send(
            R.SET_VRING_ADDR,
            VringAddr(
                index,
                0,
                FRONTEND_BASE + driver.desc_addr,
                FRONTEND_BASE + driver.used_addr,
                FRONTEND_BASE + driver.avail_addr,
            ),
        )
        call = self.eventfd()
        self.send(R.SET_VRING_CALL, VringFd(index, False), [call])
        kick = self.eventfd() if kick is None else kick
        driver.kick_fd = kick
        self.send(R.SET_VRING_KICK, VringFd(index, False), [kick])
        return driver

    def run(self) -> None:
        """Let the event loop deliver pending kicks."""
        self.loop.run_once(0)

    def close(self) -> None:
        self.backend.close()
        self.loop.close()
        for fd in self.owned_fds:
            os.close(fd)


def own_fds() -> set[int]:
    return open_fds()


@pytest.fixture
def device():
    return RecordingDevice()


@pytest.fixture
def session(device):
    s = Session(device)
    yield s
    s.close()


@pytest.fixture
def ram():
    with GuestRam(1 << 20, name="pyvhost-test-guest") as ram:
        yield ram


PROTOCOL_FEATURES_BIT = 1 << VHOST_USER_F_PROTOCOL_FEATURES
