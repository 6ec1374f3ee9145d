"""The split ring's wire layout (virtio 1.x, section 2.7), shared by both sides.

    descriptor table  size x {addr u64, len u32, flags u16, next u16}    align 16
    avail ring        flags u16, idx u16, ring[size] u16, used_event u16  align 2
    used ring         flags u16, idx u16, ring[size] {id u32, len u32},
                      avail_event u16                                     align 4

All fields are little-endian.
"""

from __future__ import annotations

import struct
import sys
import threading

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("pyvhost's rings use native 16-bit accesses and need a little-endian host")

# Feature bits (virtio 1.x section 6).
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33  # the device sees I/O virtual addresses (an IOMMU)

# Descriptor flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

# Ring flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # driver to device: do not interrupt me
VIRTQ_USED_F_NO_NOTIFY = 1  # device to driver: do not kick me

MAX_QUEUE_SIZE = 32768  # split queue sizes are powers of two up to 2**15

DESC_SIZE = 16
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

# Byte offsets inside the rings.
RING_FLAGS = 0
RING_IDX = 2
RING_ENTRIES = 4

# A chain's bytes are reported back in a u32 (used element len).
MAX_CHAIN_BYTES = 0xFFFF_FFFF
# `next` is a u16, so no indirect table can usefully have more entries.
MAX_INDIRECT_ENTRIES = 65536


def u16_view(ring: memoryview) -> memoryview:
    """A ring as an array of u16, for its index, flags and event fields.

    These fields are read and written by the other side concurrently, so each
    access must be one aligned 16-bit load or store. struct's "<H" moves the
    two bytes one at a time (a peer can see a torn index: DPDK did, reading
    0x100 between 0x1ff and 0x200, and took 65k phantom used entries);
    memoryview item access copies the item with a fixed-size memcpy, which
    compiles to a single move. Native order is little-endian (checked above).
    """
    return ring.cast("H")


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    return RING_ENTRIES + 2 * size + 2  # + used_event


def used_ring_size(size: int) -> int:
    return RING_ENTRIES + 8 * size + 2  # + avail_event


def used_event_offset(size: int) -> int:
    """Offset of used_event in the avail ring."""
    return RING_ENTRIES + 2 * size


def avail_event_offset(size: int) -> int:
    """Offset of avail_event in the used ring."""
    return RING_ENTRIES + 8 * size


def is_valid_queue_size(size: int) -> bool:
    return 0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Linux's vring_need_event: did [old, new) cross the other side's event index?"""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


_fence_lock = threading.Lock()


def full_fence() -> None:
    """A store-load barrier between our ring write and our next ring read.

    x86 keeps loads in order and stores in order, but lets a load pass an
    earlier store still sitting in the store buffer: exactly the
    "publish used.idx, then read used_event" (and "write avail_event, then
    re-read avail.idx") pairs where a missed wakeup would stall a queue.
    Python has no fence primitive; an uncontended Lock round trip is a
    locked read-modify-write in the C library, which x86 orders as a full
    barrier, for about 60 ns.
    """
    _fence_lock.acquire()
    _fence_lock.release()
