"""The device side of a packed virtqueue, behind SplitQueue's interface.

pop(), push_used(), the notification calls and the memory-map listener mean
what they mean for SplitQueue, so a device serves either ring without
knowing which. What differs is underneath (packed_layout): one descriptor
ring, read and written in place, positions with wrap counters, and a chain's
descriptors consecutive in the ring. A chain is known by its buffer id (the
`head` of DescriptorChain), which the driver writes into the chain's last
descriptor; returning it writes one used descriptor at the device's next
used position and moves that position past as many descriptors as the chain
took.

The guest may be hostile, as for the split ring: a buffer id past the queue
size or already in flight, a chain that runs into a descriptor the driver
has not made available in this lap (a wrong wrap counter), a chain longer
than the ring, an indirect table that is empty, mis-sized, too long or
chained, a buffer outside guest memory: each breaks this queue alone, with
the reason, and pop() returns None from then on.
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Callable

from pyvhost.errors import (
    BufferIdError,
    ChainLengthError,
    ChainTooLongError,
    DescriptorMemoryError,
    DescriptorOrderError,
    GuestMemoryError,
    IndirectDescriptorError,
    IotlbMiss,
    QueueConfigError,
    QueueError,
    WrapCounterError,
)
from pyvhost.memory import GuestMemory, Pin
from pyvhost.virtq.layout import (
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_ENTRIES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    full_fence,
    need_event,
    u16_view,
)
from pyvhost.virtq.mapping import RingMapping, check_alignment
from pyvhost.virtq.packed_layout import (
    EVENT_AREA_ALIGN,
    EVENT_AREA_SIZE,
    EVENT_FLAGS,
    FLAGS_U16,
    OFF_WRAP,
    PACKED_DESC,
    PACKED_DESC_ALIGN,
    PACKED_DESC_SIZE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    is_valid_packed_size,
    pack_position,
    unpack_position,
    vring_base,
)
from pyvhost.virtq.split import DescriptorChain

log = logging.getLogger(__name__)

_unpack_desc = PACKED_DESC.unpack_from
_pack_len_id = struct.Struct("<IH").pack_into  # a used descriptor's len and id
_BOTH = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED


class PackedQueue(RingMapping):
    """Device side of one packed virtqueue in guest memory (or behind an IOMMU)."""

    packed = True
    restarted_blind = False  # started afresh on a ring already in use (see below)

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        driver_event_addr: int,
        device_event_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        base: int | None = None,
        name: str = "vq",
        log_used: int | None = None,
    ) -> None:
        """`base`: the 32-bit position to start from (SET_VRING_BASE's, see
        packed_layout); None: both positions 0 with wrap counters 1.
        `log_used`: while logging, used-descriptor writes are logged as if the
        ring were at this guest address; None: at its own."""
        if not is_valid_packed_size(size):
            raise QueueConfigError(f"{name}: packed queue size {size} is not in 1..32768")
        check_alignment(name, (
            ("descriptor ring", desc_addr, PACKED_DESC_ALIGN),
            ("driver event area", driver_event_addr, EVENT_AREA_ALIGN),
            ("device event area", device_event_addr, EVENT_AREA_ALIGN),
        ))  # fmt: skip
        self.name = name
        self.size = size
        self.desc_addr = desc_addr
        self.driver_event_addr = driver_event_addr
        self.device_event_addr = device_event_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.broken: QueueError | None = None
        self.on_broken: Callable[[QueueError], None] | None = None  # see RingMapping
        self._memory = memory
        self._pins: list[Pin] = []
        self._ring: memoryview | None = None  # the descriptor ring, bytes
        self._ring16: memoryview | None = None  # ... and as u16
        self._driver_event: memoryview | None = None  # u16 view
        self._device_event: memoryview | None = None  # u16 view
        if base is None:
            base = vring_base(0, 1, 0, 1)
        self._next_avail, self._avail_wrap = unpack_position(base & 0xFFFF)
        if base >> 16:
            self._next_used, self._used_wrap = unpack_position(base >> 16)
        else:
            # A 16-bit base (DPDK's virtio_user sends one; DPDK's and older
            # kernels' back-ends read only that): the used position is the
            # avail one, as in those back-ends.
            self._next_used, self._used_wrap = self._next_avail, self._avail_wrap
        for what, pos in (("avail", self._next_avail), ("used", self._next_used)):
            if pos >= size:
                raise QueueConfigError(
                    f"{name}: base 0x{base:08x}: {what} position {pos} is past a ring of {size}"
                )
        self._in_flight: dict[int, int] = {}  # buffer id -> descriptors it took
        # (position, wrap, id) of recent pops, newest last: unpop() gives them
        # back in reverse order (a device may return several unused chains).
        self._pops: deque[tuple[int, int, int]] = deque(maxlen=size)
        self._signalled: tuple[int, int] | None = None  # used position at the last decision
        self._kicks_wanted = True
        self.log_used = desc_addr if log_used is None else log_used
        self._writable_ranges: dict[int, list[tuple[int, int]]] = {}
        self._map_rings()
        memory.add_listener(self)
        if self._ring16 is not None and (self._next_avail, self._avail_wrap) == (0, 1):
            self._warn_if_used_before()

    def _warn_if_used_before(self) -> None:
        """A ring told to start afresh whose first slot already holds a used
        descriptor was in use: its front-end lost its position. QEMU does that
        to packed rings after a back-end crash (it cannot ask where they were),
        and such a ring cannot resume; say so rather than sit silent."""
        if self._ring16[FLAGS_U16] & _BOTH == _BOTH:
            self.restarted_blind = True
            log.warning(
                "%s: started at position 0, but the ring was in use: the front-end lost "
                "its position (QEMU restarts packed rings blind after a back-end crash); "
                "it will not resume until the guest resets the device",
                self.name,
            )

    # --- state the vhost-user layer reads and sets ------------------------------

    @property
    def vring_base(self) -> int:
        """Where to go on from: GET_VRING_BASE's 32-bit value."""
        return vring_base(self._next_avail, self._avail_wrap, self._next_used, self._used_wrap)

    @property
    def next_avail(self) -> int:
        return pack_position(self._next_avail, self._avail_wrap)

    @property
    def next_used(self) -> int:
        return pack_position(self._next_used, self._used_wrap)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def ready(self) -> bool:
        return self.broken is None and self._ring is not None

    def close(self) -> None:
        self._unmap_rings()
        try:
            self._memory.remove_listener(self)
        except ValueError:
            pass

    # --- consuming available chains ------------------------------------------------

    def _available(self, pos: int, wrap: int) -> bool:
        flags = self._ring16[pos * 8 + FLAGS_U16] & _BOTH
        return flags == (VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None (empty, broken, or rings unmapped)."""
        if self._ring is None or self.broken is not None or self.stalled is not None:
            return None
        pos, wrap = self._next_avail, self._avail_wrap
        if not self._available(pos, wrap):
            if not (self._kicks_wanted and self.event_idx and self._rearm()):
                return None
        try:
            return self._walk(pos, wrap)
        except IotlbMiss as e:
            self._stall(e)  # nothing consumed: taken again once translated
        except QueueError as e:
            self._break(e)
        except GuestMemoryError as e:
            self._break(DescriptorMemoryError(f"chain at position {pos}: {e}"))
        return None

    def _rearm(self) -> bool:
        """Empty ring, kicks wanted: ask for a kick at the next position, look again."""
        self._set_device_event(
            pack_position(self._next_avail, self._avail_wrap), RING_EVENT_FLAGS_DESC
        )
        full_fence()
        return self._available(self._next_avail, self._avail_wrap)

    def _walk(self, start: int, wrap: int) -> DescriptorChain:
        size = self.size
        ring = self._ring
        gather = self._memory.gather
        logging_ = self._memory.log is not None
        ranges: list[tuple[int, int]] = []
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        pos = start
        count = 0
        want = VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED
        while True:
            addr, length, buf_id, flags = _unpack_desc(ring, pos * PACKED_DESC_SIZE)
            if count and flags & _BOTH != want:
                raise WrapCounterError(
                    f"chain at position {start}: descriptor {pos} is not available in this "
                    f"lap (wrap counter {wrap})"
                )
            count += 1
            if count > size:
                raise ChainTooLongError(
                    f"chain at position {start} has more than {size} descriptors"
                )
            pos += 1
            if pos == size:
                pos, wrap = 0, wrap ^ 1
                want ^= _BOTH
            if flags & VIRTQ_DESC_F_INDIRECT:
                if count != 1 or flags & VIRTQ_DESC_F_NEXT:
                    raise IndirectDescriptorError(
                        f"chain at position {start}: an indirect descriptor must be a "
                        "buffer's only one"
                    )
                rlen, wlen = self._indirect(start, addr, length, readable, writable, ranges)
                break
            if flags & VIRTQ_DESC_F_WRITE:
                gather(addr, length, writable, True)
                wlen += length
                if logging_:
                    ranges.append((addr, length))
            else:
                if writable:
                    raise DescriptorOrderError(
                        f"chain at position {start}: a device-readable descriptor after "
                        "a device-writable one"
                    )
                gather(addr, length, readable, False)
                rlen += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
        if buf_id >= size:
            raise BufferIdError(
                f"chain at position {start}: buffer id {buf_id} is past a queue of {size}"
            )
        if buf_id in self._in_flight:
            raise BufferIdError(
                f"chain at position {start}: buffer id {buf_id} is already in flight"
            )
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise ChainLengthError(f"chain at position {start} spans {rlen + wlen} bytes")
        self._pops.append((start, self._avail_wrap, buf_id))
        self._next_avail, self._avail_wrap = pos, wrap
        self._in_flight[buf_id] = count
        if logging_:
            self._writable_ranges[buf_id] = ranges
        return DescriptorChain(buf_id, readable, writable, rlen, wlen)

    def _indirect(self, start, addr, length, readable, writable, ranges) -> tuple[int, int]:
        if not self.indirect:
            raise IndirectDescriptorError(
                f"chain at position {start} uses an indirect table, but INDIRECT_DESC "
                "was not negotiated"
            )
        if length == 0 or length % PACKED_DESC_SIZE:
            raise IndirectDescriptorError(
                f"chain at position {start}: indirect table length {length} is not a "
                "non-zero multiple of 16"
            )
        entries = length // PACKED_DESC_SIZE
        if entries > MAX_INDIRECT_ENTRIES:
            raise IndirectDescriptorError(
                f"chain at position {start}: indirect table of {entries} entries "
                f"(at most {MAX_INDIRECT_ENTRIES})"
            )
        views = self._memory.translate(addr, length)
        table = views[0] if len(views) == 1 else b"".join(views)
        gather = self._memory.gather
        logging_ = self._memory.log is not None
        rlen = wlen = 0
        for i in range(entries):
            a, n, _, flags = _unpack_desc(table, i * PACKED_DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise IndirectDescriptorError(f"chain at position {start} nests an indirect table")
            if flags & VIRTQ_DESC_F_WRITE:
                gather(a, n, writable, True)
                wlen += n
                if logging_:
                    ranges.append((a, n))
            else:
                if writable:
                    raise DescriptorOrderError(
                        f"chain at position {start}: indirect entry {i} is device-readable "
                        "after a device-writable one"
                    )
                gather(a, n, readable, False)
                rlen += n
        return rlen, wlen

    def unpop(self) -> None:
        """Give back the last popped chain (not yet pushed): the next pop returns
        it. Repeated, it gives back the ones before it, newest first."""
        if not self._pops:
            return
        pos, wrap, buf_id = self._pops.pop()
        if buf_id not in self._in_flight:
            return  # already returned: nothing to give back
        self._next_avail, self._avail_wrap = pos, wrap
        self._in_flight.pop(buf_id, None)
        dirty = self._memory.log
        for addr, length in self._writable_ranges.pop(buf_id, ()):
            if dirty is not None:
                dirty.mark(addr, length)

    def pop_batch(self, limit: int) -> list[DescriptorChain]:
        out: list[DescriptorChain] = []
        pop = self.pop
        while len(out) < limit:
            chain = pop()
            if chain is None:
                break
            out.append(chain)
        return out

    # --- returning used chains -----------------------------------------------------

    def push_used(self, head: int, written: int) -> None:
        """Return buffer `head` (its id) with `written` bytes, published at once."""
        self.push_used_batch([(head, written)])

    def push_used_batch(self, completions: list[tuple[int, int]]) -> None:
        """Return several buffers. The first one's flags are written last, so the
        driver sees the batch whole (as the spec recommends)."""
        ring16 = self._ring16
        ring = self._ring
        if ring16 is None or not completions:
            return
        size = self.size
        pos, wrap = self._next_used, self._used_wrap
        first_slot = first_flags = None
        logging_ = self._memory.log is not None
        for buf_id, written in completions:
            count = self._in_flight.pop(buf_id, None)
            if count is None:
                raise BufferIdError(f"{self.name}: buffer id {buf_id} is not in flight")
            _pack_len_id(ring, pos * PACKED_DESC_SIZE + 8, written, buf_id)
            flags = _BOTH if wrap else 0
            if first_slot is None:
                first_slot, first_flags = pos, flags
            else:
                ring16[pos * 8 + FLAGS_U16] = flags
            if logging_:
                self._log_completion(buf_id, written, pos)
            pos += count
            if pos >= size:
                pos -= size
                wrap ^= 1
        self._next_used, self._used_wrap = pos, wrap
        ring16[first_slot * 8 + FLAGS_U16] = first_flags
        if logging_:
            self._memory.log.signal()

    # --- the dirty log (live migration) ------------------------------------------------

    def _log_completion(self, buf_id: int, written: int, slot: int) -> None:
        dirty = self._memory.log
        left = written
        for addr, length in self._writable_ranges.pop(buf_id, ()) or ():
            if left <= 0:
                break
            n = min(length, left)
            dirty.mark(addr, n)
            left -= n
        dirty.mark(self.log_used + slot * PACKED_DESC_SIZE, PACKED_DESC_SIZE)

    def log_changed(self) -> None:
        self._writable_ranges.clear()

    def _set_device_event(self, off_wrap: int | None, flags: int) -> None:
        """Write the device event area (off_wrap first, if given, then flags):
        guest memory the device writes, so logged while logging."""
        ev = self._device_event
        if off_wrap is not None:
            ev[OFF_WRAP] = off_wrap
        ev[EVENT_FLAGS] = flags
        dirty = self._memory.log
        if dirty is not None:
            dirty.mark(self.device_event_addr, EVENT_AREA_SIZE)

    # --- notifications ---------------------------------------------------------------

    def needs_notification(self) -> bool:
        """Should the driver be signalled for what was returned since the last check?"""
        ev = self._driver_event
        if ev is None:
            return False
        new = (self._next_used, self._used_wrap)
        old = self._signalled
        self._signalled = new
        full_fence()  # our used descriptors must land before we read the driver's wish
        flags = ev[EVENT_FLAGS]
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx or old is None:
            return True
        if old == new:
            return False
        # Linux's and DPDK's arithmetic: positions made comparable across a wrap.
        size = self.size
        new_idx, old_idx = new[0], old[0]
        if new_idx <= old_idx:
            old_idx -= size
        off_wrap = ev[OFF_WRAP]
        off = off_wrap & 0x7FFF
        if (off_wrap >> 15) != self._used_wrap:
            off -= size
        return need_event(off & 0xFFFF, new_idx & 0xFFFF, old_idx & 0xFFFF)

    def disable_notification(self) -> None:
        self._kicks_wanted = False
        if self._device_event is not None:
            self._set_device_event(None, RING_EVENT_FLAGS_DISABLE)

    def enable_notification(self) -> bool:
        """Ask for kicks again. True if buffers arrived meanwhile: poll once more."""
        ev = self._device_event
        self._kicks_wanted = True
        if ev is None or self._ring is None or self.broken is not None or self.stalled is not None:
            return False
        if self.event_idx:
            self._set_device_event(
                pack_position(self._next_avail, self._avail_wrap), RING_EVENT_FLAGS_DESC
            )
        else:
            self._set_device_event(None, RING_EVENT_FLAGS_ENABLE)
        full_fence()
        return self._available(self._next_avail, self._avail_wrap)

    def enable_notification_for_more(self) -> bool:
        """Ask for a kick when the driver makes more descriptors available than
        it has now. True if more arrived meanwhile."""
        self._kicks_wanted = True
        if self._device_event is None or self._ring is None or self.broken is not None:
            return False
        if self.stalled is not None:
            return False
        end = self._available_end()
        # Kick me at every descriptor made available: the next one is past the
        # ones there, which may be anywhere in the lap.
        self._set_device_event(None, RING_EVENT_FLAGS_ENABLE)
        full_fence()
        return self._available_end() != end

    def _available_end(self) -> int:
        """How many descriptors from next_avail on the driver has made available."""
        pos, wrap, n = self._next_avail, self._avail_wrap, 0
        while n < self.size and self._available(pos, wrap):
            n += 1
            pos += 1
            if pos == self.size:
                pos, wrap = 0, wrap ^ 1
        return n

    # --- the memory map under the rings -------------------------------------------

    def _rings_mapped(self) -> bool:
        return self._ring is not None

    def _ring_ranges(self) -> list[tuple[int, int]]:
        return [
            (self.desc_addr, PACKED_DESC_SIZE * self.size),
            (self.driver_event_addr, EVENT_AREA_SIZE),
            (self.device_event_addr, EVENT_AREA_SIZE),
        ]

    def _map_rings(self) -> None:
        pins = self._pin_rings(
            self._memory,
            (
                ("descriptor ring", self.desc_addr, PACKED_DESC_SIZE * self.size, True),
                ("driver event area", self.driver_event_addr, EVENT_AREA_SIZE, False),
                ("device event area", self.device_event_addr, EVENT_AREA_SIZE, True),
            ),
        )
        if pins is None:
            return
        self._pins = pins
        self._ring = pins[0].views[0]
        self._ring16 = u16_view(self._ring)
        self._driver_event = u16_view(pins[1].views[0])
        self._device_event = u16_view(pins[2].views[0])

    def _unmap_rings(self) -> None:
        for view in (self._ring16, self._driver_event, self._device_event):
            if view is not None:
                view.release()
        self._ring = self._ring16 = self._driver_event = self._device_event = None
        pins, self._pins = self._pins, []
        for p in pins:
            p.release()

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else ("ready" if self.ready else "idle")
        return f"PackedQueue({self.name}, size={self.size}, {state})"
