"""The packed ring's wire layout (virtio 1.1+, section 2.8), shared by both sides.

    descriptor ring         size x {addr u64, len u32, id u16, flags u16}  align 16
    driver event area       {off_wrap u16, flags u16}  written by the driver  align 4
    device event area       {off_wrap u16, flags u16}  written by the device  align 4

One ring carries both directions. The driver makes a descriptor available by
writing its flags with AVAIL equal to its wrap counter and USED the opposite;
the device returns a buffer by writing a descriptor (its id and the bytes
written) with AVAIL and USED both equal to the device's wrap counter. Each
side's wrap counter starts at 1 and flips each time it passes the ring's end.

vhost-user carries a packed ring's position as 32 bits: the next available
index in bits 0-14, the avail wrap counter in bit 15, and the next used
index and used wrap counter the same way in bits 16-31.
"""

from __future__ import annotations

import struct

VIRTIO_F_RING_PACKED = 34

PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags
PACKED_DESC_SIZE = 16
PACKED_DESC_ALIGN = 16
EVENT_AREA_SIZE = 4
EVENT_AREA_ALIGN = 4

VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15

# Event suppression flags.
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2  # notify at off_wrap (needs EVENT_IDX)

MAX_PACKED_QUEUE_SIZE = 32768  # positions are 15 bits; any size up to that

# Indices into a descriptor ring's u16 view, per descriptor.
DESC_U16 = PACKED_DESC_SIZE // 2
ID_U16 = 6
FLAGS_U16 = 7
# ... and into an event area's.
OFF_WRAP = 0
EVENT_FLAGS = 1


def is_valid_packed_size(size: int) -> bool:
    return 0 < size <= MAX_PACKED_QUEUE_SIZE


def is_avail(flags: int, wrap: int) -> bool:
    """Has the driver made this descriptor available in lap `wrap`?"""
    return bool(flags & VRING_PACKED_DESC_F_AVAIL) == bool(wrap) and bool(
        flags & VRING_PACKED_DESC_F_USED
    ) != bool(wrap)


def is_used(flags: int, wrap: int) -> bool:
    """Has the device returned this descriptor in lap `wrap`?"""
    return bool(flags & VRING_PACKED_DESC_F_AVAIL) == bool(wrap) and bool(
        flags & VRING_PACKED_DESC_F_USED
    ) == bool(wrap)


def avail_flags(wrap: int) -> int:
    return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED


def used_flags(wrap: int) -> int:
    return VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED if wrap else 0


def pack_position(index: int, wrap: int) -> int:
    return (index & 0x7FFF) | (bool(wrap) << 15)


def unpack_position(value: int) -> tuple[int, int]:
    return value & 0x7FFF, (value >> 15) & 1


def vring_base(next_avail: int, avail_wrap: int, next_used: int, used_wrap: int) -> int:
    """The 32-bit ring position SET_VRING_BASE and GET_VRING_BASE carry."""
    return pack_position(next_avail, avail_wrap) | pack_position(next_used, used_wrap) << 16
