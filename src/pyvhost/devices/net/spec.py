"""virtio-net wire facts (virtio 1.x section 5.1, linux/virtio_net.h)."""

from __future__ import annotations

import struct
from typing import NamedTuple

# Feature bits.
F_CSUM = 0
F_GUEST_CSUM = 1
F_CTRL_GUEST_OFFLOADS = 2
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23

FEATURE_NAMES = {
    F_CSUM: "CSUM",
    F_GUEST_CSUM: "GUEST_CSUM",
    F_CTRL_GUEST_OFFLOADS: "CTRL_GUEST_OFFLOADS",
    F_MTU: "MTU",
    F_MAC: "MAC",
    F_GUEST_TSO4: "GUEST_TSO4",
    F_GUEST_TSO6: "GUEST_TSO6",
    F_GUEST_ECN: "GUEST_ECN",
    F_GUEST_UFO: "GUEST_UFO",
    F_HOST_TSO4: "HOST_TSO4",
    F_HOST_TSO6: "HOST_TSO6",
    F_HOST_ECN: "HOST_ECN",
    F_HOST_UFO: "HOST_UFO",
    F_MRG_RXBUF: "MRG_RXBUF",
    F_STATUS: "STATUS",
    F_CTRL_VQ: "CTRL_VQ",
    F_CTRL_RX: "CTRL_RX",
    F_CTRL_VLAN: "CTRL_VLAN",
    F_GUEST_ANNOUNCE: "GUEST_ANNOUNCE",
    F_MQ: "MQ",
    F_CTRL_MAC_ADDR: "CTRL_MAC_ADDR",
    24: "NOTIFY_ON_EMPTY",
    28: "RING_INDIRECT_DESC",
    29: "RING_EVENT_IDX",
    32: "VERSION_1",
    33: "ACCESS_PLATFORM",
    34: "RING_PACKED",
    40: "RING_RESET",
}


def feature_names(bits: int) -> str:
    """'MRG_RXBUF|RING_PACKED' for a mask (unknown bits by number)."""
    names = []
    n = 0
    while bits >> n:
        if bits >> n & 1:
            names.append(FEATURE_NAMES.get(n, f"bit {n}"))
        n += 1
    return "|".join(names) or "none"


# Config space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
CONFIG = struct.Struct("<6sHHH")
S_LINK_UP = 1
S_ANNOUNCE = 2

# The header in front of every packet.
HDR = struct.Struct(
    "<BBHHHHH"
)  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
HDR_SIZE = HDR.size  # 12: VERSION_1 or MRG_RXBUF
HDR_SIZE_LEGACY = 10  # without num_buffers
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

# Control queue.
CTRL_RX = 0
CTRL_RX_PROMISC = 0
CTRL_RX_ALLMULTI = 1
CTRL_MAC = 1
CTRL_MAC_TABLE_SET = 0
CTRL_MAC_ADDR_SET = 1
CTRL_ANNOUNCE = 3
CTRL_ANNOUNCE_ACK = 0
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
CTRL_GUEST_OFFLOADS = 5
CTRL_GUEST_OFFLOADS_SET = 0
CTRL_OK = 0
CTRL_ERR = 1


def header_size(features: int) -> int:
    """Bytes of virtio-net header with these features acked."""
    if features & (1 << 32 | 1 << F_MRG_RXBUF):
        return HDR_SIZE
    return HDR_SIZE_LEGACY


def rx_queue(pair: int) -> int:
    return 2 * pair


def tx_queue(pair: int) -> int:
    return 2 * pair + 1


# The first 10 bytes of every virtio-net header: num_buffers (when there is
# one) is the receiving ring's business.
HDR10 = struct.Struct("<BBHHHH")


class VnetHeader(NamedTuple):
    """The fields of a virtio-net header a frame carries through the switch.

    A tuple, not a dataclass: one is made per frame, and a NamedTuple is five
    times cheaper to make than a frozen dataclass."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> VnetHeader:
        return cls._make(HDR10.unpack_from(data))

    def pack(self, size: int) -> bytes:
        """The header as a ring of header size `size` (10 or 12) takes it."""
        return HDR10.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        ).ljust(size, b"\0")

    @property
    def gso(self) -> int:
        return self.gso_type & ~GSO_ECN

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & HDR_F_NEEDS_CSUM)

    def shifted(self, delta: int) -> VnetHeader:
        """The same header for the frame with `delta` bytes inserted after the MACs."""
        if self.needs_csum:
            return VnetHeader(
                self.flags,
                self.gso_type,
                self.hdr_len + delta if self.hdr_len else 0,
                self.gso_size,
                self.csum_start + delta,
                self.csum_offset,
            )
        if self.hdr_len:
            return VnetHeader(self.flags, self.gso_type, self.hdr_len + delta, self.gso_size, 0, 0)
        return self
