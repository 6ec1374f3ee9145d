"""A device's I/O virtual address space: the IOTLB and the queues that stall on it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from pyvhost.errors import IotlbAccessError, IotlbMiss
from pyvhost.memory.iommu import IOTLB_READ, IOTLB_RW, IOTLB_WRITE, IommuAddressSpace
from pyvhost.testing import GuestRam, packed_queue_pair, queue_pair
from pyvhost.virtq import SplitQueue
from pyvhost.virtq.packed import PackedQueue

IOVA = 0x10_0000_0000


@pytest.fixture
def ram():
    with GuestRam(1 << 20) as ram:
        yield ram


@pytest.fixture
def space(ram):
    memory = ram.map_again()
    space = IommuAddressSpace(memory)
    yield space
    space.close()


def frontend(ram, gpa: int) -> int:
    """The front-end address of guest address `gpa` (GuestRam maps them 1:1)."""
    return int(ram.memory.find_region(gpa).spec.frontend_addr) + gpa


def test_an_update_maps_an_iova_range_onto_guest_memory(ram, space):
    ram.memory.write(0x2000, b"through the iommu")
    space.update(IOVA, 0x1000, frontend(ram, 0x2000), IOTLB_RW)
    assert space.read(IOVA, 17) == b"through the iommu"


def test_an_address_without_an_entry_is_a_miss_reported_once_per_access(space):
    asked = []
    space.on_miss = lambda iova, perm: asked.append((iova, perm))
    with pytest.raises(IotlbMiss) as e:
        space.translate(IOVA + 5, 10, write=True)
    assert (e.value.iova, e.value.perm) == (IOVA + 5, IOTLB_WRITE)
    assert asked == [(IOVA + 5, IOTLB_WRITE)]


def test_a_range_over_two_entries_gathers_both(ram, space):
    ram.memory.write(0x3000 - 3, b"abcdef")
    space.update(IOVA, 0x1000, frontend(ram, 0x2000), IOTLB_RW)
    space.update(IOVA + 0x1000, 0x1000, frontend(ram, 0x3000), IOTLB_RW)
    assert space.read(IOVA + 0x1000 - 3, 6) == b"abcdef"


def test_permissions_are_enforced(ram, space):
    space.update(IOVA, 0x1000, frontend(ram, 0x2000), IOTLB_READ)
    space.translate(IOVA, 8)
    with pytest.raises(IotlbAccessError, match="read only, not write"):
        space.translate(IOVA, 8, write=True)
    space.update(IOVA, 0x1000, frontend(ram, 0x2000), IOTLB_WRITE)
    with pytest.raises(IotlbAccessError, match="write only, not read"):
        space.translate(IOVA, 8)


def test_an_invalidation_trims_the_entries_it_covers(ram, space):
    space.update(IOVA, 0x3000, frontend(ram, 0x2000), IOTLB_RW)
    space.invalidate(IOVA + 0x1000, 0x1000)
    assert [(e.iova - IOVA, e.size) for e in space.entries] == [(0, 0x1000), (0x2000, 0x1000)]
    with pytest.raises(IotlbMiss):
        space.translate(IOVA + 0x1800, 1)
    assert space.entries[1].guest_addr == 0x4000  # the tail keeps its own translation


def test_an_update_outside_the_memory_table_is_refused(space):
    from pyvhost.errors import GuestMemoryError

    with pytest.raises(GuestMemoryError):
        space.update(IOVA, 0x1000, 0xDEAD_0000_0000, IOTLB_RW)
    assert space.entries == ()


@pytest.mark.parametrize("kind", ["split", "packed"])
def test_a_queue_behind_an_iommu_stalls_on_a_miss_and_resumes_losing_nothing(ram, kind):
    """Rings and buffers at IOVAs with no translation: the queue maps nothing
    and pops nothing until the updates come; then every chain is there."""
    memory = ram.map_again()
    space = IommuAddressSpace(memory)
    make = queue_pair if kind == "split" else packed_queue_pair
    driver, plain = make(ram, 8)
    plain.close()
    rings = (driver.desc_addr, driver.avail_addr, driver.used_addr)
    cls = SplitQueue if kind == "split" else PackedQueue
    queue = cls(space, 8, *(IOVA + a for a in rings))
    resumed = []
    queue.on_unstall = lambda: resumed.append(True)
    assert queue.stalled is not None and not queue.ready  # the ring's IOVA missed
    bufs = [ram.alloc(64) for _ in range(3)]
    for b in bufs:
        ram.memory.write(b, b"payload!")
        driver.add(readable=[(IOVA + b, 8)])
    driver.kick()
    assert queue.pop() is None
    # The front-end answers each miss with the page asked for, as QEMU does.
    for _ in range(10):
        miss = queue.stalled
        if miss is None:
            chain = queue.pop()
            if chain is None and queue.stalled is None:
                break
            if chain is not None:
                assert bytes(chain.readable[0]) == b"payload!"
                queue.push_used(chain.head, 0)
                resumed.append("popped")
            continue
        page = miss.iova & ~0xFFF
        space.update(page, 0x1000, frontend(ram, page - IOVA), IOTLB_RW)
    assert resumed.count("popped") == 3
    assert len(driver.used()) == 3
    assert queue.broken is None
    queue.close()
    space.close()


def test_an_invalidation_under_a_ring_stops_it_until_it_is_mapped_again(ram):
    memory = ram.map_again()
    space = IommuAddressSpace(memory)
    driver, plain = queue_pair(ram, 8)
    plain.close()
    space.update(IOVA, ram.size, frontend(ram, 0), IOTLB_RW)
    queue = SplitQueue(space, 8, IOVA + driver.desc_addr, IOVA + driver.avail_addr,
                       IOVA + driver.used_addr)  # fmt: skip
    assert queue.ready
    space.invalidate(IOVA + driver.avail_addr, 2)
    assert not queue.ready and queue.stalled is not None
    driver.add(readable=[(IOVA + ram.alloc(8), 8)])
    driver.kick()
    assert queue.pop() is None
    space.update(IOVA, ram.size, frontend(ram, 0), IOTLB_RW)
    assert queue.ready and queue.pop() is not None
    queue.close()
    space.close()


def test_a_ring_contiguous_in_iovas_but_scattered_in_guest_memory_is_one_view(ram, space):
    """Linux allocates a ring page by page when an IOMMU makes it contiguous: the
    ring's pin is an alias mapping of those pages, in IOVA order, both ways."""
    a, b = 0x5000, 0x2000  # IOVA page 0 -> guest 0x5000, page 1 -> guest 0x2000
    ram.memory.write(a, b"A" * 4096)
    ram.memory.write(b, b"B" * 4096)
    space.update(IOVA, 0x1000, frontend(ram, a), IOTLB_RW)
    space.update(IOVA + 0x1000, 0x1000, frontend(ram, b), IOTLB_RW)
    pin = space.pin(IOVA + 0x800, 0x1000, write=True)
    view = pin.views[0]
    assert bytes(view[:0x800]) == b"A" * 0x800 and bytes(view[0x800:]) == b"B" * 0x800
    view[0x7FF:0x801] = b"xy"  # across the seam
    assert ram.memory.read(a + 0xFFF, 1) == b"x" and ram.memory.read(b, 1) == b"y"
    pin.release()
    assert pin.released


def test_a_scattered_range_that_is_not_whole_pages_is_refused(ram, space):
    from pyvhost.errors import NotContiguousError

    space.update(IOVA, 0x800, frontend(ram, 0x5000), IOTLB_RW)
    space.update(IOVA + 0x800, 0x800, frontend(ram, 0x2000), IOTLB_RW)
    with pytest.raises(NotContiguousError):
        space.pin(IOVA, 0x1000)


def test_a_chain_in_flight_keeps_its_buffers_through_an_invalidation(ram):
    """The views a chain was popped with stay the guest's memory until it is
    returned; the next chain at the revoked IOVA is not read: it waits."""
    memory = ram.map_again()
    space = IommuAddressSpace(memory)
    driver, plain = queue_pair(ram, 8)
    plain.close()
    space.update(IOVA, ram.size, frontend(ram, 0), IOTLB_RW)
    queue = SplitQueue(space, 8, IOVA + driver.desc_addr, IOVA + driver.avail_addr,
                       IOVA + driver.used_addr)  # fmt: skip
    buf = ram.alloc(4096, align=4096)
    driver.add(writable=[(IOVA + buf, 64)])
    driver.kick()
    chain = queue.pop()
    space.invalidate(IOVA + buf, 4096)  # the guest unmaps the buffer mid-flight
    chain.writable[0][:5] = b"still"
    queue.push_used(chain.head, 5)
    assert driver.used() == [(chain.head, 5)] and ram.memory.read(buf, 5) == b"still"
    driver.add(writable=[(IOVA + buf, 64)])  # posted again at the revoked IOVA
    driver.kick()
    assert queue.pop() is None and queue.stalled.iova == IOVA + buf  # not read: asked for
    queue.close()
    space.close()


def test_a_device_write_into_a_read_only_iova_breaks_the_queue_and_writes_nothing(ram):
    memory = ram.map_again()
    space = IommuAddressSpace(memory)
    driver, plain = queue_pair(ram, 8)
    plain.close()
    buf = ram.alloc(4096, align=4096)
    space.update(IOVA, ram.size, frontend(ram, 0), IOTLB_RW)
    space.update(IOVA + buf, 4096, frontend(ram, buf), IOTLB_READ)  # this page read-only
    queue = SplitQueue(space, 8, IOVA + driver.desc_addr, IOVA + driver.avail_addr,
                       IOVA + driver.used_addr)  # fmt: skip
    ram.memory.write(buf, b"guest's")
    driver.add(writable=[(IOVA + buf, 64)])
    driver.kick()
    assert queue.pop() is None
    assert "allows read only, not write" in str(queue.broken)
    assert ram.memory.read(buf, 7) == b"guest's"  # the device wrote nothing
    queue.close()
    space.close()


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),  # update (True) or invalidate
            st.integers(0, 31),  # first IOVA page
            st.integers(1, 8),  # pages
            st.integers(0, 200),  # guest page (updates)
            st.sampled_from([IOTLB_READ, IOTLB_WRITE, IOTLB_RW]),
        ),
        max_size=30,
    )
)
def test_the_iotlb_translates_as_a_page_by_page_reference_model(ops):
    with GuestRam(1 << 20) as ram:
        space = IommuAddressSpace(ram.map_again())
        model: dict[int, tuple[int, int]] = {}  # IOVA page -> (guest page, perm)
        for update, page, pages, gpage, perm in ops:
            iova, size = IOVA + page * 0x1000, pages * 0x1000
            if update:
                space.update(iova, size, frontend(ram, gpage * 0x1000), perm)
                for i in range(pages):
                    model[page + i] = (gpage + i, perm)
            else:
                space.invalidate(iova, size)
                for i in range(pages):
                    model.pop(page + i, None)
        for page in range(40):
            iova = IOVA + page * 0x1000 + 123
            if page not in model:
                with pytest.raises(IotlbMiss):
                    space.to_guest(iova, 1)
                continue
            gpage, perm = model[page]
            for write, bit in ((False, IOTLB_READ), (True, IOTLB_WRITE)):
                if perm & bit:
                    assert space.to_guest(iova, 1, write) == [(gpage * 0x1000 + 123, 1)]
                else:
                    with pytest.raises(IotlbAccessError):
                        space.to_guest(iova, 1, write)
        space.close()
