"""While a live migration logs dirty pages, every write the device makes
through the queue is in the log: the bytes it wrote into a chain's buffers,
the used element that returns the chain, and used.idx (vhost-user spec,
"Migration")."""

from __future__ import annotations

import pytest

from pyvhost.memory import LOG_PAGE, DirtyLog
from pyvhost.testing import queue_pair
from pyvhost.testing.memfd import memfd
from pyvhost.virtq import SplitQueue
from pyvhost.virtq.layout import RING_ENTRIES, RING_IDX


@pytest.fixture
def logged(ram):
    """A queue pair, the device's GuestMemory, and a log sized for the RAM."""
    memory = ram.map_again()
    driver, device = queue_pair(ram, 8, device_memory=memory)
    size = (ram.guest_base + ram.size) // LOG_PAGE // 8 + 8
    log = DirtyLog(memfd(size, "dirty-log"), size)
    yield driver, device, memory, log
    memory.set_log(None)
    log.close()


def pages(addr: int, length: int) -> set[int]:
    return set(range(addr // LOG_PAGE, (addr + length - 1) // LOG_PAGE + 1))


def used_pages(driver, slot: int = 0) -> set[int]:
    return pages(driver.used_addr + RING_ENTRIES + 8 * slot, 8) | pages(
        driver.used_addr + RING_IDX, 2
    )


def test_without_a_log_returning_a_chain_records_nothing(ram, logged):
    driver, device, memory, log = logged
    driver.add(writable=[(ram.alloc(100), 100)])
    driver.kick()
    device.push_used(device.pop().head, 100)
    assert log.dirty_pages() == []


def test_a_returned_chain_logs_its_written_bytes_and_the_used_ring(ram, logged):
    driver, device, memory, log = logged
    memory.set_log(log)
    buf = ram.alloc(3 * LOG_PAGE, align=LOG_PAGE)
    driver.add(writable=[(buf, 3 * LOG_PAGE)])
    driver.kick()
    chain = device.pop()
    device.push_used(chain.head, LOG_PAGE + 1)  # the first page, and one byte of the next
    assert set(log.dirty_pages()) == pages(buf, LOG_PAGE + 1) | used_pages(driver)
    assert buf // LOG_PAGE + 2 not in log.dirty_pages()  # the unwritten page is clean


def test_writes_spanning_several_buffers_are_logged_in_chain_order(ram, logged):
    driver, device, memory, log = logged
    memory.set_log(log)
    a = ram.alloc(LOG_PAGE, align=LOG_PAGE)
    b = ram.alloc(LOG_PAGE, align=LOG_PAGE)
    c = ram.alloc(LOG_PAGE, align=LOG_PAGE)
    driver.add(writable=[(a, LOG_PAGE), (b, LOG_PAGE), (c, LOG_PAGE)])
    driver.kick()
    device.push_used(device.pop().head, LOG_PAGE + 10)
    dirty = set(log.dirty_pages())
    assert pages(a, 1) | pages(b, 1) <= dirty
    assert not pages(c, 1) & dirty


def test_a_read_only_chain_logs_only_the_used_ring(ram, logged):
    driver, device, memory, log = logged
    memory.set_log(log)
    buf = ram.alloc(LOG_PAGE, align=LOG_PAGE)
    driver.add(readable=[(buf, 64)])
    driver.kick()
    device.push_used(device.pop().head, 0)
    assert set(log.dirty_pages()) == used_pages(driver)


def test_a_batch_logs_every_element_and_the_index(ram, logged):
    driver, device, memory, log = logged
    memory.set_log(log)
    bufs = [ram.alloc(LOG_PAGE, align=LOG_PAGE) for _ in range(3)]
    for buf in bufs:
        driver.add(writable=[(buf, 64)])
    driver.kick()
    device.push_used_batch([(c.head, 64) for c in device.pop_batch(8)])
    expected = set().union(*(pages(b, 64) for b in bufs))
    for slot in range(3):
        expected |= used_pages(driver, slot)
    assert set(log.dirty_pages()) == expected


def test_the_used_ring_is_logged_at_the_address_the_front_end_gave(ram):
    driver, _ = queue_pair(ram, 8)
    elsewhere = ram.guest_base + ram.size - 2 * LOG_PAGE  # log_guest_addr, not the ring
    memory = ram.map_again()
    device = SplitQueue(memory, 8, driver.desc_addr, driver.avail_addr,
                        driver.used_addr, log_used=elsewhere)  # fmt: skip
    log = DirtyLog(memfd(1024, "dirty-log"), 1024)
    memory.set_log(log)
    driver.add(readable=[(ram.alloc(8), 8)])
    driver.kick()
    device.push_used(device.pop().head, 0)
    assert set(log.dirty_pages()) == pages(elsewhere, RING_ENTRIES + 8)
    memory.set_log(None)
    log.close()


def test_a_chain_popped_before_logging_began_is_logged_when_returned(ram, logged):
    driver, device, memory, log = logged
    buf = ram.alloc(2 * LOG_PAGE, align=LOG_PAGE)
    driver.add(writable=[(buf, 2 * LOG_PAGE)])
    driver.kick()
    chain = device.pop()  # in flight as the migration starts
    memory.set_log(log)
    device.push_used(chain.head, 2 * LOG_PAGE)
    assert pages(buf, 2 * LOG_PAGE) <= set(log.dirty_pages())


def test_ranges_recorded_in_an_earlier_logging_period_are_not_reused(ram, logged):
    driver, device, memory, log = logged
    memory.set_log(log)
    first = ram.alloc(LOG_PAGE, align=LOG_PAGE)
    driver.add(writable=[(first, LOG_PAGE)])
    driver.kick()
    head = device.pop().head
    memory.set_log(None)  # the migration was cancelled with the chain in flight
    device.push_used(head, 0)
    driver.used()
    second = ram.alloc(LOG_PAGE, align=LOG_PAGE)
    assert driver.add(writable=[(second, LOG_PAGE)]) == head  # the head is reused
    driver.kick()
    chain = device.pop()
    memory.set_log(log)  # a new migration
    device.push_used(chain.head, 16)
    dirty = set(log.dirty_pages())
    assert pages(second, 16) <= dirty
    assert not pages(first, 1) & dirty


def test_a_chain_given_back_unused_is_logged_whole(ram, logged):
    """RX reads the TAP straight into a chain and gives it back when the frame
    does not fit: the bytes were written, so they are logged, though unused."""
    driver, device, memory, log = logged
    memory.set_log(log)
    buf = ram.alloc(2 * LOG_PAGE, align=LOG_PAGE)
    driver.add(writable=[(buf, 2 * LOG_PAGE)])
    driver.kick()
    chain = device.pop()
    chain.writable[0][:4] = b"data"
    device.unpop()
    assert pages(buf, 2 * LOG_PAGE) <= set(log.dirty_pages())
    assert device.pop().head == chain.head  # and it is served again, as before


def test_asking_for_kicks_again_logs_the_used_ring_fields_it_writes(ram, logged):
    """avail_event (EVENT_IDX) and used.flags are the device's writes too: a
    migrated guest whose copy missed them would wait for a kick it never asked
    for, or never get one it did."""

    driver, device, memory, log = logged
    memory.set_log(log)
    device.disable_notification()
    device.enable_notification()
    flags_page = pages(driver.used_addr, 2)
    assert flags_page <= set(log.dirty_pages())  # used.flags, without EVENT_IDX


def test_a_packed_ring_logs_its_device_event_area(ram):
    from pyvhost.testing import packed_queue_pair

    memory = ram.map_again()
    driver, device = packed_queue_pair(ram, 8, device_memory=memory, event_idx=True)
    size = (ram.guest_base + ram.size) // LOG_PAGE // 8 + 8
    log = DirtyLog(memfd(size, "dirty-log"), size)
    memory.set_log(log)
    try:
        device.enable_notification()
        assert pages(driver.used_addr, 4) <= set(log.dirty_pages())  # the device event area
        buf = ram.alloc(LOG_PAGE, align=LOG_PAGE)
        driver.add(writable=[(buf, 100)])
        driver.kick()
        device.push_used(device.pop().head, 100)
        assert pages(buf, 100) | pages(driver.desc_addr, 16) <= set(log.dirty_pages())
    finally:
        memory.set_log(None)
        log.close()
        device.close()
