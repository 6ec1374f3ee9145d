"""The driver side of a split virtqueue: the guest's half of the ring.

Tests, benchmarks and the Python vhost-user frontend use it to play the
guest: lay the rings out in (memfd-backed) memory, post buffers, kick, and
collect used buffers. It also has raw writers for building the malformed
rings a hostile guest could post.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pyvhost.memory import GuestMemory
from pyvhost.virtq.layout import (
    AVAIL_ALIGN,
    DESC,
    DESC_ALIGN,
    RING_ENTRIES,
    RING_FLAGS,
    RING_IDX,
    USED_ALIGN,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    full_fence,
    is_valid_queue_size,
    need_event,
    u16_view,
    used_event_offset,
)

Buffer = tuple[int, int]  # (guest address, length)


def _align(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def ring_footprint(size: int) -> int:
    """Bytes needed to lay out a queue of `size` with `DriverQueue.layout`."""
    avail = desc_table_size(size)
    used = _align(avail + avail_ring_size(size), USED_ALIGN)
    return used + RING_ENTRIES + 8 * size + 2


class DriverQueue:
    """The guest's view of one split queue."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        kick_fd: int | None = None,
    ) -> None:
        if not is_valid_queue_size(size):
            raise ValueError(f"queue size {size} is not a power of two <= 32768")
        self.memory = memory
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.kick_fd = kick_fd
        self._desc = memory.contiguous(desc_addr, desc_table_size(size), write=True)
        self._avail = memory.contiguous(avail_addr, avail_ring_size(size), write=True)
        self._used = memory.contiguous(used_addr, RING_ENTRIES + 8 * size + 2, write=True)
        self._desc[:] = bytes(len(self._desc))
        self._avail[:] = bytes(len(self._avail))
        self._used[:] = bytes(len(self._used))
        # Index, flags and event fields: single 16-bit accesses (layout.u16_view).
        self._avail16 = u16_view(self._avail)
        self._used16 = u16_view(self._used)
        self._free = list(range(size - 1, -1, -1))  # a stack of free descriptor indices
        self._chains: dict[int, list[int]] = {}  # head -> descriptor indices it holds
        self.avail_idx = 0  # next avail slot to fill (published or not)
        self._published = 0  # avail.idx as last written to the ring
        self._kicked_at = 0  # avail.idx at the last kick decision
        self.last_used = 0  # next used element to read

    @classmethod
    def layout(cls, memory: GuestMemory, base: int, size: int, **kwargs: object) -> DriverQueue:
        """Lay the three rings out back to back from `base` (16-aligned)."""
        if base % DESC_ALIGN:
            raise ValueError(f"ring base 0x{base:x} is not {DESC_ALIGN}-aligned")
        avail = base + desc_table_size(size)
        used = _align(avail + avail_ring_size(size), USED_ALIGN)
        assert avail % AVAIL_ALIGN == 0
        return cls(memory, size, base, avail, used, **kwargs)  # type: ignore[arg-type]

    # --- posting buffers -------------------------------------------------------------

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def add(self, readable: Sequence[Buffer] = (), writable: Sequence[Buffer] = ()) -> int:
        """Post one chain of direct descriptors; returns its head. Publish with kick()."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if len(bufs) > len(self._free):
            raise ValueError(f"{len(bufs)} descriptors wanted, {len(self._free)} free")
        idxs = [self._free.pop() for _ in bufs]
        for i, (addr, length, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            nxt = 0 if last else idxs[i + 1]
            self.write_desc(idxs[i], addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), nxt)
        return self._make_available(idxs)

    def add_indirect(
        self, table_addr: int, readable: Sequence[Buffer] = (), writable: Sequence[Buffer] = ()
    ) -> int:
        """Post one chain as an indirect table written at `table_addr`."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        table = bytearray()
        for i, (addr, length, flags) in enumerate(bufs):
            last = i == len(bufs) - 1
            table += DESC.pack(
                addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1
            )
        self.memory.write(table_addr, table)
        idx = self._free.pop()
        self.write_desc(idx, table_addr, len(table), VIRTQ_DESC_F_INDIRECT, 0)
        return self._make_available([idx])

    def _make_available(self, idxs: list[int]) -> int:
        head = idxs[0]
        self._chains[head] = idxs
        self.write_avail_slot(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Make every posted chain visible: write avail.idx (after the entries)."""
        self._avail16[RING_IDX // 2] = self.avail_idx
        self._published = self.avail_idx

    def needs_kick(self) -> bool:
        """Does the device want a kick for what was published since the last one?"""
        full_fence()  # avail.idx must be visible before we read the device's wish
        new, old = self._published, self._kicked_at
        self._kicked_at = new
        if self.event_idx:
            avail_event = self._used16[avail_event_offset(self.size) // 2]
            return need_event(avail_event, new, old)
        return not self._used16[RING_FLAGS // 2] & VIRTQ_USED_F_NO_NOTIFY

    def kick(self) -> bool:
        """Publish, then signal the kick eventfd if the device asked for it."""
        self.publish()
        if self.needs_kick():
            if self.kick_fd is not None:
                os.eventfd_write(self.kick_fd, 1)
            return True
        return False

    # --- collecting used buffers -------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self._used16[RING_IDX // 2]

    def used(self) -> list[tuple[int, int]]:
        """(head, written) for every chain the device returned since the last call."""
        out = []
        end = self.used_idx
        while self.last_used != end:
            slot = RING_ENTRIES + 8 * (self.last_used & (self.size - 1))
            head, written = USED_ELEM.unpack_from(self._used, slot)
            for i in self._chains.pop(head, ()):
                self._free.append(i)
            out.append((head, written))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt at the next used buffer, before sleeping on it.

        As Linux's virtqueue_enable_cb: with EVENT_IDX, used_event := the next
        entry we will read; without, clear NO_INTERRUPT. Returns True if used
        buffers are already waiting (read them instead of sleeping).
        """
        if self.event_idx:
            self.set_used_event(self.last_used)
        else:
            self.suppress_interrupts(False)
        full_fence()  # our request must be visible before we re-read used.idx
        return self.used_idx != self.last_used

    def suppress_interrupts(self, suppress: bool) -> None:
        """Without EVENT_IDX: set or clear VRING_AVAIL_F_NO_INTERRUPT."""
        self._avail16[RING_FLAGS // 2] = VIRTQ_AVAIL_F_NO_INTERRUPT if suppress else 0

    def set_used_event(self, idx: int) -> None:
        """With EVENT_IDX: interrupt me once used.idx passes `idx`."""
        self._avail16[used_event_offset(self.size) // 2] = idx & 0xFFFF

    # --- raw writers, for building hostile rings ------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        DESC.pack_into(self._desc, 16 * index, addr, length, flags, next_)

    def write_avail_slot(self, slot: int, head: int) -> None:
        self._avail16[RING_ENTRIES // 2 + (slot & (self.size - 1))] = head

    def set_avail_idx(self, idx: int) -> None:
        self._avail16[RING_IDX // 2] = idx & 0xFFFF
        self._published = idx & 0xFFFF
