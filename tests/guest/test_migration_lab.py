"""How the migration test tells a back-end's lost write from one of the
guest's CPU (PageDifference): fed made-up pages, no QEMU."""

import os

from pyvhost.guest.migration_lab import PAGE, PageDifference

PAYLOAD = os.urandom(1 << 16)
RING = (0x5000 + 0x100, 6 + 8 * 256)  # a used ring inside the page at 0x5000


def page_with(changes: dict[int, bytes], base: bytes = bytes(PAGE)) -> bytes:
    page = bytearray(base)
    for offset, data in changes.items():
        page[offset : offset + len(data)] = data
    return bytes(page)


def test_bytes_that_differ_close_together_are_one_span():
    old = bytes(PAGE)
    new = page_with({10: b"\x01", 20: b"\x02", 100: b"\x03"})
    assert PageDifference(0, new, old).spans() == [(10, 21), (100, 101)]


def test_received_data_the_destination_lacks_is_the_devices():
    frame = page_with({512: PAYLOAD[4000:5448]})
    assert PageDifference(0x9000, frame, bytes(PAGE)).written_by_device([RING], PAYLOAD)


def test_a_frame_behind_its_headers_is_still_recognised():
    headers = bytes(range(66))
    frame = page_with({512: headers + PAYLOAD[100:1548]})
    assert PageDifference(0x9000, frame, bytes(PAGE)).written_by_device([RING], PAYLOAD)


def test_a_used_element_the_destination_lacks_is_the_devices():
    ring_page = page_with(
        {0x100 + 4 + 8 * 3: (7).to_bytes(4, "little") + (1514).to_bytes(4, "little")}
    )
    assert PageDifference(0x5000, ring_page, bytes(PAGE)).written_by_device([RING], PAYLOAD)


def test_kernel_data_written_by_the_guests_cpu_is_not_the_devices():
    pointers = (0xFFFF8A1FDF02D890).to_bytes(8, "little") * 4
    old = page_with({0x880: pointers})
    new = page_with({0x880: b"\x86\x04", 0x890: pointers})
    assert not PageDifference(0x9000, new, old).written_by_device([RING], PAYLOAD)


def test_received_data_beside_the_bytes_that_differ_is_not_counted():
    # An RX buffer logged and migrated fine shares the page with a kernel
    # structure whose update was lost: only the bytes that differ count.
    base = page_with({0: PAYLOAD[:1500]})
    new = page_with({2048: b"\x11" * 24}, base)
    assert not PageDifference(0x9000, new, base).written_by_device([RING], PAYLOAD)
