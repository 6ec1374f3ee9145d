"""The TX drain takes chains in batches: what a batch promises the ring.

The host side here is scripted: a real TAP's send buffer cannot be filled on
demand, so a host that refuses writes after a count stands in for it.
"""

from __future__ import annotations

import os

import pytest

from pyvhost.device import RingConfig
from pyvhost.devices.net.datapath import QueuePair
from pyvhost.eventloop import EventLoop
from pyvhost.testing import GuestRam
from pyvhost.virtq.driver import DriverQueue, ring_footprint

SIZE = 64
HDR = 12


class ScriptedHost:
    """Takes `room` frames, then says its send buffer is full."""

    has_vnet_hdr = True

    def __init__(self, room: int) -> None:
        self.room = room
        self.frames: list[bytes] = []
        self._fd = os.eventfd(0)

    def fileno(self) -> int:
        return self._fd

    def has_frames(self) -> bool:
        return False

    def read_iovec(self, buffers: list) -> int:
        raise BlockingIOError

    def write_iovec(self, buffers: list) -> int:
        if len(self.frames) >= self.room:
            raise BlockingIOError
        self.frames.append(b"".join(buffers))
        return len(self.frames[-1])

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def tx():
    loop = EventLoop()
    host = ScriptedHost(room=5)
    with GuestRam(1 << 20) as ram:
        driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
        kick, call = os.eventfd(0), os.eventfd(0)
        config = RingConfig(
            index=1, size=SIZE, desc=driver.desc_addr, avail=driver.avail_addr,
            used=driver.used_addr, base=0, memory=ram.map_again(), kick_fd=kick, call_fd=call,
        )  # fmt: skip
        pair = QueuePair(0, host, loop)
        pair.configure(1 << 32)
        pair.start_ring(False, config)
        pair.set_ring_enabled(False, True)
        yield ram, driver, pair, host
        pair.close()
        host.close()
        for fd in (kick, call):
            os.close(fd)
    loop.close()


def post(ram, driver, n: int) -> list[bytes]:
    frames = []
    for i in range(n):
        data = bytes(HDR) + bytes([i]) * 60
        addr = ram.alloc(len(data))
        ram.memory.write(addr, data)
        driver.add(readable=[(addr, len(data))])
        frames.append(data)
    driver.publish()
    return frames


def test_a_full_tap_mid_batch_gives_the_rest_of_the_batch_back_to_the_ring(tx):
    ram, driver, pair, host = tx
    frames = post(ram, driver, 12)
    pair.process_tx_queue_event()
    assert host.frames == frames[:5]
    assert len(driver.used()) == 5  # only what the TAP took is returned
    assert pair.txq.next_avail == 5
    host.room = 100
    pair._on_tap_writable()  # the TAP has room again
    assert host.frames == frames
    assert len(driver.used()) == 7
    assert pair.tx_counters.packets == 12


def test_counters_of_a_batch_add_up_to_its_frames_and_bytes(tx):
    ram, driver, pair, host = tx
    host.room = 100
    frames = post(ram, driver, 40)
    pair.process_tx_queue_event()
    assert pair.tx_counters.packets == 40
    assert pair.tx_counters.bytes == sum(len(f) - HDR for f in frames)
