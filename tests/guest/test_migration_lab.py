"""How the migration test tells a back-end's lost write from one of the
guest's CPU (PageDifference, RxRings): fed made-up pages and rings, no QEMU."""

from pyvhost.guest.migration_lab import PAGE, PageDifference, RxRings
from pyvhost.virtq.layout import (
    DESC,
    RING_ENTRIES,
    RING_IDX,
    USED_ELEM,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    used_ring_size,
)

RING = (0x5000 + 0x100, 6 + 8 * 256)  # a used ring inside the page at 0x5000
BUFFER = (0x9000 + 0x200, 1536)  # an RX buffer inside the page at 0x9000
DEVICE = [RING, BUFFER]


def page_with(changes: dict[int, bytes], base: bytes = bytes(PAGE)) -> bytes:
    page = bytearray(base)
    for offset, data in changes.items():
        page[offset : offset + len(data)] = data
    return bytes(page)


def test_bytes_that_differ_close_together_are_one_span():
    new = page_with({10: b"\x01", 20: b"\x02", 100: b"\x03"})
    assert PageDifference(0, new, bytes(PAGE)).spans() == [(10, 21), (100, 101)]


def test_a_frame_the_destination_lacks_in_an_rx_buffer_is_the_devices():
    frame = page_with({0x200: b"\x5a" * 1514})
    assert PageDifference(0x9000, frame, bytes(PAGE)).written_by_device(DEVICE)


def test_a_used_element_the_destination_lacks_is_the_devices():
    element = (7).to_bytes(4, "little") + (1514).to_bytes(4, "little")
    ring_page = page_with({0x100 + 4 + 8 * 3: element})
    assert PageDifference(0x5000, ring_page, bytes(PAGE)).written_by_device(DEVICE)


def test_received_data_the_guest_copied_elsewhere_is_not_the_devices():
    copied = page_with({0: b"\x5a" * PAGE})
    assert not PageDifference(0x20000, copied, bytes(PAGE)).written_by_device(DEVICE)


def test_kernel_data_beside_an_rx_buffer_is_not_the_devices():
    # The buffer's page also holds a structure the guest's CPU updated.
    pointers = (0xFFFF8A1FDF02D890).to_bytes(8, "little") * 4
    old = page_with({0x880 + 0x400: pointers})
    new = page_with({0x880 + 0x400: b"\x86\x04"}, old)
    assert not PageDifference(0x9000, new, old).written_by_device(DEVICE)


# RxRings: which RX buffers a stopped queue says the device wrote. A queue of 8.
NUM = 8


def rings(descs: dict[int, tuple[int, int, int, int]], posted: list[int], last_avail: int,
          used: list[tuple[int, int]]) -> RxRings:  # fmt: skip
    """`descs`: head -> (addr, len, flags, next); `posted`: the avail ring's
    entries from 0 on (avail.idx = their count); `used`: elements from 0 on."""
    table = bytearray(DESC.size * NUM)
    for head, desc in descs.items():
        DESC.pack_into(table, DESC.size * head, *desc)
    avail = bytearray(avail_ring_size(NUM))
    avail[RING_IDX : RING_IDX + 2] = len(posted).to_bytes(2, "little")
    for i, head in enumerate(posted):
        avail[RING_ENTRIES + 2 * (i % NUM) :][:2] = head.to_bytes(2, "little")
    ring = bytearray(used_ring_size(NUM))
    ring[RING_IDX : RING_IDX + 2] = len(used).to_bytes(2, "little")
    for i, element in enumerate(used):
        USED_ELEM.pack_into(ring, RING_ENTRIES + 8 * (i % NUM), *element)
    return RxRings(bytes(table), bytes(avail), bytes(ring), last_avail)


W = VIRTQ_DESC_F_WRITE


def test_a_returned_buffer_is_the_devices_as_far_as_its_used_length():
    r = rings({0: (0x9000, 1536, W, 0)}, posted=[0], last_avail=1, used=[(0, 100)])
    assert r.written() == [(0x9000, 100)]


def test_a_posted_buffer_not_yet_taken_is_not_the_devices():
    # Head 0 came back, and the guest posted it again with a new buffer.
    r = rings({0: (0xA000, 1536, W, 0)}, posted=[0, 0], last_avail=1, used=[(0, 100)])
    assert r.posted() == {0}
    assert r.written() == []


def test_a_chain_of_buffers_is_the_devices_along_the_chain():
    descs = {2: (0x9000, 1000, W | VIRTQ_DESC_F_NEXT, 5), 5: (0xB000, 1000, W, 0)}
    r = rings(descs, posted=[2], last_avail=1, used=[(2, 1500)])
    assert r.written() == [(0x9000, 1000), (0xB000, 500)]


def test_a_heads_latest_used_element_gives_its_length():
    r = rings({1: (0x9000, 1536, W, 0)}, posted=[1, 1], last_avail=2, used=[(1, 60), (1, 900)])
    assert r.written() == [(0x9000, 900)]


def test_used_slots_past_used_idx_are_not_read():
    # Slots 1.. of a used ring that has returned one chain are zeros: head 0, len 0.
    r = rings({0: (0x9000, 64, W, 0), 3: (0xC000, 64, W, 0)}, [3], 1, used=[(3, 64)])
    assert r.written() == [(0xC000, 64)]


def test_a_loop_in_the_table_ends_the_walk():
    looped = {0: (0x9000, 16, W | VIRTQ_DESC_F_NEXT, 0)}
    r = rings(looped, posted=[0], last_avail=1, used=[(0, 1 << 20)])
    assert r.written() == [(0x9000, 16)] * NUM
