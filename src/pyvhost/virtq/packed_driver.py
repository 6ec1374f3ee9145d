"""The driver side of a packed virtqueue: the guest's half, for tests and the
Python front-end, with DriverQueue's interface (add, kick, used, interrupts)
and raw writers for the hostile rings a guest could post.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pyvhost.memory import GuestMemory
from pyvhost.virtq.layout import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    full_fence,
    need_event,
    u16_view,
)
from pyvhost.virtq.packed_layout import (
    EVENT_AREA_SIZE,
    EVENT_FLAGS,
    FLAGS_U16,
    OFF_WRAP,
    PACKED_DESC,
    PACKED_DESC_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    avail_flags,
    is_used,
    is_valid_packed_size,
    pack_position,
)

Buffer = tuple[int, int]


def packed_footprint(size: int) -> int:
    """Bytes `PackedDriverQueue.layout` needs: the ring, then the two event areas."""
    return PACKED_DESC_SIZE * size + 2 * EVENT_AREA_SIZE


class PackedDriverQueue:
    """The guest's view of one packed queue."""

    packed = True

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        driver_event_addr: int,
        device_event_addr: int,
        *,
        event_idx: bool = False,
        kick_fd: int | None = None,
    ) -> None:
        if not is_valid_packed_size(size):
            raise ValueError(f"packed queue size {size} is not in 1..32768")
        self.memory = memory
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = driver_event_addr  # vhost-user's names for the two areas
        self.used_addr = device_event_addr
        self.event_idx = event_idx
        self.kick_fd = kick_fd
        self._ring = memory.contiguous(desc_addr, PACKED_DESC_SIZE * size, write=True)
        drv = memory.contiguous(driver_event_addr, EVENT_AREA_SIZE, write=True)
        dev = memory.contiguous(device_event_addr, EVENT_AREA_SIZE, write=True)
        for view in (self._ring, drv, dev):
            view[:] = bytes(len(view))
        self._ring16 = u16_view(self._ring)
        self._driver_event = u16_view(drv)
        self._device_event = u16_view(dev)
        self._free_ids = list(range(size - 1, -1, -1))
        self._descs_of: dict[int, int] = {}  # buffer id -> descriptors it holds
        self._outstanding = 0  # descriptors posted and not yet returned
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self._pending: list[tuple[int, int]] = []  # (position, flags) of unpublished heads
        self._kicked_at: tuple[int, int] | None = None

    @classmethod
    def layout(
        cls, memory: GuestMemory, base: int, size: int, **kwargs: object
    ) -> PackedDriverQueue:
        ring = PACKED_DESC_SIZE * size
        return cls(memory, size, base, base + ring, base + ring + EVENT_AREA_SIZE, **kwargs)  # type: ignore[arg-type]

    # --- posting buffers -------------------------------------------------------------

    @property
    def free_descriptors(self) -> int:
        return self.size - self._outstanding

    def add(self, readable: Sequence[Buffer] = (), writable: Sequence[Buffer] = ()) -> int:
        """Post one buffer (a chain of descriptors); returns its id. Publish with kick()."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        if not bufs:
            raise ValueError("a buffer needs at least one descriptor")
        return self._post(bufs)

    def add_indirect(
        self, table_addr: int, readable: Sequence[Buffer] = (), writable: Sequence[Buffer] = ()
    ) -> int:
        """Post one buffer as an indirect table written at `table_addr`."""
        bufs = [(a, n, 0) for a, n in readable] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in writable]
        table = b"".join(PACKED_DESC.pack(a, n, 0, f) for a, n, f in bufs)
        self.memory.write(table_addr, table)
        return self._post([(table_addr, len(table), VIRTQ_DESC_F_INDIRECT)])

    def _post(self, bufs: list[tuple[int, int, int]]) -> int:
        if len(bufs) > self.free_descriptors or not self._free_ids:
            raise ValueError(f"{len(bufs)} descriptors wanted, {self.free_descriptors} free")
        buf_id = self._free_ids.pop()
        pos, wrap = self.next_avail, self.avail_wrap
        head = None
        for i, (addr, length, flags) in enumerate(bufs):
            flags |= VIRTQ_DESC_F_NEXT if i < len(bufs) - 1 else 0
            flags |= avail_flags(wrap)
            if head is None:
                # The head keeps its old flags (not available in this lap) until
                # publish() writes them, last, so the device sees the chain whole.
                head = (pos, flags)
                old = self._ring16[pos * 8 + FLAGS_U16]
                PACKED_DESC.pack_into(self._ring, pos * 16, addr, length, buf_id, old)
            else:
                PACKED_DESC.pack_into(self._ring, pos * 16, addr, length, buf_id, flags)
            pos += 1
            if pos == self.size:
                pos, wrap = 0, wrap ^ 1
        self._pending.append(head)
        self.next_avail, self.avail_wrap = pos, wrap
        self._descs_of[buf_id] = len(bufs)
        self._outstanding += len(bufs)
        return buf_id

    def publish(self) -> None:
        """Make every posted buffer visible: write their heads' flags, in order."""
        for pos, flags in self._pending:
            self._ring16[pos * 8 + FLAGS_U16] = flags
        self._pending.clear()

    def needs_kick(self) -> bool:
        full_fence()
        new = (self.next_avail, self.avail_wrap)
        old, self._kicked_at = self._kicked_at, new
        flags = self._device_event[EVENT_FLAGS]
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx or old is None:
            return True
        if old == new:
            return False
        new_idx, old_idx = new[0], old[0]
        if new_idx <= old_idx:
            old_idx -= self.size
        off_wrap = self._device_event[OFF_WRAP]
        off = off_wrap & 0x7FFF
        if (off_wrap >> 15) != self.avail_wrap:
            off -= self.size
        return need_event(off & 0xFFFF, new_idx & 0xFFFF, old_idx & 0xFFFF)

    def kick(self) -> bool:
        self.publish()
        if self.needs_kick():
            if self.kick_fd is not None:
                os.eventfd_write(self.kick_fd, 1)
            return True
        return False

    # --- collecting used buffers -------------------------------------------------------

    def used(self) -> list[tuple[int, int]]:
        """(id, written) for every buffer the device returned since the last call."""
        out = []
        while True:
            pos = self.next_used
            if not is_used(self._ring16[pos * 8 + FLAGS_U16], self.used_wrap):
                return out
            _, written, buf_id, _ = PACKED_DESC.unpack_from(self._ring, pos * 16)
            count = self._descs_of.pop(buf_id)
            self._free_ids.append(buf_id)
            self._outstanding -= count
            out.append((buf_id, written))
            pos += count
            if pos >= self.size:
                pos -= self.size
                self.used_wrap ^= 1
            self.next_used = pos

    def enable_interrupts(self) -> bool:
        if self.event_idx:
            self._driver_event[OFF_WRAP] = pack_position(self.next_used, self.used_wrap)
            self._driver_event[EVENT_FLAGS] = RING_EVENT_FLAGS_DESC
        else:
            self._driver_event[EVENT_FLAGS] = RING_EVENT_FLAGS_ENABLE
        full_fence()
        return is_used(self._ring16[self.next_used * 8 + FLAGS_U16], self.used_wrap)

    def suppress_interrupts(self, suppress: bool) -> None:
        self._driver_event[EVENT_FLAGS] = (
            RING_EVENT_FLAGS_DISABLE if suppress else RING_EVENT_FLAGS_ENABLE
        )

    def set_used_event(self, position: int, wrap: int | None = None) -> None:
        """With EVENT_IDX: interrupt me once the device's used position passes this."""
        wrap = self.used_wrap if wrap is None else wrap
        self._driver_event[OFF_WRAP] = pack_position(position, wrap)
        self._driver_event[EVENT_FLAGS] = RING_EVENT_FLAGS_DESC

    # --- raw writers, for building hostile rings ------------------------------------------

    def write_desc(self, pos: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        PACKED_DESC.pack_into(self._ring, pos * 16, addr, length, buf_id, flags)
