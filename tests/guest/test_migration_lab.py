"""How the migration test tells a back-end's lost write from one of the
guest's CPU (PageDifference): fed made-up pages, no QEMU."""

from pyvhost.guest.migration_lab import PAGE, PageDifference

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
