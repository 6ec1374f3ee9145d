"""A device's own address space behind a virtual IOMMU (VIRTIO_F_ACCESS_PLATFORM).

The seed thread's last open point: Brook and Tosatti wanted per-device
mappings, since a device need not see guest-physical memory directly. With
ACCESS_PLATFORM the device sees I/O virtual addresses (IOVAs): in its rings'
addresses and in every descriptor. The VMM's vIOMMU says what each IOVA
range maps to, and with what permission, through IOTLB messages: an update
(IOVA, size, front-end virtual address, read/write), an invalidation (IOVA,
size). The device asks for a missing translation with a miss message.

    IOVA --(this IOTLB)--> front-end address --(memory table)--> guest address
         --(GuestMemory)--> this process's mapping

`IommuAddressSpace` has the access side of GuestMemory's interface (gather,
translate, contiguous, pin, read, write, log, listeners), so a virtqueue
serves a device behind an IOMMU without knowing it. The differences a queue
does see: a miss raises IotlbMiss (the queue stalls, asks, and is retried
when an update arrives: nothing is dropped), and an entry that forbids the
access raises IotlbAccessError (a guest-memory error: the queue breaks).

The IOTLB keeps guest addresses, resolved from the front-end address at
update time: a memory-table change that removes the region under an entry
drops the entry (the front-end sends new ones).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from pyvhost.errors import (
    AddressNotMappedError,
    GuestMemoryError,
    IotlbAccessError,
    IotlbMiss,
    NotContiguousError,
)
from pyvhost.memory.alias import PAGE, AliasMapping
from pyvhost.memory.guest_memory import GuestMemory, Pin
from pyvhost.memory.region import MemoryRegion

IOTLB_READ = 1  # vhost's VHOST_ACCESS_RO
IOTLB_WRITE = 2  # VHOST_ACCESS_WO
IOTLB_RW = 3

MAX_ENTRIES = 65536  # a front-end cannot grow the table without bound


@dataclass(frozen=True)
class IotlbEntry:
    iova: int
    size: int
    guest_addr: int
    perm: int

    @property
    def end(self) -> int:
        return self.iova + self.size


class IommuAddressSpace:
    """I/O virtual addresses for one device, translated through an IOTLB."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._starts: list[int] = []
        self._entries: list[IotlbEntry] = []
        self._listeners: list = []
        self.on_miss: Callable[[int, int], None] | None = None  # (iova, perm): ask the VMM
        self.misses = 0
        self.updates = 0
        self.invalidations = 0
        memory.add_listener(self)

    # --- the IOTLB, as the front-end fills it ---------------------------------------

    @property
    def entries(self) -> tuple[IotlbEntry, ...]:
        return tuple(self._entries)

    def update(self, iova: int, size: int, frontend_addr: int, perm: int) -> None:
        """IOTLB update: [iova, iova+size) maps to front-end address `frontend_addr`.
        Raises GuestMemoryError if that is not in the memory table."""
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise AddressNotMappedError(iova, max(size, 1))
        if perm & ~IOTLB_RW or not perm:
            raise IotlbAccessError(f"IOTLB update at 0x{iova:x}: permission {perm} is not 1-3")
        guest = int(self.memory.frontend_to_guest(frontend_addr, size))
        self._remove(iova, size)
        if len(self._entries) >= MAX_ENTRIES:
            raise IotlbAccessError(f"IOTLB full ({MAX_ENTRIES} entries); invalidate first")
        i = bisect.bisect_left(self._starts, iova)
        self._starts.insert(i, iova)
        self._entries.insert(i, IotlbEntry(iova, size, guest, perm))
        self.updates += 1
        for listener in list(self._listeners):
            listener.iotlb_updated(iova, size)

    def invalidate(self, iova: int, size: int) -> None:
        """IOTLB invalidation: forget [iova, iova+size) (parts of entries are trimmed)."""
        if size <= 0:
            return
        self._remove(iova, size)
        self.invalidations += 1
        for listener in list(self._listeners):
            listener.iotlb_invalidated(iova, size)

    def stats(self) -> dict:
        return {
            "entries": len(self._entries),
            "misses": self.misses,
            "updates": self.updates,
            "invalidations": self.invalidations,
        }

    def clear(self) -> None:
        self._starts.clear()
        self._entries.clear()

    def _remove(self, iova: int, size: int) -> None:
        end = iova + size
        keep: list[IotlbEntry] = []
        for e in self._entries:
            if e.end <= iova or e.iova >= end:
                keep.append(e)
                continue
            if e.iova < iova:  # the part before
                keep.append(IotlbEntry(e.iova, iova - e.iova, e.guest_addr, e.perm))
            if e.end > end:  # the part after
                keep.append(IotlbEntry(end, e.end - end, e.guest_addr + (end - e.iova), e.perm))
        keep.sort(key=lambda e: e.iova)
        self._entries = keep
        self._starts = [e.iova for e in keep]

    # --- translation ---------------------------------------------------------------

    def _find(self, iova: int) -> IotlbEntry | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            e = self._entries[i]
            if iova < e.end:
                return e
        return None

    def to_guest(
        self, iova: int, length: int, write: bool = False, *, check: bool = True
    ) -> list[tuple[int, int]]:
        """The guest ranges (address, length) under [iova, iova+length). A miss is
        reported (on_miss) and raised; with `check` False (the dirty log's use)
        neither a miss is reported nor a permission checked."""
        want = IOTLB_WRITE if write else IOTLB_READ
        out: list[tuple[int, int]] = []
        pos, left = iova, length
        while left > 0:
            e = self._find(pos)
            if e is None:
                if check:
                    self.misses += 1
                    if self.on_miss is not None:
                        self.on_miss(pos, want)
                raise IotlbMiss(pos, want)
            if check and not e.perm & want:
                raise IotlbAccessError(
                    f"I/O virtual address 0x{pos:x}: its IOTLB entry allows "
                    f"{'read' if e.perm == IOTLB_READ else 'write'} only, not "
                    f"{'write' if write else 'read'}"
                )
            n = min(left, e.end - pos)
            out.append((e.guest_addr + (pos - e.iova), n))
            pos += n
            left -= n
        return out

    def gather(self, addr: int, length: int, out: list, write: bool = False) -> None:
        if length == 0:
            self.memory.gather(self.to_guest(addr, 1, write)[0][0], 0, out, write)
            return
        for gpa, n in self.to_guest(addr, length, write):
            self.memory.gather(gpa, n, out, write)

    def translate(self, addr: int, length: int, write: bool = False) -> list[memoryview]:
        out: list[memoryview] = []
        self.gather(addr, length, out, write)
        return out

    def contiguous(self, addr: int, length: int, write: bool = False) -> memoryview:
        views = self.translate(addr, length, write)
        if len(views) != 1:
            for v in views:
                v.release()
            raise NotContiguousError(addr, length)
        return views[0]

    def pin(self, addr: int, length: int, write: bool = False) -> Pin:
        """Pin the guest memory under [addr, addr+length) (a ring) as one view:
        the guest's own mapping where the range is contiguous in guest memory,
        else an alias mapping of its pages in IOVA order."""
        ranges = self.to_guest(addr, length, write)
        if all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False)):
            return self.memory.pin(ranges[0][0], length, write)
        return self._alias_pin(addr, length, ranges, write)

    def _alias_pin(self, addr: int, length: int, ranges, write: bool) -> Pin:
        pages: list[tuple[int, int]] = []
        regions: list[MemoryRegion] = []
        for gpa, n in ranges:
            region = self.memory.find_region(gpa)
            if gpa + n > region.end:
                raise NotContiguousError(addr, length)
            if write and region.readonly:
                raise IotlbAccessError(f"ring at I/O virtual address 0x{addr:x}: read-only memory")
            first = gpa & ~(PAGE - 1)
            last = (gpa + n + PAGE - 1) & ~(PAGE - 1)
            if (pages and first != gpa) or (len(pages) < len(ranges) - 1 and last != gpa + n):
                raise NotContiguousError(addr, length)  # only whole pages can be stitched
            host = region.host_address + (first - region.start)
            pages.append((host, (last - first) // PAGE))
            regions.append(region)
        alias = AliasMapping(pages, ranges[0][0] & (PAGE - 1), length)
        return _AliasPin(addr, length, alias, regions)

    def read(self, addr: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.translate(addr, length))

    def write(self, addr: int, data: bytes | memoryview) -> None:
        off = 0
        for v in self.translate(addr, len(data), write=True):
            v[:] = data[off : off + len(v)]
            off += len(v)

    # --- the dirty log speaks guest addresses ---------------------------------------

    @property
    def log(self):
        log = self.memory.log
        return None if log is None else _IovaLog(self, log)

    # --- listeners: the queues over this address space --------------------------------

    def add_listener(self, listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener) -> None:
        self._listeners.remove(listener)

    def region_added(self, region: MemoryRegion) -> None:
        for listener in list(self._listeners):
            listener.region_added(region)

    def region_removed(self, region: MemoryRegion) -> None:
        # Entries into the removed region are gone with it.
        stale = [e for e in self._entries if region.start <= e.guest_addr < region.end]
        for e in stale:
            self._remove(e.iova, e.size)
        for listener in list(self._listeners):
            listener.region_removed(region)

    def close(self) -> None:
        try:
            self.memory.remove_listener(self)
        except ValueError:
            pass
        self.clear()


class _AliasPin(Pin):
    """A Pin whose one view is an alias mapping, unmapped when released."""

    __slots__ = ("_alias",)

    def __init__(self, addr: int, length: int, alias: AliasMapping, regions) -> None:
        super().__init__(addr, length, [alias.view], regions)
        self._alias = alias

    def release(self) -> None:
        super().release()  # the view first: nothing may point into the alias
        if self._alias is not None:
            self._alias.close()
            self._alias = None


class _IovaLog:
    """The dirty log seen through the IOTLB: IOVA ranges marked as guest pages."""

    def __init__(self, space: IommuAddressSpace, log) -> None:
        self._space = space
        self._log = log

    def mark(self, addr: int, length: int) -> None:
        try:
            ranges = self._space.to_guest(addr, length, check=False)
        except (IotlbMiss, GuestMemoryError):
            # Written through a translation that is gone: log what the entry
            # was is no longer known; log nothing rather than a wrong page.
            return
        for gpa, n in ranges:
            self._log.mark(gpa, n)

    def signal(self) -> None:
        self._log.signal()
