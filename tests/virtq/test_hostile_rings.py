"""A hostile guest: every structural lie breaks only its own queue, with a reason."""

from __future__ import annotations

import logging

import pytest

from pyvhost.errors import (
    AvailIndexError,
    ChainLengthError,
    ChainTooLongError,
    DescriptorIndexError,
    DescriptorMemoryError,
    DescriptorOrderError,
    IndirectDescriptorError,
)
from pyvhost.memory import GuestAddress, RegionSpec
from pyvhost.testing import memfd, queue_pair
from pyvhost.virtq.layout import (
    DESC,
    VIRTQ_DESC_F_INDIRECT as INDIRECT,
    VIRTQ_DESC_F_NEXT as NEXT,
    VIRTQ_DESC_F_WRITE as WRITE,
)


def post_raw(driver, descs, head=0):
    """Write descriptors verbatim and make `head` available."""
    for i, (addr, length, flags, nxt) in enumerate(descs):
        driver.write_desc(i, addr, length, flags, nxt)
    driver.write_avail_slot(driver.avail_idx, head)
    driver.avail_idx += 1
    driver.publish()


def assert_broken(device, error_type, match, caplog):
    assert device.pop() is None
    assert isinstance(device.broken, error_type), device.broken
    assert match in str(device.broken)
    assert any(match in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert not device.ready
    assert device.pop() is None  # stays broken
    assert not device.enable_notification()


@pytest.fixture
def buf(ram):
    return ram.alloc(64)


def test_a_chain_that_loops_is_too_long(ram, buf, caplog):
    driver, device = queue_pair(ram, 8)
    post_raw(driver, [(buf, 8, NEXT, 1), (buf, 8, NEXT, 0)])
    assert_broken(device, ChainTooLongError, "more than 8 descriptors", caplog)


def test_a_descriptor_pointing_at_itself_is_a_loop(ram, buf, caplog):
    driver, device = queue_pair(ram, 8)
    post_raw(driver, [(buf, 8, NEXT, 0)])
    assert_broken(device, ChainTooLongError, "a loop", caplog)


def test_a_head_past_the_table(ram, caplog):
    driver, device = queue_pair(ram, 8)
    post_raw(driver, [], head=8)
    assert_broken(device, DescriptorIndexError, "head 8", caplog)


def test_a_next_index_past_the_table(ram, buf, caplog):
    driver, device = queue_pair(ram, 8)
    post_raw(driver, [(buf, 8, NEXT, 9)])
    assert_broken(device, DescriptorIndexError, "next index 9", caplog)


def test_avail_idx_running_more_than_a_queue_ahead(ram, caplog):
    driver, device = queue_pair(ram, 8)
    driver.set_avail_idx(9)
    assert_broken(device, AvailIndexError, "9 entries ahead", caplog)


def test_avail_idx_running_backwards_is_far_ahead(ram, caplog):
    driver, device = queue_pair(ram, 8)
    driver.set_avail_idx(0xFFFF)  # one behind 0, i.e. 65535 ahead
    assert_broken(device, AvailIndexError, "ahead", caplog)


def test_a_readable_buffer_after_a_writable_one(ram, buf, caplog):
    driver, device = queue_pair(ram, 8)
    post_raw(driver, [(buf, 8, WRITE | NEXT, 1), (buf, 8, 0, 0)])
    assert_broken(device, DescriptorOrderError, "device-readable after", caplog)


def test_a_buffer_outside_guest_memory(ram, caplog):
    driver, device = queue_pair(ram, 8)
    post_raw(driver, [(1 << 40, 8, 0, 0)])
    assert_broken(device, DescriptorMemoryError, "not backed by memory", caplog)


def test_a_buffer_that_wraps_the_address_space(ram, caplog):
    driver, device = queue_pair(ram, 8)
    post_raw(driver, [(2**64 - 4, 8, 0, 0)])
    assert_broken(device, DescriptorMemoryError, "wraps", caplog)


def test_a_writable_buffer_in_read_only_memory(ram, caplog):
    backend = ram.map_again()
    backend.add_region(RegionSpec(GuestAddress(1 << 32), 4096, readonly=True), memfd(4096))
    driver, device = queue_pair(ram, 8, device_memory=backend)
    post_raw(driver, [(1 << 32, 8, WRITE, 0)])
    assert_broken(device, DescriptorMemoryError, "read-only", caplog)


def test_an_indirect_table_without_the_feature(ram, buf, caplog):
    driver, device = queue_pair(ram, 8, indirect=False)
    post_raw(driver, [(buf, 16, INDIRECT, 0)])
    assert_broken(device, IndirectDescriptorError, "not negotiated", caplog)


@pytest.mark.parametrize("length", [0, 8, 24, 33])
def test_an_indirect_table_whose_length_is_not_a_multiple_of_16(ram, buf, caplog, length):
    driver, device = queue_pair(ram, 8, indirect=True)
    post_raw(driver, [(buf, length, INDIRECT, 0)])
    assert_broken(device, IndirectDescriptorError, f"length {length}", caplog)


def test_an_indirect_descriptor_with_next_set(ram, buf, caplog):
    driver, device = queue_pair(ram, 8, indirect=True)
    post_raw(driver, [(buf, 16, INDIRECT | NEXT, 1), (buf, 8, 0, 0)])
    assert_broken(device, IndirectDescriptorError, "NEXT", caplog)


def test_a_nested_indirect_table(ram, caplog):
    driver, device = queue_pair(ram, 8, indirect=True)
    inner, outer = ram.alloc(16), ram.alloc(16)
    ram.memory.write(inner, DESC.pack(inner, 8, 0, 0))
    ram.memory.write(outer, DESC.pack(inner, 16, INDIRECT, 0))
    post_raw(driver, [(outer, 16, INDIRECT, 0)])
    assert_broken(device, IndirectDescriptorError, "nests", caplog)


def test_a_loop_inside_an_indirect_table(ram, buf, caplog):
    driver, device = queue_pair(ram, 8, indirect=True)
    table = ram.alloc(32)
    ram.memory.write(table, DESC.pack(buf, 8, NEXT, 1) + DESC.pack(buf, 8, NEXT, 0))
    post_raw(driver, [(table, 32, INDIRECT, 0)])
    assert_broken(device, ChainTooLongError, "more than 2", caplog)


def test_an_indirect_next_past_its_table(ram, buf, caplog):
    driver, device = queue_pair(ram, 8, indirect=True)
    table = ram.alloc(16)
    ram.memory.write(table, DESC.pack(buf, 8, NEXT, 1))
    post_raw(driver, [(table, 16, INDIRECT, 0)])
    assert_broken(device, DescriptorIndexError, "past a table of 1", caplog)


def test_an_indirect_table_outside_guest_memory(ram, caplog):
    driver, device = queue_pair(ram, 8, indirect=True)
    post_raw(driver, [(1 << 40, 16, INDIRECT, 0)])
    assert_broken(device, DescriptorMemoryError, "not backed", caplog)


def test_a_chain_whose_bytes_overflow_a_used_length(ram, caplog):
    # Three 2 GiB descriptors over one sparse file: views cost nothing, nothing is touched.
    backend = ram.map_again()
    big = 1 << 31
    backend.add_region(RegionSpec(GuestAddress(1 << 36), big), memfd(big))
    driver, device = queue_pair(ram, 8, device_memory=backend)
    post_raw(driver, [(1 << 36, big, NEXT, 1), (1 << 36, big, NEXT, 2), (1 << 36, big, 0, 0)])
    assert_broken(device, ChainLengthError, "spans", caplog)


def test_a_broken_queue_leaves_its_neighbours_serving(ram, buf, caplog):
    backend = ram.map_again()
    bad_driver, bad = queue_pair(ram, 8, device_memory=backend)
    good_driver, good = queue_pair(ram, 8, device_memory=backend)
    post_raw(bad_driver, [(buf, 8, NEXT, 0)])
    good_driver.add(readable=[(buf, 8)])
    good_driver.kick()
    assert bad.pop() is None and bad.broken is not None
    chain = good.pop()
    assert chain is not None and good.broken is None
    good.push_used(chain.head, 0)
    assert good_driver.used() == [(chain.head, 0)]


def test_the_driver_can_rewrite_a_descriptor_under_the_device_without_harm(ram, buf):
    # The device reads each descriptor once; later changes by the guest cannot
    # make it touch memory it did not validate.
    driver, device = queue_pair(ram, 8)
    driver.add(writable=[(buf, 8)])
    driver.kick()
    chain = device.pop()
    driver.write_desc(chain.head, 1 << 40, 1 << 20, WRITE, 0)
    assert len(chain.writable[0]) == 8


@pytest.mark.parametrize("second", ["loops", "unmapped"])
def test_a_broken_queue_holds_no_view_of_guest_memory(ram, buf, second):
    """Its error is kept for the message only: once the queue and the memory
    are released, the mapping goes at once, with no help from the cycle
    collector (a held view would keep the front-end's RAM mapped, and its fd)."""
    import gc

    from pyvhost.testing.memfd import mappings_named

    memory = ram.map_again()
    driver, device = queue_pair(ram, 8, device_memory=memory)
    bad = (buf, 8, NEXT, 0) if second == "loops" else (1 << 40, 8, 0, 0)
    post_raw(driver, [(buf, 8, NEXT, 1), bad])  # a readable view is gathered first
    gc.disable()
    try:
        assert device.pop() is None and device.broken is not None
        before = len(mappings_named("pyvhost-guest-ram"))
        device.close()
        memory.clear()
        assert len(mappings_named("pyvhost-guest-ram")) == before - 1
    finally:
        gc.enable()
