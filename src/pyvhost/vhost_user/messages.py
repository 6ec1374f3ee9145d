"""vhost-user wire structures: one class per payload shape, pure pack/unpack.

Each `unpack` checks the exact length before unpacking and raises
MalformedMessageError (never struct.error); `validate`-style checks that need
no state (region counts, overflow, config sizes) happen here too. Whether a
request may arrive now, and what it does, is the back-end's business.

vhost-user fields are in the machine's native byte order (the spec's words),
hence "=" formats: native order, no padding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvhost.errors import MalformedMessageError
from pyvhost.vhost_user.protocol import (
    CONFIG_SPACE_MAX,
    HEADER_SIZE,
    MEM_TABLE_MAX_REGIONS,
    VRING_INDEX_MASK,
    VRING_NOFD_FLAG,
)

_HEADER = struct.Struct("=III")
_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_REGION = struct.Struct("=QQQQ")
_TABLE_HEAD = struct.Struct("=II")
_CONFIG_HEAD = struct.Struct("=III")
_LOG = struct.Struct("=QQ")
_IOTLB = struct.Struct("=QQQBB6x")  # struct vhost_iotlb_msg, padded to 32 bytes

assert _HEADER.size == HEADER_SIZE


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    def pack(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) != HEADER_SIZE:
            raise MalformedMessageError(f"header is {len(data)} bytes, not {HEADER_SIZE}")
        return cls(*_HEADER.unpack(data))


def _exact(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise MalformedMessageError(f"{what} payload is {len(body)} bytes, expected {size}")


@dataclass(frozen=True)
class Empty:
    """No payload."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, body: bytes) -> Empty:
        _exact(body, 0, "empty")
        return cls()


@dataclass(frozen=True)
class U64:
    value: int

    def pack(self) -> bytes:
        return _U64.pack(self.value)

    @classmethod
    def unpack(cls, body: bytes) -> U64:
        _exact(body, _U64.size, "u64")
        return cls(_U64.unpack(body)[0])


@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    def pack(self) -> bytes:
        return _STATE.pack(self.index, self.num)

    @classmethod
    def unpack(cls, body: bytes) -> VringState:
        _exact(body, _STATE.size, "vring state")
        return cls(*_STATE.unpack(body))


@dataclass(frozen=True)
class VringFd:
    """SET_VRING_KICK/CALL/ERR: ring index in bits 0-7, bit 8 means "no fd"."""

    index: int
    no_fd: bool

    def pack(self) -> bytes:
        return _U64.pack(self.index | (VRING_NOFD_FLAG if self.no_fd else 0))

    @classmethod
    def unpack(cls, body: bytes) -> VringFd:
        _exact(body, _U64.size, "vring fd")
        value = _U64.unpack(body)[0]
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_FLAG):
            raise MalformedMessageError(f"vring fd payload 0x{value:x} sets reserved bits")
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_NOFD_FLAG))


@dataclass(frozen=True)
class VringAddr:
    """Ring addresses: frontend (VMM-virtual) addresses unless IOMMU_PLATFORM."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int = 0

    def pack(self) -> bytes:
        return _ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    @classmethod
    def unpack(cls, body: bytes) -> VringAddr:
        _exact(body, _ADDR.size, "vring address")
        return cls(*_ADDR.unpack(body))


@dataclass(frozen=True)
class MemoryRegionDesc:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    SIZE = _REGION.size

    def pack(self) -> bytes:
        return _REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)

    @classmethod
    def unpack_from(cls, body: bytes, offset: int) -> MemoryRegionDesc:
        region = cls(*_REGION.unpack_from(body, offset))
        region.check()
        return region

    def check(self) -> None:
        """Syntax only: non-empty, no 64-bit wrap in any of its three ranges."""
        if self.size == 0:
            raise MalformedMessageError(f"memory region at 0x{self.guest_addr:x} has size 0")
        for what, start in (
            ("guest", self.guest_addr),
            ("user", self.user_addr),
            ("mmap offset", self.mmap_offset),
        ):
            if start + self.size > 1 << 64:
                raise MalformedMessageError(
                    f"memory region {what} range 0x{start:x}+0x{self.size:x} wraps past 2**64"
                )


@dataclass(frozen=True)
class MemoryTable:
    regions: tuple[MemoryRegionDesc, ...]

    def pack(self) -> bytes:
        return _TABLE_HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, body: bytes) -> MemoryTable:
        if len(body) < _TABLE_HEAD.size:
            raise MalformedMessageError(f"memory table payload is only {len(body)} bytes")
        count, _padding = _TABLE_HEAD.unpack_from(body)
        if count > MEM_TABLE_MAX_REGIONS:
            raise MalformedMessageError(
                f"memory table has {count} regions; at most {MEM_TABLE_MAX_REGIONS} fit"
            )
        _exact(body, _TABLE_HEAD.size + count * _REGION.size, f"memory table of {count} regions")
        regions = tuple(
            MemoryRegionDesc.unpack_from(body, _TABLE_HEAD.size + i * _REGION.size)
            for i in range(count)
        )
        ordered = sorted(regions, key=lambda r: r.guest_addr)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.guest_addr + a.size > b.guest_addr:
                raise MalformedMessageError(
                    f"memory regions 0x{a.guest_addr:x}+0x{a.size:x} and "
                    f"0x{b.guest_addr:x}+0x{b.size:x} overlap"
                )
        return cls(regions)


@dataclass(frozen=True)
class SingleRegion:
    """ADD_MEM_REG / REM_MEM_REG: 8 bytes of padding, then one region."""

    region: MemoryRegionDesc

    def pack(self) -> bytes:
        return _U64.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, body: bytes) -> SingleRegion:
        _exact(body, _U64.size + _REGION.size, "single memory region")
        return cls(MemoryRegionDesc.unpack_from(body, _U64.size))


@dataclass(frozen=True)
class LogBase:
    """SET_LOG_BASE with LOG_SHMFD: the log's size and offset in the fd sent along."""

    mmap_size: int
    mmap_offset: int

    def pack(self) -> bytes:
        return _LOG.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, body: bytes) -> LogBase:
        _exact(body, _LOG.size, "log base")
        return cls(*_LOG.unpack(body))


IOTLB_MISS = 1
IOTLB_UPDATE = 2
IOTLB_INVALIDATE = 3
IOTLB_ACCESS_FAIL = 4
IOTLB_BATCH_BEGIN = 5
IOTLB_BATCH_END = 6


@dataclass(frozen=True)
class IotlbMsg:
    """IOTLB_MSG both ways: an I/O virtual address range, the front-end address it
    maps to (updates), the access (1 read, 2 write, 3 both) and the message type."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    def pack(self) -> bytes:
        return _IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    @classmethod
    def unpack(cls, body: bytes) -> IotlbMsg:
        _exact(body, _IOTLB.size, "IOTLB message")
        return cls(*_IOTLB.unpack(body))


@dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: offset, size, flags, then `size` bytes."""

    offset: int
    size: int
    flags: int
    data: bytes

    def pack(self) -> bytes:
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, body: bytes) -> ConfigSpace:
        if len(body) < _CONFIG_HEAD.size:
            raise MalformedMessageError(f"config payload is only {len(body)} bytes")
        offset, size, flags = _CONFIG_HEAD.unpack_from(body)
        if size > CONFIG_SPACE_MAX:
            raise MalformedMessageError(f"config access of {size} bytes; at most 256")
        _exact(body, _CONFIG_HEAD.size + size, f"config access of {size} bytes")
        return cls(offset, size, flags, bytes(body[_CONFIG_HEAD.size :]))


Payload = (
    Empty
    | U64
    | VringState
    | VringFd
    | VringAddr
    | MemoryTable
    | SingleRegion
    | ConfigSpace
    | LogBase
)
