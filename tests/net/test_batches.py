"""The datapath takes chains in batches: what a batch promises the ring.

The host side here is scripted: a real TAP's send buffer cannot be filled on
demand, nor its queue held at an exact count, so a host that refuses writes
after a count, and holds a list of frames to read, stands in for it. The RX
tests run twice: frame by frame (readv), and with batched reads (io_uring's
SpanReader, scripted the same way: a read that finds the queue empty between
two that find frames is a race a real TAP cannot be made to lose on demand).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import time

import pytest

from pyvhost.device import RingConfig
from pyvhost.devices.net.datapath import (
    RX_DEFER_AFTER,
    RX_DEFER_BELOW,
    SPAN_BATCH_MIN,
    TX_DEFER_AFTER,
    QueuePair,
)
from pyvhost.eventloop import EventLoop
from pyvhost.testing import GuestRam
from pyvhost.virtq.driver import DriverQueue, ring_footprint

SIZE = 64
HDR = 12


class Waiting(list):
    """The frames a scripted host holds for reading. Its fd reads readable
    while any wait, as a TAP's does: the datapath polls it before it takes
    more RX buffers."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def _sync(self) -> None:
        readable = bool(select.select([self._fd], [], [], 0)[0])
        if self and not readable:
            os.eventfd_write(self._fd, 1)
        elif not self and readable:
            os.eventfd_read(self._fd)

    def append(self, frame: bytes) -> None:
        super().append(frame)
        self._sync()

    def __iadd__(self, frames):
        super().__iadd__(frames)
        self._sync()
        return self

    def pop(self, index: int = -1) -> bytes:
        frame = super().pop(index)
        self._sync()
        return frame


class ScriptedHost:
    """Takes `room` frames, then says its send buffer is full."""

    has_vnet_hdr = True

    def __init__(self, room: int) -> None:
        self.room = room
        self.frames: list[bytes] = []
        self._fd = os.eventfd(0)
        self.incoming = Waiting(self._fd)  # frames to be read, with their vnet header
        self.reads: list[int] = []  # how many buffers each read was offered
        self.tries = 0  # reads, those that found no frame too
        self.reader: ScriptedReader | None = None
        self.writer: ScriptedWriter | None = None

    def fileno(self) -> int:
        return self._fd

    def has_frames(self) -> bool:
        return False

    def read_iovec(self, buffers: list) -> int:
        self.tries += 1
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

    def open_span_reader(self):
        return self.reader

    def open_span_writer(self):
        return self.writer

    def write_iovec(self, buffers: list) -> int:
        if len(self.frames) >= self.room:
            raise BlockingIOError
        self.frames.append(b"".join(buffers))
        return len(self.frames[-1])

    def close(self) -> None:
        os.close(self._fd)


class ScriptedReader:
    """SpanReader's contract over the scripted host's frames: each read takes
    the next frame into its span (the rest into its overflow) or finds none
    (-EAGAIN); `empty_at` lists reads, counted from 0, that find none even
    though frames wait (the race: a frame queued just after a read looked)."""

    entries = 64

    def __init__(self, host: ScriptedHost) -> None:
        self.host = host
        self.count = 0
        self.empty_at: list[int] = []
        self.fail_with = 0  # an errno every read fails with (the reads themselves broken)
        self.closed = False
        self._overflows: list[bytes] = []

    def read_spans(self, addresses: list[int], lengths: list[int]) -> list[int]:
        results, self._overflows = [], []
        for addr, room in zip(addresses, lengths, strict=True):
            self._overflows.append(b"")
            looked, self.count = self.count, self.count + 1
            if self.fail_with:
                results.append(-self.fail_with)
                continue
            if looked in self.empty_at or not self.host.incoming:
                results.append(-errno.EAGAIN)
                continue
            self.host.reads.append(2)  # a readv of the span and its overflow
            data = self.host.incoming.pop(0)
            ctypes.memmove(addr, data, min(room, len(data)))
            self._overflows[-1] = data[room:]
            results.append(len(data))
        return results

    def overflow(self, position: int, length: int) -> memoryview:
        return memoryview(self._overflows[position])[:length]

    def close(self) -> None:
        self.closed = True


def serve(ram, pair, driver, rx: bool, kick: int, call: int) -> None:
    config = RingConfig(
        index=0 if rx else 1, size=SIZE, desc=driver.desc_addr, avail=driver.avail_addr,
        used=driver.used_addr, base=0, memory=ram.map_again(), kick_fd=kick, call_fd=call,
        indirect=True,
    )  # fmt: skip
    pair.start_ring(rx, config)
    pair.set_ring_enabled(rx, True)


@pytest.fixture(params=["readv", "batched"])
def rx(request):
    loop = EventLoop()
    host = ScriptedHost(room=0)
    if request.param == "batched":
        host.reader = ScriptedReader(host)
    with GuestRam(1 << 20) as ram:
        driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
        kick, call = os.eventfd(0), os.eventfd(0)
        pair = QueuePair(0, host, loop)
        pair.configure(1 << 32 | 1 << 15)  # VERSION_1, MRG_RXBUF
        serve(ram, pair, driver, True, kick, call)
        if host.reader is not None:
            # As after a burst: batched reads are used from the next event on (a
            # trickle of single frames is read by readv, see below).
            pair._rx_last = SPAN_BATCH_MIN
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


def test_a_trickle_of_frames_is_read_one_by_one_and_a_burst_s_next_event_in_batches(rx):
    ram, driver, pair, host = rx
    if host.reader is None:
        pytest.skip("batched reads only")
    heads = post_buffers(ram, driver, 40)
    host.incoming.append(bytes(HDR) + b"a" * 60)
    pair.process_tap_rx_event()  # after a burst: a batch, of which one read found a frame
    batched = host.reader.count
    host.incoming.append(bytes(HDR) + b"b" * 60)
    pair.process_tap_rx_event()  # after a lone frame: a readv
    host.incoming += [bytes(HDR) + bytes([i]) * 60 for i in range(SPAN_BATCH_MIN)]
    pair.process_tap_rx_event()  # still by readv: the event before had one frame
    assert host.reader.count == batched
    host.incoming += [bytes(HDR) + bytes([i]) * 60 for i in range(SPAN_BATCH_MIN)]
    pair.process_tap_rx_event()  # after a burst: one batch, exactly as large
    assert host.reader.count == batched + SPAN_BATCH_MIN
    n = 2 + 2 * SPAN_BATCH_MIN
    assert [h for h, _ in driver.used()] == heads[:n] and pair.rx_counters.packets == n


def test_a_batch_of_reads_that_all_found_frames_polls_before_reading_more(rx):
    ram, driver, pair, host = rx
    if host.reader is None:
        pytest.skip("batched reads only")
    post_buffers(ram, driver, 40)
    host.incoming += [bytes(HDR) + bytes([i]) * 60 for i in range(SPAN_BATCH_MIN)]
    pair.process_tap_rx_event()
    # The batch took every frame; the TAP's fd then read empty, so no further
    # batch of reads was made only to find nothing, and no buffer was taken.
    assert host.reader.count == SPAN_BATCH_MIN
    assert pair.rxq.next_avail == SPAN_BATCH_MIN
    host.incoming += [bytes(HDR) + bytes([i]) * 60 for i in range(3 * SPAN_BATCH_MIN)]
    pair.process_tap_rx_event()  # more than a batch: the poll says so, and a larger one follows
    assert pair.rx_counters.packets == 4 * SPAN_BATCH_MIN


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


class ScriptedWriter:
    """SpanWriter's contract: each span is one frame, written in order (to the
    scripted host's frames); `batches` records how many each call took."""

    def __init__(self, host: ScriptedHost) -> None:
        self.host = host
        self.batches: list[int] = []

    def write_spans(self, addresses: list[int], lengths: list[int]) -> list[int]:
        self.batches.append(len(addresses))
        for addr, length in zip(addresses, lengths, strict=True):
            self.host.frames.append(ctypes.string_at(addr, length))
        return list(lengths)

    def close(self) -> None:
        pass


@pytest.fixture
def tx(request):
    loop = EventLoop()
    host = ScriptedHost(room=5)
    if getattr(request, "param", None) == "batched":
        host.room = 1000
        host.writer = ScriptedWriter(host)
    with GuestRam(1 << 20) as ram:
        driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
        kick, call = os.eventfd(0), os.eventfd(0)
        pair = QueuePair(0, host, loop)
        pair.configure(1 << 32 | 1 << 28)  # VERSION_1, INDIRECT_DESC
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


def test_frames_of_several_buffers_direct_or_indirect_go_whole_and_in_order(tx):
    ram, driver, pair, host = tx
    host.room = 100
    frames = []
    for i in range(12):
        data = bytes(HDR) + bytes([i]) * (60 + 1000 * (i % 3))
        parts = [data[: HDR + 20], data[HDR + 20 :]] if i % 3 else [data]
        bufs = []
        for part in parts:
            addr = ram.alloc(len(part))
            ram.memory.write(addr, part)
            bufs.append((addr, len(part)))
        if i % 4 == 3:
            driver.add_indirect(ram.alloc(16 * len(bufs)), readable=bufs)
        else:
            driver.add(readable=bufs)
        frames.append(data)
    driver.publish()
    pair.process_tx_queue_event()
    assert host.frames == frames
    assert len(driver.used()) == 12 and pair.tx_counters.packets == 12
    assert pair.tx_counters.bytes == sum(len(f) - HDR for f in frames)


def add_frame(ram, driver, parts: list[bytes]) -> bytes:
    bufs = []
    for part in parts:
        addr = ram.alloc(len(part))
        ram.memory.write(addr, part)
        bufs.append((addr, len(part)))
    driver.add(readable=bufs)
    driver.publish()
    return b"".join(parts)


@pytest.mark.parametrize("tx", ["batched"], indirect=True)
def test_batched_writes_wait_out_a_stream_of_frames_of_several_buffers(tx):
    ram, driver, pair, host = tx
    small = bytes(HDR) + b"s" * 60
    sent = [add_frame(ram, driver, [bytes(HDR), b"t" * 3000])]  # a TSO frame's shape
    pair.process_tx_queue_event()
    assert host.writer.batches == []  # no span: written whole, frame by frame
    # While the last batch ended with such a frame, the next is taken whole
    # too (not looked at as spans first), and one that ends with a frame of
    # one buffer brings the batched writes back.
    sent += [add_frame(ram, driver, [small]), add_frame(ram, driver, [small])]
    pair.process_tx_queue_event()
    assert host.writer.batches == []
    sent += [add_frame(ram, driver, [small]) for _ in range(SPAN_BATCH_MIN)]
    pair.process_tx_queue_event()
    assert host.writer.batches == [SPAN_BATCH_MIN]
    assert host.frames == sent
    n = 3 + SPAN_BATCH_MIN
    assert len(driver.used()) == n and pair.tx_counters.packets == n


@pytest.mark.parametrize("tx", ["batched"], indirect=True)
def test_batched_writes_wait_for_enough_frames_to_pay_and_fewer_go_one_by_one(tx):
    ram, driver, pair, host = tx
    sent = []
    for n in range(1, SPAN_BATCH_MIN + 1):
        sent += post(ram, driver, n)
        pair.process_tx_queue_event()
    # One to SPAN_BATCH_MIN - 1 frames posted went by writev; then one batch.
    assert host.writer.batches == [SPAN_BATCH_MIN]
    assert host.frames == sent
    assert pair.tx_counters.packets == len(sent)


def test_a_full_tap_gives_back_frames_of_several_buffers_in_order(tx):
    ram, driver, pair, host = tx
    frames = []
    for i in range(8):
        data = bytes(HDR) + bytes([i]) * 100
        a, b = ram.alloc(HDR), ram.alloc(100)
        ram.memory.write(a, data[:HDR])
        ram.memory.write(b, data[HDR:])
        driver.add(readable=[(a, HDR), (b, 100)])
        frames.append(data)
    driver.publish()
    pair.process_tx_queue_event()
    assert host.frames == frames[:5] and len(driver.used()) == 5
    host.room = 100
    pair._on_tap_writable()
    assert host.frames == frames and len(driver.used()) == 3


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
    if host.reader is None:
        # The first big frame was offered one chain (and the bounce buffer, then
        # copied on); the next ones three chains, filled in place; the small one
        # after them three too, of which it took one.
        assert host.reads == [2, 4, 4, 4]
    else:
        # One batch of four one-buffer reads took all four frames, each into a
        # buffer and its overflow; the big ones were then copied on, in order.
        assert host.reads == [2, 2, 2, 2]


def test_a_batched_read_that_finds_no_frame_before_one_that_does_loses_no_frame_or_order():
    loop = EventLoop()
    host = ScriptedHost(room=0)
    host.reader = ScriptedReader(host)
    host.reader.empty_at = [2]  # the third read of the first batch races a new frame
    with GuestRam(1 << 20) as ram:
        driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
        kick, call = os.eventfd(0), os.eventfd(0)
        pair = QueuePair(0, host, loop)
        pair.configure(1 << 32 | 1 << 15)
        serve(ram, pair, driver, True, kick, call)
        pair._rx_last = SPAN_BATCH_MIN  # as after a burst: the next event reads in batches
        addrs = {}
        for _ in range(16):
            a = ram.alloc(2048)
            addrs[driver.add(writable=[(a, 2048)])] = a
        driver.publish()
        frames = [bytes(HDR) + bytes([i]) * 60 for i in range(6)]
        host.incoming += frames
        pair.process_tap_rx_event()
        used = driver.used()
        assert [read_back(ram, driver, [u], addrs)[HDR:] for u in used] == [f[HDR:] for f in frames]
        assert pair.rxq.next_avail == 6  # the chain the empty read had is used, not lost
        assert pair.rx_counters.packets == 6 and pair.rx_counters.errors == 0
        pair.close()
        host.close()
        for fd in (kick, call):
            os.close(fd)
    loop.close()


def test_after_a_large_frame_batched_reads_start_with_one_so_large_ones_are_not_copied(rx):
    ram, driver, pair, host = rx
    if host.reader is None:
        pytest.skip("batched reads only")
    post_buffers(ram, driver, 40, size=4096)
    big = bytes(HDR) + b"b" * 10000  # three 4096-byte buffers
    small = bytes(HDR) + b"s" * 60
    for frames in ([small], [big], [small]):
        host.incoming += frames
        pair.process_tap_rx_event()
    host.reads.clear()
    host.incoming += [big, big]
    pair.process_tap_rx_event()
    # One read into one buffer (and its overflow, copied on); the stream is then
    # seen to want three buffers a frame, and the second is read across three.
    assert host.reads == [2, 4]
    assert [n for _, n in driver.used()][-6:] == [4096, 4096, 1820] * 2


def test_batched_reads_that_fail_are_given_up_once_and_frames_go_by_readv(rx, caplog):
    ram, driver, pair, host = rx
    if host.reader is None:
        pytest.skip("batched reads only")
    host.reader.fail_with = errno.EOPNOTSUPP  # e.g. a kernel that refuses RWF_NOWAIT
    heads = post_buffers(ram, driver, 8)
    host.incoming += [bytes(HDR) + bytes([i]) * 60 for i in range(3)]
    with caplog.at_level("WARNING"):
        pair.process_tap_rx_event()
        host.incoming.append(bytes(HDR) + b"x" * 60)
        pair.process_tap_rx_event()
    assert [h for h, _ in driver.used()] == heads[:4]  # every frame, by readv
    assert host.reader.closed and caplog.text.count("a batched read of the TAP failed") == 1


def post_at(ram, driver, n: int, size: int) -> dict[int, int]:
    """n one-buffer RX chains of `size` bytes: {head: guest address}."""
    addrs = {}
    for _ in range(n):
        a = ram.alloc(size)
        addrs[driver.add(writable=[(a, size)])] = a
    driver.publish()
    return addrs


def frames_back(ram, driver, used, addrs) -> list[bytes]:
    """The frames of used elements `used`, each joined from its num_buffers chains."""
    frames, pos = [], 0
    while pos < len(used):
        k = int.from_bytes(ram.memory.read(addrs[used[pos][0]] + 10, 2), "little")
        assert k >= 1, f"num_buffers {k} at used element {pos}"
        frames.append(read_back(ram, driver, used[pos : pos + k], addrs))
        pos += k
    return frames


def big_stream(n: int, size: int = 10000) -> list[bytes]:
    return [bytes(10) + b"\x01\x00" + bytes([i]) * size for i in range(n)]


def start_stream(rx, buffers: int = 40) -> dict[int, int]:
    """Post `buffers` 4 KiB RX buffers and read one large frame into them: the
    stream then reads three buffers a frame. Its used elements are taken."""
    ram, driver, pair, host = rx
    addrs = post_at(ram, driver, buffers, 4096)
    host.incoming += big_stream(1)
    pair.process_tap_rx_event()
    driver.used()
    return addrs


def test_a_stream_of_large_frames_is_read_one_read_a_frame_in_place(rx):
    ram, driver, pair, host = rx
    addrs = start_stream(rx)  # the first frame shows the stream wants 3 buffers a frame
    host.reads.clear()
    frames = big_stream(4) + [bytes(HDR) + b"s" * 60]
    host.incoming += frames
    pair.process_tap_rx_event()
    assert host.reads == [4] * 5  # each read across three chains, the small one too
    used = driver.used()
    assert [n for _, n in used] == [4096, 4096, 1820] * 4 + [72]
    got = frames_back(ram, driver, used, addrs)
    assert [g[HDR:] for g in got] == [f[HDR:] for f in frames]
    assert pair.rxq.next_avail == 16 and pair.rx_counters.packets == 6


def test_no_buffers_are_taken_for_a_further_read_once_the_host_side_is_empty(rx):
    ram, driver, pair, host = rx
    start_stream(rx)  # three buffers a frame from now on
    tries = host.tries
    host.incoming += big_stream(1)
    pair.process_tap_rx_event()
    # The frame's read, and none into a further span taken to find the TAP empty.
    assert host.tries - tries == 1
    assert [n for _, n in driver.used()] == [4096, 4096, 1820]
    assert pair.rxq.next_avail == 6


def test_a_frame_longer_than_the_stream_s_span_is_placed_whole_and_in_order(rx):
    ram, driver, pair, host = rx
    addrs = start_stream(rx)  # three buffers a frame from now on
    frames = big_stream(1) + big_stream(1, size=20000) + big_stream(1)
    host.incoming += frames
    pair.process_tap_rx_event()
    got = frames_back(ram, driver, driver.used(), addrs)
    assert [g[HDR:] for g in got] == [f[HDR:] for f in frames]
    assert [len(g) for g in got] == [len(f) for f in frames]  # 20012 bytes: five buffers
    assert pair.rxq.next_avail == 3 + 3 + 5 + 3
    assert pair.rx_counters.errors == 0


def test_a_large_frame_fits_the_fewer_buffers_left_and_then_the_ring_waits(rx):
    ram, driver, pair, host = rx
    addrs = post_at(ram, driver, 5, 4096)
    host.incoming += big_stream(1)
    pair.process_tap_rx_event()  # three buffers a frame; two are left
    host.incoming += big_stream(1, size=6000) + big_stream(1)
    pair.process_tap_rx_event()
    used = driver.used()
    assert [len(g) for g in frames_back(ram, driver, used, addrs)] == [10012, 6012]
    assert len(host.incoming) + len(pair._pending) == 1  # the last waits for buffers
    assert pair.rxq.next_avail == 5
    addrs.update(post_at(ram, driver, 3, 4096))
    pair.process_rx_queue_event()
    assert [len(g) for g in frames_back(ram, driver, driver.used(), addrs)] == [10012]


def test_a_frame_is_not_read_into_the_few_chains_a_batch_ends_with_when_more_wait(rx):
    ram, driver, pair, host = rx
    addrs = start_stream(rx, buffers=SIZE)  # three buffers a frame from now on
    addrs.update(post_at(ram, driver, 3, 4096))  # the ring full again: 64 buffers
    host.reads.clear()
    # 2 + 20 * 3 chains leave one at the end of a batch of 63 (whole spans):
    # the last frame starts a batch of its own, with the ring's last two,
    # rather than being read into that one and copied on.
    frames = big_stream(1, size=6000) + big_stream(20) + big_stream(1, size=6000)
    host.incoming += frames
    pair.process_tap_rx_event()
    assert host.reads == [4] * 21 + [3]
    got = frames_back(ram, driver, driver.used(), addrs)
    assert [g[HDR:] for g in got] == [f[HDR:] for f in frames]


def test_a_stream_merges_over_rx_chains_of_two_buffers_as_over_one_buffer_chains(rx):
    # Not what a Linux driver posts for merged buffers, so the stream's lean
    # path (views of one-buffer chains) passes them to the general one.
    ram, driver, pair, host = rx
    addrs = {}
    for _ in range(30):
        a = ram.alloc(4096)
        addrs[driver.add(writable=[(a, 100), (a + 100, 3996)])] = a
    driver.publish()
    host.incoming += big_stream(1)
    pair.process_tap_rx_event()  # three chains a frame from now on
    frames = big_stream(3) + [bytes(HDR) + b"s" * 60]
    host.incoming += frames
    pair.process_tap_rx_event()
    used = driver.used()
    got = frames_back(ram, driver, used, addrs)
    assert [g[HDR:] for g in got][1:] == [f[HDR:] for f in frames]
    assert pair.rx_counters.packets == 5 and pair.rx_counters.errors == 0


def test_a_read_shorter_than_its_header_in_a_stream_is_an_error_and_the_next_frame_lands(rx):
    ram, driver, pair, host = rx
    addrs = start_stream(rx)  # three buffers a frame from now on
    host.incoming += [b"short"] + big_stream(1)
    pair.process_tap_rx_event()
    used = driver.used()
    assert [n for _, n in used] == [4096, 4096, 1820]  # the runt took no buffer
    assert [len(g) for g in frames_back(ram, driver, used, addrs)] == [10012]
    assert pair.rx_counters.errors == 1 and pair.rx_counters.packets == 2


def test_a_lone_read_shorter_than_its_header_is_an_error_and_the_next_frame_lands(rx):
    ram, driver, pair, host = rx
    heads = post_buffers(ram, driver, 4)
    host.incoming += [b"short", bytes(HDR) + b"x" * 60]
    pair._rx_last = 1  # a trickle: frame by frame
    pair.process_tap_rx_event()
    assert driver.used() == [(heads[0], HDR + 60)]
    assert pair.rx_counters.errors == 1 and pair.rx_counters.packets == 1


def test_a_frame_posted_as_the_drain_asks_for_kicks_again_is_sent_in_that_drain(tx):
    # The race a guest can win: it posts a frame after the drain's last look
    # but before its request for kicks lands, so it will not kick for it.
    ram, driver, pair, host = tx
    host.room = 100
    frames = post(ram, driver, 2)
    rearm = pair.txq.enable_notification
    late: list[bytes] = []

    def guest_posts_meanwhile() -> bool:
        if not late:
            late.extend(post(ram, driver, 1))
        return rearm()

    pair.txq.enable_notification = guest_posts_meanwhile
    pair.process_tx_queue_event()
    assert host.frames == frames + late
    assert pair.txq.next_avail == 3


# --- deferred reads in a stream of large frames ---------------------------------------

DEFER_NS = 50_000_000  # long beside a test's own steps, short to wait out


def one_frame_events(rx, n: int, frame=None) -> None:
    """n TAP events through the loop, one frame each (a large one by default)."""
    _, _, pair, host = rx
    for _ in range(n):
        host.incoming += [frame] if frame is not None else big_stream(1)
        pair.loop.run_once(0)


def run_for(pair, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pair.loop.run_once(0.01)


def start_served_stream(rx) -> dict[int, int]:
    """start_stream, and the guest's kick for the buffers it posted: the TAP is
    read by the loop from then on."""
    addrs = start_stream(rx, buffers=60)
    rx[2].process_rx_queue_event()
    return addrs


def run_until(pair, condition, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        pair.loop.run_once(0.01)
    raise AssertionError("the loop did not get there")


def test_in_a_stream_of_large_frames_the_tap_is_left_unread_for_the_deferral(rx):
    ram, driver, pair, host = rx
    pair.rx_defer_ns = DEFER_NS
    addrs = start_served_stream(rx)  # the stream's first event
    one_frame_events(rx, RX_DEFER_AFTER - 1)  # the events that make it a stream
    assert pair.rx_counters.deferrals == 1
    read = pair.rx_counters.packets
    frames = big_stream(3)
    host.incoming += frames
    pair.loop.run_once(0)  # the TAP is readable, and not read yet
    assert pair.rx_counters.packets == read
    run_until(pair, lambda: pair.rx_counters.packets == read + 3)  # one event, at the end
    got = frames_back(ram, driver, driver.used(), addrs)
    assert [g[HDR:] for g in got[-3:]] == [f[HDR:] for f in frames]


def test_once_a_deferral_ends_the_tap_is_read_in_the_turn_a_frame_comes(rx):
    ram, driver, pair, host = rx
    pair.rx_defer_ns = DEFER_NS
    start_served_stream(rx)
    one_frame_events(rx, RX_DEFER_AFTER - 1)
    host.incoming += big_stream(RX_DEFER_BELOW)  # the deferral ends with enough to read
    run_until(pair, lambda: not host.incoming)
    assert pair.rx_counters.deferrals == 1  # that event read enough: not deferred again
    read = pair.rx_counters.packets
    one_frame_events(rx, 1)
    assert pair.rx_counters.packets == read + 1  # read at once (and, one alone, deferred)
    assert pair.rx_counters.deferrals == 2


def test_an_event_that_read_several_large_frames_is_not_deferred(rx):
    ram, driver, pair, host = rx
    pair.rx_defer_ns = DEFER_NS
    start_served_stream(rx)
    one_frame_events(rx, RX_DEFER_AFTER - 2)  # one event short of a stream
    host.incoming += big_stream(RX_DEFER_BELOW)
    pair.loop.run_once(0)  # makes it a stream, but read enough frames
    assert pair.rx_counters.deferrals == 0
    one_frame_events(rx, 1)  # read one: deferred
    assert pair.rx_counters.deferrals == 1


def test_small_frames_are_never_deferred(rx):
    ram, driver, pair, host = rx
    pair.rx_defer_ns = DEFER_NS
    post_buffers(ram, driver, 40)
    pair.process_rx_queue_event()  # the guest's kick for them
    for i in range(2 * RX_DEFER_AFTER):
        one_frame_events(rx, 1, bytes(HDR) + b"p" * 60)
        assert pair.rx_counters.packets == i + 1  # each in the turn it came
    assert pair.rx_counters.deferrals == 0


def test_without_a_deferral_set_a_stream_is_read_frame_by_frame_as_it_comes(rx):
    ram, driver, pair, host = rx
    assert pair.rx_defer_ns == 0  # QueuePair's default
    start_served_stream(rx)
    for i in range(2 * RX_DEFER_AFTER):
        one_frame_events(rx, 1)
        assert pair.rx_counters.packets == i + 2
    assert pair.rx_counters.deferrals == 0


def test_stopping_the_rx_ring_during_a_deferral_ends_it_without_a_read(rx):
    ram, driver, pair, host = rx
    pair.rx_defer_ns = 1_000_000
    start_served_stream(rx)
    one_frame_events(rx, RX_DEFER_AFTER - 1)
    assert pair.rx_counters.deferrals == 1
    read = pair.rx_counters.packets
    pair.stop_ring(True)
    host.incoming += big_stream(2)
    for _ in range(5):
        pair.loop.run_once(0.002)  # past the deferral's end: nothing runs, nothing fails
    assert pair.rx_counters.packets == read and len(host.incoming) == 2


def post_large(ram, driver, n: int) -> list[bytes]:
    """n frames of two buffers each (header, then 1000 bytes), as a TSO frame comes."""
    frames = []
    for i in range(n):
        a, b = ram.alloc(HDR), ram.alloc(1000)
        ram.memory.write(b, bytes([i]) * 1000)
        driver.add(readable=[(a, HDR), (b, 1000)])
        frames.append(bytes(HDR) + bytes([i]) * 1000)
    driver.publish()
    return frames


def each_sent_at_its_kick(tx, post_one, n: int) -> list[bytes]:
    """n frames posted by `post_one`, each asking for a kick and sent in it."""
    ram, driver, pair, host = tx
    sent = []
    for _ in range(n):
        sent += post_one(ram, driver, 1)
        assert driver.needs_kick()
        pair.process_tx_queue_event()
        assert host.frames[-len(sent) :] == sent
    return sent


def start_tx_stream(tx) -> list[bytes]:
    """TX_DEFER_AFTER kicks, each for a large frame: a stream from then on."""
    ram, driver, pair, host = tx
    host.room = 1000
    pair.tx_defer_ns = DEFER_NS
    sent = each_sent_at_its_kick(tx, post_large, TX_DEFER_AFTER)
    assert pair.tx_counters.deferrals == 0 and host.frames == sent
    return sent


def test_in_a_stream_of_large_frames_from_the_guest_kicks_stay_off_and_a_timer_drains(tx):
    ram, driver, pair, host = tx
    sent = start_tx_stream(tx)
    sent += post_large(ram, driver, 1)
    assert driver.needs_kick()
    pair.process_tx_queue_event()  # sent at once; kicks stay off
    assert host.frames == sent and pair.tx_counters.deferrals == 1
    late = post_large(ram, driver, 2)
    assert not driver.needs_kick()  # the guest is asked for no kick
    pair.loop.run_once(0)
    assert host.frames == sent  # they wait for the timer
    run_until(pair, lambda: len(host.frames) == len(sent) + 2)
    assert host.frames == sent + late


def test_a_deferred_drain_that_finds_nothing_asks_for_kicks_again(tx):
    ram, driver, pair, host = tx
    sent = start_tx_stream(tx)
    sent += post_large(ram, driver, 1)
    driver.needs_kick()
    pair.process_tx_queue_event()
    run_for(pair, 3 * DEFER_NS / 1e9)  # a deferred drain found the ring empty
    sent += post(ram, driver, 1)
    assert driver.needs_kick()  # kicks are on again
    pair.process_tx_queue_event()
    assert host.frames == sent  # and the small frame went at its kick


def test_small_frames_from_the_guest_are_sent_at_their_kick_never_deferred(tx):
    ram, driver, pair, host = tx
    host.room = 1000
    pair.tx_defer_ns = DEFER_NS
    each_sent_at_its_kick(tx, post, 2 * TX_DEFER_AFTER)
    assert pair.tx_counters.deferrals == 0


def test_without_a_tx_deferral_set_every_large_frame_is_sent_at_its_kick(tx):
    ram, driver, pair, host = tx
    host.room = 1000
    assert pair.tx_defer_ns == 0  # QueuePair's default
    each_sent_at_its_kick(tx, post_large, 2 * TX_DEFER_AFTER)
    assert pair.tx_counters.deferrals == 0


def test_stopping_the_tx_ring_during_a_deferral_ends_it_without_a_drain(tx):
    ram, driver, pair, host = tx
    sent = start_tx_stream(tx)
    pair.tx_defer_ns = 1_000_000
    sent += post_large(ram, driver, 1)
    driver.needs_kick()
    pair.process_tx_queue_event()
    assert pair.tx_counters.deferrals == 1
    pair.stop_ring(False)
    post_large(ram, driver, 2)
    for _ in range(5):
        pair.loop.run_once(0.002)  # past the deferral's end: nothing runs, nothing fails
    assert host.frames == sent
