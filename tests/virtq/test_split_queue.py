"""Device side of the split ring, driven by the driver-side mock."""

from __future__ import annotations

import contextlib
import ctypes
import os

import pytest

from pyvhost.errors import DescriptorIndexError, QueueConfigError
from pyvhost.memory import GuestAddress, GuestMemory, RegionSpec
from pyvhost.testing import GuestRam, memfd, queue_pair
from pyvhost.virtq import DriverQueue, SplitQueue, ring_footprint


def test_an_empty_queue_pops_nothing(ram):
    _, device = queue_pair(ram, 8)
    assert device.pop() is None
    assert device.ready


def test_a_chain_arrives_as_readable_then_writable_views_in_order(ram):
    driver, device = queue_pair(ram, 8)
    a, b, w1, w2 = (ram.alloc(64) for _ in range(4))
    ram.memory.write(a, b"head")
    ram.memory.write(b, b"body")
    head = driver.add(readable=[(a, 4), (b, 4)], writable=[(w1, 10), (w2, 20)])
    driver.kick()
    chain = device.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"head", b"body"]
    assert [len(v) for v in chain.writable] == [10, 20]
    assert (chain.readable_len, chain.writable_len) == (8, 30)


def test_writable_views_are_the_guest_buffer_itself(ram):
    driver, device = queue_pair(ram, 8)
    buf = ram.alloc(16)
    driver.add(writable=[(buf, 16)])
    driver.kick()
    chain = device.pop()
    chain.writable[0][:5] = b"zero!"
    assert ram.memory.read(buf, 5) == b"zero!"  # seen through the driver's own mapping


def test_chains_pop_in_the_order_they_were_made_available(ram):
    driver, device = queue_pair(ram, 16)
    heads = [driver.add(readable=[(ram.alloc(8), 8)]) for _ in range(10)]
    driver.kick()
    assert [c.head for c in device.pop_batch(100)] == heads
    assert device.pop() is None


def test_push_used_returns_head_and_length_to_the_driver(ram):
    driver, device = queue_pair(ram, 8)
    head = driver.add(writable=[(ram.alloc(100), 100)])
    driver.kick()
    device.push_used(device.pop().head, 42)
    assert driver.used() == [(head, 42)]
    assert driver.free_descriptors == 8


def test_a_used_batch_is_published_with_one_index_update(ram):
    driver, device = queue_pair(ram, 8)
    for _ in range(5):
        driver.add(writable=[(ram.alloc(8), 8)])
    driver.kick()
    chains = device.pop_batch(5)
    device.push_used_batch([(c.head, i) for i, c in enumerate(chains)])
    assert driver.used_idx == 5
    assert driver.used() == [(c.head, i) for i, c in enumerate(chains)]


def test_a_large_used_batch_that_runs_past_the_ring_end_wraps_to_its_start(ram):
    # More than a few elements go in as strided stores: twelve, then twelve
    # more in slots 12..15 and 0..7.
    driver, device = queue_pair(ram, 16)
    buf = ram.alloc(8)
    for n in range(2):
        for _ in range(12):
            driver.add(writable=[(buf, 8)])
        driver.kick()
        chains = device.pop_batch(12)
        device.push_used_batch([(c.head, 100 + i) for i, c in enumerate(chains)])
        assert driver.used() == [(c.head, 100 + i) for i, c in enumerate(chains)], n
    assert driver.used_idx == 24


def test_a_used_head_past_the_table_is_refused_in_a_large_batch_too(ram):
    driver, device = queue_pair(ram, 16)
    with pytest.raises(DescriptorIndexError):
        device.push_used_batch([(i, 0) for i in range(11)] + [(16, 0)])
    assert driver.used_idx == 0  # nothing published


def test_the_ring_wraps_past_65535(ram):
    driver, device = queue_pair(ram, 4)
    buf = ram.alloc(8)
    for n in range(70000 // 4):
        for _ in range(4):
            driver.add(readable=[(buf, 8)])
        driver.kick()
        device.push_used_batch([(c.head, 0) for c in device.pop_batch(4)])
        assert len(driver.used()) == 4, n
    assert device.next_avail == 70000 & 0xFFFF == driver.avail_idx


def test_avail_idx_is_read_once_per_batch(ram):
    driver, device = queue_pair(ram, 8)
    buf = ram.alloc(8)
    driver.add(readable=[(buf, 8)])
    driver.add(readable=[(buf, 8)])
    driver.kick()
    assert device.pop() is not None
    driver.set_avail_idx(2 + 100)  # a lie the device has not looked at yet
    assert device.pop() is not None  # served from the batch it already read
    assert device.pop() is None  # the next read sees the lie
    assert device.broken is not None


def test_the_queue_resumes_from_a_given_avail_index(ram):
    driver, device = queue_pair(ram, 8)
    buf = ram.alloc(8)
    for _ in range(3):
        driver.add(readable=[(buf, 8)])
    driver.kick()
    resumed = SplitQueue(
        ram.map_again(), 8, driver.desc_addr, driver.avail_addr, driver.used_addr, next_avail=2
    )
    assert [c.head for c in resumed.pop_batch(8)] == [2]
    assert resumed.next_avail == 3


def test_a_buffer_spanning_two_regions_is_two_views():
    mem = GuestMemory()
    fd = memfd(0x20000)
    mem.add_region(RegionSpec(GuestAddress(0), 0x10000), os.dup(fd))
    mem.add_region(RegionSpec(GuestAddress(0x10000), 0x10000, mmap_offset=0x10000), fd)
    driver = DriverQueue.layout(mem, 0, 8)
    device = SplitQueue(mem, 8, driver.desc_addr, driver.avail_addr, driver.used_addr)
    driver.add(readable=[(0xFFF0, 0x20)])
    driver.kick()
    chain = device.pop()
    assert [len(v) for v in chain.readable] == [0x10, 0x10]
    device.close()
    mem.clear()


def test_an_indirect_chain_is_walked_when_negotiated(ram):
    driver, device = queue_pair(ram, 8, indirect=True)
    a, w = ram.alloc(8), ram.alloc(32)
    ram.memory.write(a, b"indirect")
    head = driver.add_indirect(ram.alloc(64), readable=[(a, 8)], writable=[(w, 32)])
    driver.kick()
    chain = device.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"indirect"]
    assert chain.writable_len == 32


def test_a_zero_length_descriptor_contributes_no_view(ram):
    driver, device = queue_pair(ram, 8)
    driver.add(readable=[(ram.alloc(8), 0), (ram.alloc(8), 8)])
    driver.kick()
    chain = device.pop()
    assert len(chain.readable) == 1 and chain.readable_len == 8


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_a_queue_size_that_is_not_a_power_of_two_is_refused(ram, size):
    with pytest.raises(QueueConfigError, match="power of two"):
        SplitQueue(ram.memory, size, 0, 0x1000, 0x2000)


@pytest.mark.parametrize(
    ("desc", "avail", "used", "what"),
    [(8, 0x1000, 0x2000, "descriptor"), (0, 0x1001, 0x2000, "avail"), (0, 0x1000, 0x2002, "used")],
)
def test_misaligned_rings_are_refused(ram, desc, avail, used, what):
    with pytest.raises(QueueConfigError, match=what):
        SplitQueue(ram.memory, 8, desc, avail, used)


def test_rings_outside_guest_memory_are_refused(ram):
    with pytest.raises(QueueConfigError, match="not in guest memory"):
        SplitQueue(ram.memory, 8, 0, 0x1000, 1 << 40)


def test_a_ring_crossing_a_region_edge_is_refused():
    mem = GuestMemory()
    fd = memfd(0x2000)
    mem.add_region(RegionSpec(GuestAddress(0), 0x1000), os.dup(fd))
    mem.add_region(RegionSpec(GuestAddress(0x1000), 0x1000, mmap_offset=0x1000), fd)
    with pytest.raises(QueueConfigError, match="crosses"):
        SplitQueue(mem, 64, 0, 0xF80, 0x1100)  # the avail ring runs over 0x1000
    mem.clear()


# --- notifications --------------------------------------------------------------------


def test_without_event_idx_the_driver_can_suppress_interrupts(ram):
    driver, device = queue_pair(ram, 8)
    driver.add(writable=[(ram.alloc(8), 8)])
    driver.kick()
    device.push_used(device.pop().head, 0)
    assert device.needs_notification()
    driver.suppress_interrupts(True)
    assert not device.needs_notification()


def test_without_event_idx_the_device_can_suppress_kicks(ram):
    driver, device = queue_pair(ram, 8)
    device.disable_notification()
    driver.add(readable=[(ram.alloc(8), 8)])
    assert not driver.kick()
    assert device.enable_notification()  # a chain slipped in: poll again
    assert device.pop() is not None
    assert not device.enable_notification()
    driver.add(readable=[(ram.alloc(8), 8)])
    assert driver.kick()


def test_with_event_idx_interrupts_follow_used_event(ram):
    driver, device = queue_pair(ram, 8, event_idx=True)
    buf = ram.alloc(8)
    for _ in range(6):
        driver.add(writable=[(buf, 8)])
    driver.kick()
    chains = device.pop_batch(6)
    driver.set_used_event(0)
    device.push_used(chains[0].head, 0)
    assert device.needs_notification()  # first decision always signals
    device.push_used(chains[1].head, 0)
    assert not device.needs_notification()  # used_event 0 was already passed
    driver.set_used_event(3)  # "interrupt me when entry 3 is used"
    device.push_used(chains[2].head, 0)
    assert not device.needs_notification()  # used.idx went 2 -> 3: entry 3 not yet
    device.push_used(chains[3].head, 0)
    assert device.needs_notification()  # 3 -> 4 crossed it


def test_with_event_idx_kicks_follow_avail_event(ram):
    driver, device = queue_pair(ram, 8, event_idx=True)
    buf = ram.alloc(8)
    assert not device.enable_notification()  # avail_event := 0
    driver.add(readable=[(buf, 8)])
    assert driver.kick()  # avail.idx 0 -> 1 crosses avail_event 0
    driver.add(readable=[(buf, 8)])
    assert not driver.kick()  # the device has not asked again
    assert len(device.pop_batch(8)) == 2
    assert not device.enable_notification()  # avail_event := 2
    driver.add(readable=[(buf, 8)])
    assert driver.kick()


# --- the memory map under the rings -----------------------------------------------------


def test_rings_follow_a_replaced_memory_table():
    ram = GuestRam(1 << 20)
    backend = ram.map_again()
    driver, device = queue_pair(ram, 8, device_memory=backend)
    old = backend.regions[0]
    backend.set_regions([(ram.spec(), os.dup(ram.fd))])  # SET_MEM_TABLE, same layout
    assert old.is_unmapped  # the queue let go of the old mapping
    driver.add(readable=[(ram.alloc(8), 8)])
    driver.kick()
    assert device.pop() is not None
    device.close()
    ram.close()


def test_a_queue_whose_ring_region_is_removed_idles_until_it_returns():
    ram = GuestRam(1 << 20)
    backend = ram.map_again()
    driver, device = queue_pair(ram, 8, device_memory=backend)
    backend.remove_region(0)
    assert not device.ready and device.broken is None
    driver.add(readable=[(ram.alloc(8), 8)])
    driver.kick()
    assert device.pop() is None
    backend.add_region(ram.spec(), os.dup(ram.fd))
    assert device.ready
    assert device.pop() is not None
    device.close()
    ram.close()


def test_removing_an_unrelated_region_leaves_the_rings_alone():
    ram = GuestRam(1 << 20)
    backend = ram.map_again()
    backend.add_region(RegionSpec(GuestAddress(1 << 30), 4096), memfd(4096))
    driver, device = queue_pair(ram, 8, device_memory=backend)
    ring_view = device._avail
    backend.remove_region(1 << 30)
    assert device._avail is ring_view
    device.close()
    ram.close()


def test_ring_footprint_covers_the_layout(ram):
    base = ram.alloc(ring_footprint(256), align=4096)
    driver = DriverQueue.layout(ram.memory, base, 256)
    assert driver.used_addr + 4 + 8 * 256 + 2 == base + ring_footprint(256)


def test_unpop_hands_the_last_chain_back(ram):
    driver, device = queue_pair(ram, 8)
    heads = [driver.add(readable=[(ram.alloc(8), 8)]) for _ in range(2)]
    driver.kick()
    assert device.pop().head == heads[0]
    device.unpop()
    assert device.next_avail == 0
    assert [c.head for c in device.pop_batch(8)] == heads


def test_a_driver_that_re_arms_is_interrupted_for_every_batch(ram):
    # The lost-wakeup case: with EVENT_IDX, a driver that never moves
    # used_event is only interrupted once. enable_interrupts() moves it.
    driver, device = queue_pair(ram, 8, event_idx=True)
    buf = ram.alloc(8)
    for round_ in range(3):
        driver.add(writable=[(buf, 8)])
        driver.kick()
        assert not driver.enable_interrupts()  # nothing used yet: sleep
        device.push_used(device.pop().head, 0)
        assert device.needs_notification(), round_
        assert driver.used()


def test_with_event_idx_a_device_that_never_toggles_notifications_still_gets_every_kick(ram):
    # Finding the ring empty re-arms avail_event (as QEMU's virtqueue_pop does).
    driver, device = queue_pair(ram, 8, event_idx=True)
    buf = ram.alloc(8)
    for _ in range(3):
        driver.add(readable=[(buf, 8)])
        assert driver.kick()
        chain = device.pop()
        device.push_used(chain.head, 0)
        assert device.pop() is None  # empty: asks for the next kick


def test_a_device_polling_with_notifications_disabled_is_not_kicked(ram):
    driver, device = queue_pair(ram, 8, event_idx=True)
    buf = ram.alloc(8)
    device.pop()  # arms avail_event at 0
    device.disable_notification()
    driver.add(readable=[(buf, 8)])
    assert driver.kick()  # crosses the armed index once
    device.pop()
    assert device.pop() is None  # disabled: no re-arm
    driver.add(readable=[(buf, 8)])
    assert not driver.kick()


def test_iov_helpers_cut_write_and_scatter_across_views():
    from pyvhost.virtq.iov import scatter, skip, write_at

    a, b = bytearray(4), bytearray(6)
    views = [memoryview(a), memoryview(b)]
    assert [len(v) for v in skip(views, 5)] == [5]
    write_at(views, 3, b"xyz")
    assert (bytes(a), bytes(b[:2])) == (b"\0\0\0x", b"yz")
    assert scatter(views, b"0123456789abc") == 10 and bytes(a + b) == b"0123456789"


def test_a_batch_that_runs_past_the_ring_end_wraps_to_its_start(ram):
    driver, device = queue_pair(ram, 4)
    bufs = [ram.alloc(32) for _ in range(6)]
    for b in bufs[:3]:
        driver.add(readable=[(b, 32)])
    driver.publish()
    device.push_used_batch([(c.head, 0) for c in device.pop_batch(3)])
    driver.used()
    heads = [driver.add(readable=[(b, 32)]) for b in bufs[3:]]  # slots 3, 0, 1
    driver.publish()
    assert [c.head for c in device.pop_batch(8)] == heads
    assert device.next_avail == 6


def test_a_chain_that_breaks_the_queue_ends_the_batch_and_keeps_the_ones_before(ram):
    driver, device = queue_pair(ram, 8)
    good = [driver.add(readable=[(ram.alloc(32), 32)]) for _ in range(2)]
    bad = driver.add(readable=[(ram.alloc(32), 32)])
    driver.write_desc(bad, 1 << 40, 32, 0, 0)  # outside guest memory
    driver.add(readable=[(ram.alloc(32), 32)])
    driver.publish()
    assert [c.head for c in device.pop_batch(8)] == good
    assert device.broken is not None
    assert device.pop_batch(8) == []


def test_spans_are_one_readable_buffer_each_given_by_host_address(ram):
    driver, device = queue_pair(ram, 8)
    bufs = [ram.alloc(64) for _ in range(3)]
    for i, b in enumerate(bufs):
        ram.memory.write(b, bytes([i + 1]) * 64)
    heads = [driver.add(readable=[(b, 10 + i)]) for i, b in enumerate(bufs)]
    driver.publish()
    got_heads, addrs, lengths = device.pop_spans(8)
    assert got_heads == heads and lengths == [10, 11, 12]
    assert [ctypes.string_at(a, n) for a, n in zip(addrs, lengths, strict=True)] == [
        bytes([i + 1]) * (10 + i) for i in range(3)
    ]
    assert device.next_avail == 3


@pytest.mark.parametrize("order", ["table order", "shuffled"])
def test_spans_give_each_head_its_own_buffer_in_avail_order(ram, order):
    # Heads in table order are read with strided slices of the table; any
    # other order with one lookup per field: the same spans either way.
    driver, device = queue_pair(ram, 16)
    bufs = [ram.alloc(64) for _ in range(12)]
    for i, b in enumerate(bufs):
        ram.memory.write(b, bytes([i + 1]) * 64)
    heads = [driver.add(readable=[(b, 20 + i)]) for i, b in enumerate(bufs)]
    assert heads == list(range(12))
    if order == "shuffled":
        heads = [5, 0, 11, 3, 1, 2, 4, 10, 6, 7, 9, 8]
        for slot, head in enumerate(heads):
            driver.write_avail_slot(slot, head)
    driver.publish()
    got_heads, addrs, lengths = device.pop_spans(16)
    assert got_heads == heads
    assert lengths == [20 + h for h in heads]
    assert [ctypes.string_at(a, n) for a, n in zip(addrs, lengths, strict=True)] == [
        bytes([h + 1]) * (20 + h) for h in heads
    ]


def test_spans_in_table_order_stop_before_an_empty_buffer(ram):
    driver, device = queue_pair(ram, 16)
    heads = [driver.add(readable=[(ram.alloc(32), 32)]) for _ in range(5)]
    assert heads == [0, 1, 2, 3, 4]
    driver.write_desc(2, ram.alloc(32), 0, 0, 0)  # no bytes: no span (pop_batch says why)
    driver.publish()
    assert device.pop_spans(16)[0] == [0, 1]
    assert device.next_avail == 2


def test_a_limit_of_no_spans_takes_none(ram):
    driver, device = queue_pair(ram, 8)
    driver.add(readable=[(ram.alloc(32), 32)])
    driver.publish()
    assert device.pop_spans(0) == ([], [], [])
    assert device.next_avail == 0


def test_spans_are_taken_only_when_at_least_the_asked_number_are_posted(ram):
    driver, device = queue_pair(ram, 8)
    heads = [driver.add(readable=[(ram.alloc(32), 32)]) for _ in range(3)]
    driver.publish()
    assert device.pop_spans(8, at_least=4) == ([], [], [])
    assert device.next_avail == 0  # left for pop_batch, or a later batch
    driver.add(readable=[(ram.alloc(32), 32)])
    driver.publish()
    assert device.pop_spans(8, at_least=4)[0] == heads + [3]


def test_spans_stop_before_a_chain_of_two_buffers_and_pop_batch_takes_it(ram):
    driver, device = queue_pair(ram, 8)
    first = driver.add(readable=[(ram.alloc(32), 32)])
    two = driver.add(readable=[(ram.alloc(8), 8), (ram.alloc(24), 24)])
    last = driver.add(readable=[(ram.alloc(32), 32)])
    driver.publish()
    assert device.pop_spans(8)[0] == [first]
    assert device.pop_spans(8)[0] == []  # the next is not a span: left where it is
    assert [c.head for c in device.pop_batch(8)] == [two, last]


def test_spans_stop_before_an_rx_buffer(ram):
    driver, device = queue_pair(ram, 8)
    rx = driver.add(writable=[(ram.alloc(32), 32)])
    driver.publish()
    assert device.pop_spans(8) == ([], [], [])
    assert device.pop().head == rx


def test_spans_stop_before_a_buffer_outside_guest_memory_which_then_breaks_the_queue(ram):
    driver, device = queue_pair(ram, 8)
    good = driver.add(readable=[(ram.alloc(32), 32)])
    bad = driver.add(readable=[(ram.alloc(32), 32)])
    driver.write_desc(bad, 1 << 40, 32, 0, 0)
    driver.publish()
    assert device.pop_spans(8)[0] == [good]
    assert device.pop_batch(8) == [] and device.broken is not None
    assert device.pop_spans(8) == ([], [], [])


@contextlib.contextmanager
def two_region_queue(second_readonly: bool = False):
    """(driver, device) of a queue of 8 in guest memory made of two adjacent
    64 KiB regions, the rings in the first."""
    mem = GuestMemory()
    fd = memfd(0x20000)
    mem.add_region(RegionSpec(GuestAddress(0), 0x10000), os.dup(fd))
    second = RegionSpec(GuestAddress(0x10000), 0x10000, mmap_offset=0x10000,
                        readonly=second_readonly)  # fmt: skip
    mem.add_region(second, fd)
    driver = DriverQueue.layout(mem, 0, 8)
    device = SplitQueue(mem, 8, driver.desc_addr, driver.avail_addr, driver.used_addr)
    try:
        yield driver, device
    finally:
        device.close()
        mem.clear()


def test_spans_stop_at_a_buffer_that_crosses_into_the_next_region():
    with two_region_queue() as (driver, device):
        inside = driver.add(readable=[(0xF000, 0x20)])
        across = driver.add(readable=[(0xFFF0, 0x20)])
        driver.publish()
        assert device.pop_spans(8)[0] == [inside]
        (chain,) = device.pop_batch(8)
        assert chain.head == across and [len(v) for v in chain.readable] == [0x10, 0x10]


def test_writable_spans_are_rx_buffers_and_stop_before_a_tx_frame(ram):
    driver, device = queue_pair(ram, 8)
    bufs = [ram.alloc(64) for _ in range(2)]
    rx = [driver.add(writable=[(b, 64)]) for b in bufs]
    driver.add(readable=[(ram.alloc(64), 64)])
    driver.publish()
    heads, addrs, lengths = device.pop_spans(8, writable=True)
    assert heads == rx and lengths == [64, 64]
    ctypes.memmove(addrs[1], b"written", 7)  # as the kernel's read would
    assert ram.memory.read(bufs[1], 7) == b"written"
    device.memory.stamp(addrs, 10, b"\x01\x00")  # num_buffers of each
    assert [ram.memory.read(b + 10, 2) for b in bufs] == [b"\x01\x00"] * 2
    assert device.pop_spans(8, writable=True) == ([], [], [])


@pytest.mark.parametrize("take, kwargs", [("pop_spans", {"writable": True}), ("pop_views", {})])
def test_no_rx_buffers_by_span_or_view_while_the_dirty_log_is_on(ram, take, kwargs):
    from pyvhost.memory.dirty_log import DirtyLog

    driver, device = queue_pair(ram, 8)
    driver.add(writable=[(ram.alloc(64), 64)])
    driver.publish()
    fd = memfd(4096)
    try:
        device.memory.set_log(DirtyLog(fd, 4096, 0))
        assert getattr(device, take)(8, **kwargs) == ([], [], [])
        assert len(device.pop_batch(8)) == 1  # taken, its writes recorded for the log
        device.memory.set_log(None)
    finally:
        os.close(fd)


@pytest.mark.parametrize("order", ["table order", "shuffled"])
def test_views_are_the_rx_buffers_themselves_with_their_heads_and_lengths(ram, order):
    driver, device = queue_pair(ram, 16)
    bufs = [ram.alloc(64) for _ in range(10)]
    heads = [driver.add(writable=[(b, 40 + i)]) for i, b in enumerate(bufs)]
    if order == "shuffled":
        heads = [4, 0, 9, 3, 1, 2, 8, 5, 7, 6]
        for slot, head in enumerate(heads):
            driver.write_avail_slot(slot, head)
    driver.publish()
    got_heads, views, lengths = device.pop_views(16)
    assert got_heads == heads and lengths == [40 + h for h in heads]
    assert [len(v) for v in views] == lengths
    views[1][:7] = b"written"  # as a readv into them would
    assert ram.memory.read(bufs[heads[1]], 7) == b"written"
    assert device.next_avail == 10


def test_views_are_taken_up_to_the_limit(ram):
    driver, device = queue_pair(ram, 8)
    heads = [driver.add(writable=[(ram.alloc(64), 64)]) for _ in range(5)]
    driver.publish()
    assert device.pop_views(3)[0] == heads[:3]
    assert device.pop_views(3)[0] == heads[3:]
    assert device.pop_views(3) == ([], [], [])


def test_views_are_all_or_nothing_and_pop_batch_takes_a_batch_with_another_chain(ram):
    driver, device = queue_pair(ram, 8)
    first = driver.add(writable=[(ram.alloc(64), 64)])
    two = driver.add(writable=[(ram.alloc(12), 12), (ram.alloc(64), 64)])
    driver.add(readable=[(ram.alloc(64), 64)])
    driver.publish()
    assert device.pop_views(8) == ([], [], [])
    assert device.next_avail == 0  # nothing taken
    assert [c.head for c in device.pop_batch(2)] == [first, two]


def test_no_views_of_a_buffer_outside_guest_memory_which_pop_batch_then_refuses(ram):
    driver, device = queue_pair(ram, 8)
    driver.add(writable=[(ram.alloc(64), 64)])
    bad = driver.add(writable=[(ram.alloc(64), 64)])
    driver.write_desc(bad, 1 << 40, 64, 2, 0)  # WRITE, outside guest memory
    driver.publish()
    assert device.pop_views(8) == ([], [], [])
    assert len(device.pop_batch(8)) == 1 and device.broken is not None
    assert device.pop_views(8) == ([], [], [])


def test_no_views_of_buffers_in_different_regions_or_across_a_region_edge():
    with two_region_queue() as (driver, device):
        driver.add(writable=[(0xF000, 0x20)])
        driver.add(writable=[(0x18000, 0x20)])  # in the second region
        driver.publish()
        assert device.pop_views(8) == ([], [], [])
        assert [len(c.writable) for c in device.pop_batch(8)] == [1, 1]
        driver.add(writable=[(0xFFF0, 0x20)])  # across the edge: two views, from pop_batch
        driver.publish()
        assert device.pop_views(8) == ([], [], [])
        assert [len(v) for v in device.pop_batch(8)[0].writable] == [0x10, 0x10]


def test_no_views_of_a_read_only_region():
    with two_region_queue(second_readonly=True) as (driver, device):
        driver.add(writable=[(0x18000, 0x20)])
        driver.publish()
        assert device.pop_views(8) == ([], [], [])
