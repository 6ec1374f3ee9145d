"""Device side of the packed ring, driven by the packed driver-side mock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from pyvhost.errors import (
    BufferIdError,
    ChainTooLongError,
    DescriptorOrderError,
    IndirectDescriptorError,
    QueueConfigError,
    WrapCounterError,
)
from pyvhost.testing import GuestRam, packed_queue_pair
from pyvhost.virtq.layout import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pyvhost.virtq.packed import PackedQueue
from pyvhost.virtq.packed_layout import (
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    vring_base,
)

AVAIL = VRING_PACKED_DESC_F_AVAIL  # available in lap 1


def test_an_empty_queue_pops_nothing(ram):
    _, device = packed_queue_pair(ram, 8)
    assert device.pop() is None and device.ready


def test_a_chain_arrives_as_readable_then_writable_views_under_its_buffer_id(ram):
    driver, device = packed_queue_pair(ram, 8)
    a, w = ram.alloc(64), ram.alloc(64)
    ram.memory.write(a, b"head")
    buf_id = driver.add(readable=[(a, 4)], writable=[(w, 10), (w + 10, 20)])
    assert device.pop() is None  # posted, not yet published
    driver.kick()
    chain = device.pop()
    assert chain.head == buf_id
    assert [bytes(v) for v in chain.readable] == [b"head"]
    assert [len(v) for v in chain.writable] == [10, 20]
    chain.writable[0][:2] = b"ok"
    device.push_used(chain.head, 2)
    assert driver.used() == [(buf_id, 2)]
    assert ram.memory.read(w, 2) == b"ok"


def test_used_descriptors_skip_as_many_slots_as_the_chain_took(ram):
    driver, device = packed_queue_pair(ram, 8)
    ids = [driver.add(readable=[(ram.alloc(8), 8)] * n) for n in (3, 1, 2)]
    driver.kick()
    chains = device.pop_batch(10)
    assert [c.head for c in chains] == ids
    device.push_used_batch([(c.head, 0) for c in chains])
    assert [i for i, _ in driver.used()] == ids
    assert device.next_used == 6 | 1 << 15  # 3 + 1 + 2 slots, still in lap 1


def test_buffers_returned_out_of_order_reach_the_driver_in_completion_order(ram):
    driver, device = packed_queue_pair(ram, 8)
    ids = [driver.add(writable=[(ram.alloc(8), 8)] * n) for n in (2, 1, 3)]
    driver.kick()
    chains = device.pop_batch(10)
    device.push_used(chains[2].head, 3)
    device.push_used(chains[0].head, 1)
    device.push_used(chains[1].head, 2)
    assert driver.used() == [(ids[2], 3), (ids[0], 1), (ids[1], 2)]


def test_the_wrap_counters_flip_at_the_end_of_the_ring(ram):
    driver, device = packed_queue_pair(ram, 4)
    for lap in range(5):
        for _ in range(2):
            driver.add(readable=[(ram.alloc(8), 8)] * 2)
        driver.kick()
        chains = device.pop_batch(10)
        assert len(chains) == 2, f"lap {lap}"
        device.push_used_batch([(c.head, 0) for c in chains])
        assert len(driver.used()) == 2
    assert device.vring_base == vring_base(0, 0, 0, 0)  # five laps: counters flipped 5 times


def test_an_indirect_table_is_one_descriptor_in_the_ring(ram):
    driver, device = packed_queue_pair(ram, 4, indirect=True)
    r, w, table = ram.alloc(16), ram.alloc(16), ram.alloc(64)
    ram.memory.write(r, b"indirect")
    buf_id = driver.add_indirect(table, readable=[(r, 8)], writable=[(w, 16)])
    driver.kick()
    chain = device.pop()
    assert chain.head == buf_id and bytes(chain.readable[0]) == b"indirect"
    assert chain.writable_len == 16
    device.push_used(buf_id, 16)
    assert driver.used() == [(buf_id, 16)]
    assert device.next_used == 1 | 1 << 15


def test_unpop_gives_the_last_chain_back(ram):
    driver, device = packed_queue_pair(ram, 8)
    ids = [driver.add(readable=[(ram.alloc(8), 8)] * 2) for _ in range(2)]
    driver.kick()
    first = device.pop()
    device.pop()
    device.unpop()
    assert device.in_flight == 1
    again = device.pop()
    assert (first.head, again.head) == tuple(ids)


def test_several_chains_given_back_come_again_in_order(ram):
    """As the RX path does when a merged frame finds too few buffers."""
    driver, device = packed_queue_pair(ram, 8)
    ids = [driver.add(writable=[(ram.alloc(8), 8)] * n) for n in (1, 2, 1)]
    driver.kick()
    device.pop_batch(3)
    for _ in range(3):
        device.unpop()
    assert device.in_flight == 0
    assert [c.head for c in device.pop_batch(3)] == ids


def test_a_queue_restarted_from_its_vring_base_goes_on_where_it_stopped(ram):
    driver, device = packed_queue_pair(ram, 4)
    for _ in range(3):  # into the second lap
        driver.add(readable=[(ram.alloc(8), 8)] * 2)
        driver.kick()
        device.push_used(device.pop().head, 0)
        driver.used()
    base = device.vring_base
    assert base == vring_base(2, 0, 2, 0)
    device.close()
    buf_id = driver.add(readable=[(ram.alloc(8), 8)])
    driver.kick()
    again = PackedQueue(
        ram.map_again(), 4, driver.desc_addr, driver.avail_addr, driver.used_addr, base=base
    )
    assert again.pop().head == buf_id


def test_a_base_past_the_ring_is_refused(ram):
    driver, _ = packed_queue_pair(ram, 4)
    with pytest.raises(QueueConfigError, match="position 5 is past a ring of 4"):
        PackedQueue(ram.map_again(), 4, driver.desc_addr, driver.avail_addr, driver.used_addr,
                    base=vring_base(5, 1, 0, 1))  # fmt: skip


# --- notifications ---------------------------------------------------------------


def test_a_driver_that_disables_interrupts_is_not_signalled(ram):
    driver, device = packed_queue_pair(ram, 8)
    driver.add(readable=[(ram.alloc(8), 8)])
    driver.kick()
    driver.suppress_interrupts(True)
    device.push_used(device.pop().head, 0)
    assert not device.needs_notification()
    driver.suppress_interrupts(False)
    assert device.needs_notification()


def test_with_event_idx_the_device_signals_only_past_the_drivers_position(ram):
    driver, device = packed_queue_pair(ram, 8, event_idx=True)
    for _ in range(4):
        driver.add(readable=[(ram.alloc(8), 8)])
    driver.kick()
    chains = device.pop_batch(4)
    device.push_used(chains[0].head, 0)
    assert device.needs_notification()  # the first decision
    driver.set_used_event(2)  # "interrupt me when position 2 is used"
    device.push_used(chains[1].head, 0)  # position 1: not yet
    assert not device.needs_notification()
    device.push_used(chains[2].head, 0)  # position 2
    assert device.needs_notification()


def test_a_polling_device_asks_for_no_kicks_and_re_arms(ram):
    driver, device = packed_queue_pair(ram, 8, event_idx=True)
    device.disable_notification()
    driver.add(readable=[(ram.alloc(8), 8)])
    assert not driver.kick()
    assert device.enable_notification()  # a buffer arrived meanwhile
    device.pop()
    assert not device.enable_notification()
    driver.add(readable=[(ram.alloc(8), 8)])
    assert driver.kick()


# --- hostile rings ----------------------------------------------------------------


def hostile(ram, *descs, indirect=False):
    """A device queue over a ring whose first descriptors are written raw."""
    driver, device = packed_queue_pair(ram, 4, indirect=indirect)
    for pos, (addr, length, buf_id, flags) in enumerate(descs):
        driver.write_desc(pos, addr, length, buf_id, flags)
    return device


def test_a_buffer_id_past_the_queue_breaks_only_that_queue(ram):
    device = hostile(ram, (ram.alloc(8), 8, 4, AVAIL))
    other_driver, other = packed_queue_pair(ram, 4)
    assert device.pop() is None
    assert isinstance(device.broken, BufferIdError) and "id 4 is past" in str(device.broken)
    other_driver.add(readable=[(ram.alloc(8), 8)])
    other_driver.kick()
    assert other.pop() is not None


def test_a_buffer_id_reused_while_in_flight_breaks_the_queue(ram):
    buf = ram.alloc(8)
    device = hostile(ram, (buf, 8, 1, AVAIL), (buf, 8, 1, AVAIL))
    assert device.pop().head == 1
    assert device.pop() is None
    assert isinstance(device.broken, BufferIdError) and "already in flight" in str(device.broken)


def test_a_chain_into_a_descriptor_of_the_wrong_lap_breaks_the_queue(ram):
    buf = ram.alloc(8)
    wrong_lap = VRING_PACKED_DESC_F_USED  # available in lap 0, not lap 1
    device = hostile(ram, (buf, 8, 0, AVAIL | VIRTQ_DESC_F_NEXT), (buf, 8, 0, wrong_lap))
    assert device.pop() is None
    assert isinstance(device.broken, WrapCounterError)


def test_a_chain_longer_than_the_ring_breaks_the_queue(ram):
    # Every slot available and chained, across the wrap: the walk must stop.
    driver, device = packed_queue_pair(ram, 4)
    buf = ram.alloc(8)
    for pos in range(4):
        driver.write_desc(pos, buf, 8, 0, AVAIL | VIRTQ_DESC_F_NEXT)
    assert device.pop() is None
    assert isinstance(device.broken, (ChainTooLongError, WrapCounterError))


@pytest.mark.parametrize(
    "length, flags, why",
    [
        (0, 0, "not a non-zero multiple of 16"),
        (24, 0, "not a non-zero multiple of 16"),
        (16, VIRTQ_DESC_F_NEXT, "only one"),
    ],
)
def test_a_malformed_indirect_table_breaks_the_queue(ram, length, flags, why):
    table = ram.alloc(64)
    device = hostile(ram, (table, length, 0, AVAIL | VIRTQ_DESC_F_INDIRECT | flags), indirect=True)
    assert device.pop() is None
    assert isinstance(device.broken, IndirectDescriptorError) and why in str(device.broken)


def test_an_indirect_table_without_the_feature_breaks_the_queue(ram):
    device = hostile(ram, (ram.alloc(16), 16, 0, AVAIL | VIRTQ_DESC_F_INDIRECT))
    assert device.pop() is None
    assert "INDIRECT_DESC was not negotiated" in str(device.broken)


def test_a_readable_buffer_after_a_writable_one_breaks_the_queue(ram):
    buf = ram.alloc(8)
    device = hostile(
        ram, (buf, 8, 0, AVAIL | VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT), (buf, 8, 0, AVAIL)
    )
    assert device.pop() is None
    assert isinstance(device.broken, DescriptorOrderError)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=16 * 8 + 8, max_size=16 * 8 + 8), st.booleans())
def test_random_ring_contents_never_raise_out_of_the_device(garbage, indirect):
    with GuestRam(1 << 16) as ram:
        driver, device = packed_queue_pair(ram, 8, indirect=indirect, event_idx=True)
        ram.memory.write(driver.desc_addr, garbage)
        for _ in range(10):
            chain = device.pop()
            if chain is None:
                break
            device.push_used(chain.head, 0)
        device.needs_notification()
        device.enable_notification()
        device.close()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(0, 2**32), st.booleans())
def test_driver_and_device_agree_over_many_laps(size, seed, event_idx):
    """Buffers of 1-3 descriptors posted, popped and returned in random order:
    every buffer comes back once, with what the device wrote, and nothing breaks."""
    rnd = random.Random(seed)
    with GuestRam(1 << 16) as ram:
        driver, device = packed_queue_pair(ram, size, event_idx=event_idx)
        posted: dict[int, int] = {}
        in_device = []
        for _ in range(200):
            n = rnd.randint(1, 3)
            if rnd.random() < 0.5 and driver.free_descriptors >= n:
                buf_id = driver.add(writable=[(ram.alloc(8), 8)] * n)
                posted[buf_id] = n
                driver.kick()
            if rnd.random() < 0.5:
                chain = device.pop()
                if chain is not None:
                    assert chain.writable_len == 8 * posted[chain.head]
                    in_device.append(chain.head)
            if in_device and rnd.random() < 0.5:
                buf_id = in_device.pop(rnd.randrange(len(in_device)))
                device.push_used(buf_id, posted[buf_id])
            for buf_id, written in driver.used():
                assert written == posted.pop(buf_id)
        assert device.broken is None
        device.close()


def test_a_16_bit_base_puts_the_used_position_at_the_avail_one(ram):
    """DPDK's virtio_user sends SET_VRING_BASE with the avail half only (0x8000
    for a fresh ring): the used position follows it, as in DPDK's back-end."""
    driver, device = packed_queue_pair(ram, 8)
    device.close()
    fresh = PackedQueue(ram.map_again(), 8, driver.desc_addr, driver.avail_addr,
                        driver.used_addr, base=0x8000)  # fmt: skip
    assert fresh.vring_base == vring_base(0, 1, 0, 1)
    buf_id = driver.add(writable=[(ram.alloc(8), 8)])
    driver.kick()
    fresh.push_used(fresh.pop().head, 8)
    assert driver.used() == [(buf_id, 8)]  # written in the lap the driver reads


def test_a_ring_in_use_started_afresh_is_called_out(ram, caplog):
    """QEMU restarts a packed ring at position 0 after a back-end crash; the
    ring's first slot says it was in use, and pyvhost says it cannot resume."""
    driver, device = packed_queue_pair(ram, 4)
    driver.add(writable=[(ram.alloc(8), 8)])
    driver.kick()
    device.push_used(device.pop().head, 8)
    device.close()
    again = PackedQueue(ram.map_again(), 4, driver.desc_addr, driver.avail_addr,
                        driver.used_addr, base=vring_base(0, 1, 0, 1))  # fmt: skip
    assert again.restarted_blind and "lost its position" in caplog.text
    fresh_driver, fresh = packed_queue_pair(ram, 4)
    assert not fresh.restarted_blind
