"""Guest memory: the map of regions, and translation of untrusted addresses.

The region table is an immutable snapshot (sorted starts + regions) replaced
whole on every change, so a lookup reads one consistent table, RCU-style.
Lookups bisect the starts (O(log n)) behind a last-hit cache: descriptors of
one queue almost always land in the region the previous one did.

Everything here treats addresses and lengths as hostile: a range is either
wholly backed by published regions (possibly several adjacent ones, returned
as a scatter-gather list) or the call raises a GuestMemoryError subclass.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Protocol

from pyvhost.errors import (
    AddressNotMappedError,
    InvalidRegionError,
    NotContiguousError,
    RangeOverflowError,
    ReadOnlyMemoryError,
    RegionNotFoundError,
)
from pyvhost.memory.address import ADDRESS_LIMIT, FrontendAddress, GuestAddress
from pyvhost.memory.dirty_log import DirtyLog
from pyvhost.memory.region import MemoryRegion, RegionSpec

log = logging.getLogger(__name__)

# libvhost-user's slot count; QEMU takes whatever a backend reports up to 512.
DEFAULT_MAX_REGIONS = 509

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class MemoryListener(Protocol):
    """Code that derives something from the memory map (ring views, kernel tables).

    Called after the new table is published: lookups inside the callbacks see
    the map as it is now. A listener may also define `map_committed()`: called
    once per change, after every region_added/region_removed of it and before
    any removed region is unmapped. That is where a table kept elsewhere (the
    kernel's vhost memory table) is replaced whole: it never sees a map that is
    half old, half new, and never points at memory already unmapped.
    """

    def region_added(self, region: MemoryRegion) -> None: ...

    def region_removed(self, region: MemoryRegion) -> None: ...


class _Table:
    """One immutable snapshot of the map."""

    __slots__ = ("starts", "regions")

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        ordered = sorted(regions, key=lambda r: r.start)
        self.regions: tuple[MemoryRegion, ...] = tuple(ordered)
        self.starts: tuple[int, ...] = tuple(r.start for r in ordered)


class Pin:
    """A guarantee that a guest range stays mapped, even across its removal.

    Holds views into the range (`views`) and a pin on each region under it.
    Release it (or leave its `with` block) to let a removed region unmap.
    """

    __slots__ = ("addr", "length", "views", "_regions")

    def __init__(
        self, addr: int, length: int, views: list[memoryview], regions: list[MemoryRegion]
    ) -> None:
        self.addr = addr
        self.length = length
        self.views = views
        self._regions = regions
        for r in regions:
            r._pin()

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The regions this pin holds (empty once released)."""
        return tuple(self._regions)

    @property
    def released(self) -> bool:
        return not self._regions and not self.views

    def release(self) -> None:
        """Drop the views and the pins. Idempotent."""
        views, self.views = self.views, []
        for v in views:
            v.release()
        regions, self._regions = self._regions, []
        for r in regions:
            r._unpin()

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GuestMemory:
    """The guest's RAM as this process sees it: published regions, by address.

    Not thread-safe for changes: one event loop owns a GuestMemory.
    """

    def __init__(self, max_regions: int = DEFAULT_MAX_REGIONS) -> None:
        self.max_regions = max_regions
        self._table = _Table(())
        self._last: MemoryRegion | None = None
        self._listeners: list[MemoryListener] = []
        # While a live migration logs dirty pages: the log every write marks
        # (the virtqueue marks what the device wrote as it returns a chain).
        self.log: DirtyLog | None = None

    def set_log(self, log: DirtyLog | None) -> None:
        """Start (or stop, with None) logging writes; listeners with a
        `log_changed()` (the kernel datapath) are told."""
        self.log = log
        for listener in list(self._listeners):
            changed = getattr(listener, "log_changed", None)
            if changed is not None:
                changed()

    # --- the map ------------------------------------------------------------

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """Published regions, sorted by guest address."""
        return self._table.regions

    def __len__(self) -> int:
        return len(self._table.regions)

    def add_region(self, spec: RegionSpec, fd: int) -> MemoryRegion:
        """Map and publish one region (hot add). Takes ownership of fd."""
        try:
            self._check_new([spec])
        except BaseException:
            _close_quietly(fd)
            raise
        region = MemoryRegion(spec, fd)
        self._publish(self._table.regions + (region,))
        self._notify_added([region])
        self._notify_committed()
        return region

    def remove_region(self, guest_addr: int, size: int | None = None) -> MemoryRegion:
        """Unpublish the region starting at guest_addr (hot remove).

        New lookups fail at once; the mapping lives on until the region's last
        pin is released. `size`, when given, must match (vhost-user's
        REM_MEM_REG names a region by its whole description).
        """
        region = next((r for r in self._table.regions if r.start == guest_addr), None)
        if region is None or (size is not None and region.spec.size != size):
            raise RegionNotFoundError(
                f"no region at guest 0x{guest_addr:x}"
                + (f" with size 0x{size:x}" if size is not None else "")
            )
        self._publish(tuple(r for r in self._table.regions if r is not region))
        self._notify_removed([region])
        self._notify_committed()
        region._retire()
        return region

    def set_regions(self, entries: Iterable[tuple[RegionSpec, int]]) -> None:
        """Replace the whole map in one step (vhost-user SET_MEM_TABLE).

        Takes ownership of every fd. The new table is validated and mapped in
        full before the old one is touched: on any error the old map stays
        and every new fd is closed.
        """
        entries = list(entries)
        new: list[MemoryRegion] = []
        try:
            self._check_new([s for s, _ in entries], replacing=True)
            for i, (spec, fd) in enumerate(entries):
                entries[i] = (spec, -1)  # ownership moves into MemoryRegion now
                new.append(MemoryRegion(spec, fd))
        except BaseException:
            for _, fd in entries:
                if fd >= 0:
                    _close_quietly(fd)
            for r in new:
                r._retire()
            raise
        old = self._table.regions
        self._publish(tuple(new))
        self._notify_removed(old)
        self._notify_added(new)
        self._notify_committed()
        for r in old:
            r._retire()

    def clear(self) -> None:
        """Remove every region (a frontend went away)."""
        old = self._table.regions
        self._publish(())
        self._notify_removed(old)
        self._notify_committed()
        for r in old:
            r._retire()

    def add_listener(self, listener: MemoryListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: MemoryListener) -> None:
        self._listeners.remove(listener)

    # --- translation ----------------------------------------------------------

    def find_region(self, addr: int) -> MemoryRegion:
        """The published region holding guest address `addr`."""
        r = self._last
        if r is not None and r.start <= addr < r.end:
            return r
        t = self._table
        i = bisect.bisect_right(t.starts, addr) - 1
        if i >= 0:
            r = t.regions[i]
            if addr < r.end:
                self._last = r
                return r
        raise AddressNotMappedError(addr, 1)

    def gather(self, addr: int, length: int, out: list, write: bool = False) -> None:
        """Append views covering guest [addr, addr+length) to `out`.

        One view when the range sits in one region, several when it runs on
        into adjacent regions. Zero-copy: the views are the guest's memory.
        """
        r = self._last
        if r is not None and r.start <= addr and addr + length <= r.end and length > 0:
            if write and r.readonly:
                raise ReadOnlyMemoryError(addr, length)
            off = addr - r.start
            out.append(r.view[off : off + length])
            return
        self._gather_slow(addr, length, out, write, None)

    def translate(self, addr: int, length: int, write: bool = False) -> list[memoryview]:
        """Views covering guest [addr, addr+length), as a scatter-gather list."""
        out: list[memoryview] = []
        self.gather(addr, length, out, write)
        return out

    def contiguous(self, addr: int, length: int, write: bool = False) -> memoryview:
        """One view of a range that must not cross a region edge (a ring)."""
        views = self.translate(addr, length, write)
        if len(views) != 1:
            for v in views:
                v.release()
            if not views:
                return memoryview(b"")
            raise NotContiguousError(addr, length)
        return views[0]

    def pin(self, addr: int, length: int, write: bool = False) -> Pin:
        """Pin guest [addr, addr+length): its mapping outlives a removal until released."""
        views: list[memoryview] = []
        regions: list[MemoryRegion] = []
        self._gather_slow(addr, length, views, write, regions)
        return Pin(addr, length, views, regions)

    def host_window(self, addr: int, write: bool = False) -> tuple[int, int, int]:
        """(start, end, host_address - start) of the region holding guest `addr`:
        for a caller translating a batch of addresses to host ones (io_uring
        takes addresses, not views) with one lookup while they stay in it. Good
        only until the map next changes: use it within one call, never keep it.
        With `write`, a read-only region raises ReadOnlyMemoryError."""
        r = self.find_region(addr)
        if write and r.readonly:
            raise ReadOnlyMemoryError(addr, 1)
        return r.start, r.end, r.host_address - r.start

    def stamp(self, host_addresses: list[int], offset: int, data: bytes) -> None:
        """Write `data` at `offset` into each buffer named by this process's
        address of its start (what host_window gave): a header field of each
        frame a batched read put in guest memory. Each must lie in a published,
        writable region (AddressNotMappedError, ReadOnlyMemoryError)."""
        n = len(data)
        lo = hi = 0
        view = None
        for a in host_addresses:
            at = a + offset
            if not (lo <= at and at + n <= hi):
                for r in self._table.regions:
                    base = r.host_address
                    if base <= at and at + n <= base + r.size:
                        break
                else:
                    raise AddressNotMappedError(at, n)
                if r.readonly:
                    raise ReadOnlyMemoryError(r.start + at - base, n)
                lo, hi, view = base, base + r.size, r.view
            view[at - lo : at - lo + n] = data

    def host_address(self, addr: int, length: int) -> int:
        """This process's virtual address of guest [addr, addr+length), which must
        sit in one region: what a kernel datapath is told (it reads our mapping)."""
        region = self.find_region(addr)
        if addr + length > region.end:
            raise NotContiguousError(addr, length)
        return region.host_address + (addr - region.start)

    def frontend_to_guest(self, addr: int, length: int = 1) -> GuestAddress:
        """Guest address of frontend (VMM-virtual) address `addr`.

        The whole of [addr, addr+length) must sit in one region's frontend range.
        A linear scan: this runs when rings are configured, not per packet, and
        frontend ranges may overlap (aliases share one host mapping), which a
        bisect over starts would not handle.
        """
        end = FrontendAddress(addr).checked_end(length)
        for r in self._table.regions:
            fstart = int(r.spec.frontend_addr)
            if fstart <= addr and end <= fstart + r.spec.size:
                return GuestAddress(r.start + (addr - fstart))
        raise AddressNotMappedError(addr, length)

    # --- typed accessors: copies, for control paths and tests -----------------

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(self.translate(addr, length))

    def write(self, addr: int, data: bytes | memoryview) -> None:
        pos = 0
        for v in self.translate(addr, len(data), write=True):
            n = len(v)
            v[:] = data[pos : pos + n]
            pos += n

    def read_u16(self, addr: int) -> int:
        return _U16.unpack(self.read(addr, 2))[0]

    def read_u32(self, addr: int) -> int:
        return _U32.unpack(self.read(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        return _U64.unpack(self.read(addr, 8))[0]

    def write_u16(self, addr: int, value: int) -> None:
        self.write(addr, _U16.pack(value))

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, _U32.pack(value))

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, _U64.pack(value))

    # --- internals --------------------------------------------------------------

    def _gather_slow(
        self,
        addr: int,
        length: int,
        out: list,
        write: bool,
        regions: list[MemoryRegion] | None,
    ) -> None:
        if addr < 0 or length < 0 or addr + length > ADDRESS_LIMIT:
            raise RangeOverflowError(addr, length)
        if length == 0:
            return
        t = self._table
        i = bisect.bisect_right(t.starts, addr) - 1
        pos, end = addr, addr + length
        first = len(out)
        while True:
            if i < 0 or i >= len(t.regions) or not (t.regions[i].start <= pos < t.regions[i].end):
                del out[first:]
                raise AddressNotMappedError(addr, length, pos)
            r = t.regions[i]
            if write and r.readonly:
                del out[first:]
                raise ReadOnlyMemoryError(addr, length)
            stop = min(end, r.end)
            out.append(r.view[pos - r.start : stop - r.start])
            if regions is not None:
                regions.append(r)
            self._last = r
            if stop == end:
                return
            pos = stop
            i += 1  # the next region must start exactly here, or there is a hole

    def _check_new(self, specs: list[RegionSpec], replacing: bool = False) -> None:
        existing = () if replacing else tuple(r.spec for r in self._table.regions)
        if len(existing) + len(specs) > self.max_regions:
            raise InvalidRegionError(
                f"memory map would hold {len(existing) + len(specs)} regions; "
                f"the limit is {self.max_regions}"
            )
        seen = list(existing)
        for spec in specs:
            for other in seen:
                if spec.overlaps(other):
                    raise InvalidRegionError(
                        f"region {spec.guest_addr!r}+0x{spec.size:x} overlaps "
                        f"{other.guest_addr!r}+0x{other.size:x}"
                    )
            seen.append(spec)

    def _publish(self, regions: Sequence[MemoryRegion]) -> None:
        self._table = _Table(regions)
        self._last = None

    def _notify_added(self, regions: Iterable[MemoryRegion]) -> None:
        for r in regions:
            for listener in list(self._listeners):
                listener.region_added(r)

    def _notify_removed(self, regions: Iterable[MemoryRegion]) -> None:
        for r in regions:
            for listener in list(self._listeners):
                listener.region_removed(r)

    def _notify_committed(self) -> None:
        for listener in list(self._listeners):
            committed = getattr(listener, "map_committed", None)
            if committed is not None:
                committed()

    def __repr__(self) -> str:
        return f"GuestMemory({len(self)} regions)"


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
