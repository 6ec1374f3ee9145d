"""Guest memory: translation, validation, hot-plug, pins, listeners, aliases."""

from __future__ import annotations

import ctypes
import gc
import os
import uuid

import pytest

from pyvhost.errors import (
    AddressNotMappedError,
    GuestMemoryError,
    InvalidRegionError,
    NotContiguousError,
    RangeOverflowError,
    ReadOnlyMemoryError,
    RegionNotFoundError,
)
from pyvhost.memory import GuestAddress, GuestMemory, RegionSpec, RegionState
from pyvhost.testing.memfd import fds_named, mappings_named, memfd

PAGE = 4096


@pytest.fixture
def name() -> str:
    return f"pyvhost-test-{uuid.uuid4().hex[:8]}"


def add(mem: GuestMemory, gpa: int, size: int, name: str = "ram", **kw) -> int:
    """Add a region backed by a fresh memfd; return a dup of the fd for inspection."""
    fd = memfd(size + kw.get("mmap_offset", 0), name)
    spy = os.dup(fd)
    mem.add_region(RegionSpec(GuestAddress(gpa), size, **kw), fd)
    return spy


def test_translation_returns_a_view_of_the_shared_file_not_a_copy():
    mem = GuestMemory()
    spy = add(mem, 0x10000, PAGE)
    [view] = mem.translate(0x10010, 4, write=True)
    view[:] = b"ping"
    assert os.pread(spy, 4, 0x10) == b"ping"
    os.pwrite(spy, b"pong", 0x10)
    assert bytes(view) == b"pong"
    os.close(spy)
    mem.clear()


def test_a_buffer_crossing_into_the_next_region_is_scatter_gather():
    mem = GuestMemory()
    a = add(mem, 0, PAGE)
    b = add(mem, PAGE, PAGE)
    views = mem.translate(PAGE - 3, 6, write=True)
    assert [len(v) for v in views] == [3, 3]
    mem.write(PAGE - 3, b"abcdef")
    assert os.pread(a, 3, PAGE - 3) == b"abc"
    assert os.pread(b, 3, 0) == b"def"
    assert mem.read(PAGE - 3, 6) == b"abcdef"
    for fd in (a, b):
        os.close(fd)
    mem.clear()


def test_a_buffer_running_into_a_hole_names_the_first_missing_byte():
    mem = GuestMemory()
    add(mem, 0, PAGE)
    add(mem, 2 * PAGE, PAGE)
    with pytest.raises(AddressNotMappedError) as e:
        mem.translate(PAGE - 8, 16)
    assert e.value.missing_at == PAGE
    mem.clear()


@pytest.mark.parametrize("addr", [0, 0xFFF, 0x3000, 2**64 - 1])
def test_an_address_outside_every_region_is_rejected(addr):
    mem = GuestMemory()
    add(mem, 0x1000, 0x2000)
    with pytest.raises(AddressNotMappedError):
        mem.translate(addr, 1)
    mem.clear()


@pytest.mark.parametrize(
    ("addr", "length"), [(2**64 - 4, 8), (0x1000, 2**64), (-1, 4), (0x1000, -4)]
)
def test_a_range_that_wraps_or_is_negative_is_rejected(addr, length):
    mem = GuestMemory()
    add(mem, 0x1000, 0x1000)
    with pytest.raises(RangeOverflowError):
        mem.translate(addr, length)
    mem.clear()


def test_a_read_only_region_reads_but_refuses_writes():
    mem = GuestMemory()
    spy = add(mem, 0, PAGE, readonly=True)
    os.pwrite(spy, b"rom", 0)
    assert mem.read(0, 3) == b"rom"
    with pytest.raises(ReadOnlyMemoryError):
        mem.translate(0, 3, write=True)
    with pytest.raises(ReadOnlyMemoryError):
        mem.write(0, b"x")
    # The view itself is read-only too: the kernel mapping is PROT_READ.
    [view] = mem.translate(0, 3)
    assert view.readonly
    os.close(spy)
    mem.clear()


def test_a_zero_length_range_yields_no_views():
    mem = GuestMemory()
    assert mem.translate(0xDEAD, 0) == []


def test_a_ring_must_be_contiguous():
    mem = GuestMemory()
    add(mem, 0, PAGE)
    add(mem, PAGE, PAGE)
    assert len(mem.contiguous(0x10, 0x100)) == 0x100
    with pytest.raises(NotContiguousError):
        mem.contiguous(PAGE - 8, 16)
    mem.clear()


def test_an_overlapping_region_is_refused_and_its_fd_closed(name):
    mem = GuestMemory()
    add(mem, 0, 2 * PAGE)
    with pytest.raises(InvalidRegionError, match="overlaps"):
        mem.add_region(RegionSpec(GuestAddress(PAGE), PAGE), memfd(PAGE, name))
    assert fds_named(name) == []
    assert len(mem) == 1
    mem.clear()


def test_a_file_shorter_than_its_region_is_refused_before_any_access(name):
    # Mapping it would succeed, and the first touch past EOF would SIGBUS us.
    mem = GuestMemory()
    with pytest.raises(InvalidRegionError, match="file has only"):
        mem.add_region(RegionSpec(GuestAddress(0), 4 * PAGE), memfd(PAGE, name))
    assert fds_named(name) == [] and mappings_named(name) == []


def test_a_bad_fd_is_refused():
    with pytest.raises(InvalidRegionError):
        GuestMemory().add_region(RegionSpec(GuestAddress(0), PAGE), os.open("/", os.O_RDONLY))


def test_the_region_count_is_capped(name):
    mem = GuestMemory(max_regions=2)
    add(mem, 0, PAGE)
    add(mem, PAGE, PAGE)
    with pytest.raises(InvalidRegionError, match="limit is 2"):
        mem.add_region(RegionSpec(GuestAddress(4 * PAGE), PAGE), memfd(PAGE, name))
    assert fds_named(name) == []
    mem.clear()


@pytest.mark.parametrize(
    "kw",
    [
        dict(guest_addr=0, size=0),
        dict(guest_addr=2**64 - PAGE, size=2 * PAGE),
        dict(guest_addr=0, size=PAGE, frontend_addr=2**64 - 1),
        dict(guest_addr=0, size=PAGE, mmap_offset=-1),
    ],
)
def test_an_impossible_region_description_is_refused(kw):
    with pytest.raises(GuestMemoryError):
        RegionSpec(**kw)


def test_an_unaligned_mmap_offset_maps_the_right_bytes():
    mem = GuestMemory()
    fd = memfd(3 * PAGE)
    os.pwrite(fd, b"here", PAGE + 0x123)
    mem.add_region(RegionSpec(GuestAddress(0x8000), PAGE, mmap_offset=PAGE + 0x123), fd)
    assert mem.read(0x8000, 4) == b"here"
    mem.clear()


def test_hot_add_then_remove_publishes_and_unpublishes_at_once(name):
    mem = GuestMemory()
    add(mem, 0, PAGE)
    with pytest.raises(AddressNotMappedError):
        mem.read(0x10000, 1)
    add(mem, 0x10000, PAGE, name)
    assert mem.read(0x10000, 1) == b"\0"  # also primes the last-hit cache
    mem.remove_region(0x10000)
    with pytest.raises(AddressNotMappedError):
        mem.read(0x10000, 1)
    assert mem.read(0, 1) == b"\0"
    mem.clear()


def test_removing_an_unpinned_region_unmaps_it_and_closes_its_fd(name):
    mem = GuestMemory()
    spy = add(mem, 0, PAGE, name)
    os.close(spy)
    # Two fds while mapped: the mapping's own, and the one kept to share it
    # with a worker process (MemoryRegion.share_fd).
    assert len(mappings_named(name)) == 1 and len(fds_named(name)) == 2
    region = mem.remove_region(0)
    assert region.state is RegionState.UNMAPPED and region.is_unmapped
    assert mappings_named(name) == [] and fds_named(name) == []


def test_removing_an_unknown_region_is_an_error():
    mem = GuestMemory()
    add(mem, 0, PAGE)
    with pytest.raises(RegionNotFoundError):
        mem.remove_region(PAGE)
    with pytest.raises(RegionNotFoundError):
        mem.remove_region(0, size=2 * PAGE)
    mem.clear()


def test_a_pinned_buffer_survives_removal_until_the_last_pin_is_released(name):
    mem = GuestMemory()
    spy = add(mem, 0x4000, 2 * PAGE, name)
    os.close(spy)
    first = mem.pin(0x4000, 16, write=True)
    second = mem.pin(0x5000, 16)
    region = mem.remove_region(0x4000)

    # Unpublished at once...
    with pytest.raises(AddressNotMappedError):
        mem.read(0x4000, 1)
    # ...but the pinned buffer stays readable and writable.
    assert region.state is RegionState.RETIRED
    first.views[0][:5] = b"alive"
    assert bytes(first.views[0][:5]) == b"alive"

    first.release()
    assert not region.is_unmapped and len(mappings_named(name)) == 1
    with second:
        assert bytes(second.views[0]) == bytes(16)
    # The unmap (and the fd close) happened exactly at the last release.
    assert region.is_unmapped
    assert mappings_named(name) == [] and fds_named(name) == []


def test_released_pin_views_cannot_touch_memory_any_more():
    mem = GuestMemory()
    add(mem, 0, PAGE)
    pin = mem.pin(0, 8, write=True)
    view = pin.views[0]
    pin.release()
    with pytest.raises(ValueError):
        view[0] = 1
    mem.clear()


def test_an_unpinned_view_defers_the_unmap_instead_of_dangling(name):
    # Python's buffer exports act as a second reference count: memory safety
    # does not depend on callers pinning.
    mem = GuestMemory()
    os.close(add(mem, 0, PAGE, name))
    [view] = mem.translate(0, 4, write=True)
    region = mem.remove_region(0)
    view[:] = b"safe"
    assert bytes(view) == b"safe" and not region.is_unmapped
    del view
    gc.collect()
    assert region.is_unmapped and mappings_named(name) == [] and fds_named(name) == []


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def region_added(self, region) -> None:
        self.events.append(("added", region.start))

    def region_removed(self, region) -> None:
        self.events.append(("removed", region.start))


def test_listeners_hear_every_add_and_remove():
    mem = GuestMemory()
    rec = Recorder()
    mem.add_listener(rec)
    add(mem, 0, PAGE)
    add(mem, PAGE, PAGE)
    mem.remove_region(0)
    mem.set_regions([(RegionSpec(GuestAddress(0x100000), PAGE), memfd(PAGE))])
    mem.remove_listener(rec)
    mem.clear()
    assert rec.events == [
        ("added", 0),
        ("added", PAGE),
        ("removed", 0),
        ("removed", PAGE),
        ("added", 0x100000),
    ]


def test_listeners_see_the_new_map_when_called():
    mem = GuestMemory()
    seen = []

    class Probe:
        def region_added(self, region):
            seen.append(mem.find_region(region.start) is region)

        def region_removed(self, region):
            try:
                mem.find_region(region.start)
                seen.append(False)
            except AddressNotMappedError:
                seen.append(True)

    mem.add_listener(Probe())
    add(mem, 0, PAGE)
    mem.remove_region(0)
    assert seen == [True, True]


def test_a_change_is_committed_once_after_its_regions_and_before_any_unmap(name):
    """map_committed() is where a table kept elsewhere (the kernel's) is replaced:
    once per change, with the removed regions still mapped."""
    mem = GuestMemory()
    log: list[str] = []
    first = mem.regions

    class Committer:
        def region_added(self, region):
            log.append("added")

        def region_removed(self, region):
            log.append("removed")

        def map_committed(self):
            log.append("commit")
            log.extend("still mapped" for r in first if not r.is_unmapped)

    mem.add_listener(Committer())
    add(mem, 0, PAGE, name)
    first = mem.regions
    mem.set_regions([(RegionSpec(GuestAddress(0x100000), PAGE), memfd(PAGE))])
    assert log == ["added", "commit", "removed", "added", "commit", "still mapped"]
    assert first[0].is_unmapped  # and unmapped right after the commit
    log.clear()
    mem.clear()
    assert log == ["removed", "commit"]


def test_host_address_is_where_this_process_sees_the_guest_bytes(name):
    mem = GuestMemory()
    add(mem, 0, PAGE, name)
    add(mem, PAGE, PAGE, name)
    mem.write(PAGE + 100, b"vhost")
    assert ctypes.string_at(mem.host_address(PAGE + 100, 5), 5) == b"vhost"
    with pytest.raises(NotContiguousError):
        mem.host_address(PAGE - 2, 4)  # adjacent regions are separate mappings
    with pytest.raises(AddressNotMappedError):
        mem.host_address(4 * PAGE, 1)
    mem.clear()


def test_a_failed_table_replacement_keeps_the_old_map_and_closes_new_fds(name):
    mem = GuestMemory()
    add(mem, 0, PAGE)
    good = memfd(PAGE, name)
    short = memfd(PAGE, name)
    with pytest.raises(InvalidRegionError):
        mem.set_regions(
            [
                (RegionSpec(GuestAddress(0x10000), PAGE), good),
                (RegionSpec(GuestAddress(0x20000), 2 * PAGE), short),
            ]
        )
    assert [r.start for r in mem.regions] == [0]
    assert fds_named(name) == [] and mappings_named(name) == []
    mem.clear()


def test_aliases_of_one_file_offset_share_their_bytes():
    mem = GuestMemory()
    fd = memfd(2 * PAGE)
    mem.add_region(RegionSpec(GuestAddress(0), PAGE, mmap_offset=PAGE), os.dup(fd))
    mem.add_region(RegionSpec(GuestAddress(0x80000000), PAGE, mmap_offset=PAGE), fd)
    mem.write(0x10, b"alias")
    assert mem.read(0x80000010, 5) == b"alias"
    mem.clear()


def test_frontend_addresses_translate_to_guest_addresses():
    mem = GuestMemory()
    mem.add_region(
        RegionSpec(GuestAddress(0x100000), 0x4000, frontend_addr=0x7F0000000000), memfd(0x4000)
    )
    assert mem.frontend_to_guest(0x7F0000000010, 16) == GuestAddress(0x100010)
    with pytest.raises(AddressNotMappedError):
        mem.frontend_to_guest(0x7F0000003FF8, 16)  # runs past the region
    with pytest.raises(AddressNotMappedError):
        mem.frontend_to_guest(0x1000)
    with pytest.raises(RangeOverflowError):
        mem.frontend_to_guest(2**64 - 1, 2)
    mem.clear()


def test_typed_accessors_are_little_endian():
    mem = GuestMemory()
    add(mem, 0, PAGE)
    mem.write_u64(8, 0x0102030405060708)
    assert mem.read(8, 2) == b"\x08\x07"
    assert mem.read_u32(8) == 0x05060708 and mem.read_u16(14) == 0x0102
    mem.clear()
