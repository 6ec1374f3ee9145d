"""The datapath takes chains in batches: what a batch promises the ring.

The host side here is scripted: a real TAP's send buffer cannot be filled on
demand, nor its queue held at an exact count, so a host that refuses writes
after a count, and holds a list of frames to read, stands in for it.
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
        self.incoming: list[bytes] = []  # frames to be read, with their vnet header
        self.reads: list[int] = []  # how many buffers each read was offered
        self._fd = os.eventfd(0)

    def fileno(self) -> int:
        return self._fd

    def has_frames(self) -> bool:
        return False

    def read_iovec(self, buffers: list) -> int:
        if not self.incoming:
            raise BlockingIOError
        self.reads.append(len(buffers))
        data = memoryview(self.incoming.pop(0))
        pos = 0
        for b in buffers:
            n = min(len(b), len(data) - pos)
            b[:n] = data[pos : pos + n]
            pos += n
        return len(data)

    def write_iovec(self, buffers: list) -> int:
        if len(self.frames) >= self.room:
            raise BlockingIOError
        self.frames.append(b"".join(buffers))
        return len(self.frames[-1])

    def close(self) -> None:
        os.close(self._fd)


def serve(ram, pair, driver, rx: bool, kick: int, call: int) -> None:
    config = RingConfig(
        index=0 if rx else 1, size=SIZE, desc=driver.desc_addr, avail=driver.avail_addr,
        used=driver.used_addr, base=0, memory=ram.map_again(), kick_fd=kick, call_fd=call,
    )  # fmt: skip
    pair.start_ring(rx, config)
    pair.set_ring_enabled(rx, True)


@pytest.fixture
def rx():
    loop = EventLoop()
    host = ScriptedHost(room=0)
    with GuestRam(1 << 20) as ram:
        driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
        kick, call = os.eventfd(0), os.eventfd(0)
        pair = QueuePair(0, host, loop)
        pair.configure(1 << 32 | 1 << 15)  # VERSION_1, MRG_RXBUF
        serve(ram, pair, driver, True, kick, call)
        yield ram, driver, pair, host
        pair.close()
        host.close()
        for fd in (kick, call):
            os.close(fd)
    loop.close()


def post_buffers(ram, driver, n: int, size: int = 2048) -> list[int]:
    heads = [driver.add(writable=[(ram.alloc(size), size)]) for _ in range(n)]
    driver.publish()
    return heads


def test_a_lone_frame_takes_one_rx_buffer_and_leaves_the_rest_posted(rx):
    ram, driver, pair, host = rx
    heads = post_buffers(ram, driver, 32)
    host.incoming.append(bytes(HDR) + b"x" * 60)
    pair.process_tap_rx_event()
    assert [h for h, _ in driver.used()] == heads[:1]
    assert pair.rxq.next_avail == 1


def test_a_stream_of_frames_fills_buffers_in_ring_order_across_batches(rx):
    ram, driver, pair, host = rx
    heads = post_buffers(ram, driver, 48)
    host.incoming += [bytes(HDR) + bytes([i]) * 60 for i in range(40)]
    pair.process_tap_rx_event()
    used = driver.used()
    assert [h for h, _ in used] == heads[:40]
    assert all(n == HDR + 60 for _, n in used)
    assert pair.rxq.next_avail == 40 and pair.rx_counters.packets == 40


def test_a_frame_too_big_for_one_buffer_merges_into_the_next_ones_in_order(rx):
    ram, driver, pair, host = rx
    heads = post_buffers(ram, driver, 16, size=1024)
    host.incoming += [bytes(HDR) + b"a" * 60, bytes(HDR) + b"b" * 3000, bytes(HDR) + b"c" * 60]
    pair.process_tap_rx_event()
    used = driver.used()
    # 72 bytes; then 3012 over three 1024-byte buffers; then 72.
    assert used == [(heads[0], 72), (heads[1], 1024), (heads[2], 1024), (heads[3], 964),
                    (heads[4], 72)]  # fmt: skip
    assert pair.rxq.next_avail == 5


@pytest.fixture
def tx():
    loop = EventLoop()
    host = ScriptedHost(room=5)
    with GuestRam(1 << 20) as ram:
        driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
        kick, call = os.eventfd(0), os.eventfd(0)
        pair = QueuePair(0, host, loop)
        pair.configure(1 << 32)
        serve(ram, pair, driver, False, kick, call)
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


def read_back(ram, driver, used, addrs) -> bytes:
    return b"".join(ram.memory.read(addrs[h], n) for h, n in used)


def test_after_one_big_frame_the_next_ones_are_read_in_place_across_chains(rx):
    ram, driver, pair, host = rx
    size = 16384
    addrs = {}
    for _ in range(12):
        a = ram.alloc(size)
        addrs[driver.add(writable=[(a, size)])] = a
    driver.publish()
    frames = [bytes(HDR) + bytes([i]) * 40000 for i in range(3)] + [bytes(HDR) + b"s" * 60]
    host.incoming += frames
    pair.process_tap_rx_event()
    used = driver.used()
    # Three chains per big frame (num_buffers 3), one for the small one.
    assert [n for _, n in used] == [16384, 16384, 7244] * 3 + [72]
    pos = 0
    for f, k in zip(frames, (3, 3, 3, 1), strict=True):
        data = read_back(ram, driver, used[pos : pos + k], addrs)
        assert data[HDR:] == f[HDR:]
        assert int.from_bytes(data[10:12], "little") == k  # num_buffers
        pos += k
    assert pair.rxq.next_avail == 10
    # The first big frame was offered one chain (and the bounce buffer, then
    # copied on); the next ones three chains, filled in place; the small one
    # after them three too, of which it took one.
    assert host.reads == [2, 4, 4, 4]
