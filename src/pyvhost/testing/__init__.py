"""Reusable pieces for playing the guest: shared RAM and the driver half of queues.

with GuestRam(1 << 20) as ram:
    driver, device = queue_pair(ram, 256)
    buf = ram.alloc(1500)
    driver.add(readable=[(buf, 64)])
    driver.kick()
    chain = device.pop()
"""

from __future__ import annotations

import os

from pyvhost.memory import GuestAddress, GuestMemory, RegionSpec
from pyvhost.testing.memfd import memfd
from pyvhost.virtq import DriverQueue, SplitQueue, ring_footprint

__all__ = ["DriverQueue", "GuestRam", "memfd", "queue_pair"]


class GuestRam:
    """memfd-backed guest RAM at `guest_base`, with a bump allocator.

    `memory` is the driver's (guest's) mapping. `map_again()` gives another,
    independent GuestMemory over the same file: what a vhost-user backend
    gets when the VMM shares the fd.
    """

    def __init__(
        self,
        size: int = 1 << 22,
        guest_base: int = 0,
        name: str = "pyvhost-guest-ram",
        memory: GuestMemory | None = None,
    ) -> None:
        """RAM of `size` at `guest_base`; added to `memory` (a DIMM) if given."""
        self.size = size
        self.guest_base = guest_base
        self.fd = memfd(size, name)
        self._owns_memory = memory is None
        self.memory = GuestMemory() if memory is None else memory
        self.memory.add_region(self.spec(), os.dup(self.fd))
        self._next = guest_base
        self._others: list[GuestMemory] = []

    def spec(self, frontend_addr: int = 0) -> RegionSpec:
        return RegionSpec(GuestAddress(self.guest_base), self.size, frontend_addr=frontend_addr)

    def alloc(self, length: int, align: int = 16) -> int:
        """Guest address of `length` fresh bytes (never freed; tests are short)."""
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + length > self.guest_base + self.size:
            raise MemoryError(f"guest RAM of {self.size} bytes is full")
        self._next = addr + length
        return addr

    def map_again(self) -> GuestMemory:
        mem = GuestMemory()
        mem.add_region(self.spec(), os.dup(self.fd))
        self._others.append(mem)
        return mem

    def close(self) -> None:
        for mem in self._others:
            mem.clear()
        self._others.clear()
        if self._owns_memory:
            self.memory.clear()
        elif any(r.start == self.guest_base for r in self.memory.regions):
            self.memory.remove_region(self.guest_base)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def queue_pair(
    ram: GuestRam,
    size: int = 256,
    *,
    event_idx: bool = False,
    indirect: bool = False,
    device_memory: GuestMemory | None = None,
) -> tuple[DriverQueue, SplitQueue]:
    """A driver queue laid out in `ram`, and the device queue serving it.

    The device side maps the RAM separately (as a backend would) unless
    `device_memory` is given.
    """
    base = ram.alloc(ring_footprint(size), align=4096)
    driver = DriverQueue.layout(ram.memory, base, size, event_idx=event_idx)
    device = SplitQueue(
        device_memory if device_memory is not None else ram.map_again(),
        size,
        driver.desc_addr,
        driver.avail_addr,
        driver.used_addr,
        event_idx=event_idx,
        indirect=indirect,
    )
    return driver, device


def packed_queue_pair(
    ram: GuestRam,
    size: int = 256,
    *,
    event_idx: bool = False,
    indirect: bool = False,
    device_memory: GuestMemory | None = None,
):
    """A packed driver queue laid out in `ram`, and the device queue serving it."""
    from pyvhost.virtq.packed import PackedQueue
    from pyvhost.virtq.packed_driver import PackedDriverQueue, packed_footprint

    base = ram.alloc(packed_footprint(size), align=4096)
    driver = PackedDriverQueue.layout(ram.memory, base, size, event_idx=event_idx)
    device = PackedQueue(
        device_memory if device_memory is not None else ram.map_again(),
        size,
        driver.desc_addr,
        driver.avail_addr,
        driver.used_addr,
        event_idx=event_idx,
        indirect=indirect,
    )
    return driver, device
