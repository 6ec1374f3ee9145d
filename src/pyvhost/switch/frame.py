"""A frame inside the switch: its virtio-net header fields, its bytes, its VLAN.

A frame is carried as the views it came in (guest memory, zero-copy) until
something must change it. VLAN tags are added and removed by slicing views,
not by copying. Offloads are kept end to end: a GSO frame or one whose
checksum is left to the receiver (NEEDS_CSUM) goes as it is to a port that
takes it, and is segmented or checksummed here, in software, for a port
that does not.
"""

from __future__ import annotations

import struct

from pyvhost.devices.net import spec
from pyvhost.devices.net.spec import VnetHeader

ETH_HLEN = 14
VLAN_HLEN = 4
TPID_8021Q = b"\x81\x00"
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD

# What a port takes (TUNSETOFFLOAD's vocabulary, as the device derives it).
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
ALL_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN


class FrameError(ValueError):
    """A frame the switch cannot make sense of (a header that lies)."""


PLAIN = VnetHeader()


class Frame:
    """An untagged Ethernet frame as views, its header, and its VLAN (0: none)."""

    __slots__ = ("header", "views", "vlan", "length")

    def __init__(self, header: VnetHeader, views: list, vlan: int = 0) -> None:
        self.header = header
        self.views = views  # memoryviews (or bytes), in order
        self.vlan = vlan
        self.length = sum(len(v) for v in views) if len(views) != 1 else len(views[0])

    def set_views(self, views: list) -> None:
        self.views = views
        self.length = sum(len(v) for v in views)

    def head(self, n: int) -> bytes:
        """The first n bytes (what classification reads: MACs, ethertype)."""
        first = self.views[0] if self.views else b""
        if len(first) >= n:
            return bytes(first[:n])
        return self.tobytes()[:n]

    def tobytes(self) -> bytes:
        if len(self.views) == 1:
            return bytes(self.views[0])
        return b"".join(self.views)

    @property
    def dst(self) -> bytes:
        return self.head(6)

    @property
    def src(self) -> bytes:
        return self.head(12)[6:12]


def strip_tag(frame: Frame) -> tuple[int, int] | None:
    """If the frame carries an 802.1Q tag: (VLAN ID, priority), and the tag is
    removed from its views (by slicing: nothing is copied)."""
    head = frame.head(ETH_HLEN + VLAN_HLEN)
    if len(head) < ETH_HLEN + VLAN_HLEN or head[12:14] != TPID_8021Q:
        return None
    tci = int.from_bytes(head[14:16], "big")
    frame.set_views(_splice(frame.views, 12, VLAN_HLEN, b""))
    if frame.header is not PLAIN:
        frame.header = frame.header.shifted(-VLAN_HLEN)
    return tci & 0x0FFF, tci >> 13


def add_tag(frame: Frame, vlan: int) -> list:
    """The frame's views with an 802.1Q tag for `vlan` after the MACs (no copy)."""
    return _splice(frame.views, 12, 0, TPID_8021Q + vlan.to_bytes(2, "big"))


def _splice(views: list, at: int, remove: int, insert: bytes) -> list:
    """Views with `remove` bytes at offset `at` replaced by `insert`, by slicing."""
    total = sum(len(v) for v in views)
    middle = [insert] if insert else []
    return _slice(views, 0, at) + middle + _slice(views, at + remove, total)


def _slice(views: list, start: int, stop: int) -> list:
    """Bytes [start, stop) of the views' concatenation, as slices of them."""
    out = []
    pos = 0
    for v in views:
        end = pos + len(v)
        lo, hi = max(start, pos), min(stop, end)
        if lo < hi:
            out.append(v if (lo, hi) == (pos, end) else v[lo - pos : hi - pos])
        pos = end
    return out


# --- offloads done in software, for ports that do not take them ----------------------


def ones_complement_sum(data: bytes, start: int = 0) -> int:
    """The 16-bit ones' complement sum of `data` (big-endian words) plus `start`.

    Summed as native little-endian words and byte-swapped once at the end:
    the ones' complement sum does not care about the order, and a memoryview
    sum is many times faster than unpacking.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    total = ((total & 0xFF) << 8 | total >> 8) + start
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def complete_checksum(frame: bytes, header: VnetHeader) -> bytes:
    """A NEEDS_CSUM frame with its checksum written (the field holds the
    pseudo-header sum; the checksum covers from csum_start to the end)."""
    start, offset = header.csum_start, header.csum_offset
    if start + offset + 2 > len(frame):
        raise FrameError(f"checksum at {start}+{offset} is past the frame's {len(frame)} bytes")
    csum = ~ones_complement_sum(frame[start:]) & 0xFFFF
    if csum == 0 and offset == 6:  # UDP: 0 means "no checksum"
        csum = 0xFFFF
    return frame[: start + offset] + csum.to_bytes(2, "big") + frame[start + offset + 2 :]


def segment(frame: bytes, header: VnetHeader) -> list[bytes]:
    """A TCP GSO frame (TSO4/TSO6) cut into MSS-sized segments, each with its
    IP length, IP ID, TCP sequence, flags and both checksums made right."""
    gso = header.gso
    if gso not in (spec.GSO_TCPV4, spec.GSO_TCPV6):
        raise FrameError(f"GSO type {header.gso_type} cannot be segmented here (TCP only)")
    ip_off = ETH_HLEN
    if frame[12:14] == TPID_8021Q:
        ip_off += VLAN_HLEN
    if gso == spec.GSO_TCPV4:
        ihl = (frame[ip_off] & 0x0F) * 4
        tcp_off = ip_off + ihl
    else:
        tcp_off = ip_off + 40  # no extension headers in GSO frames from a guest
    if tcp_off + 20 > len(frame):
        raise FrameError("GSO frame shorter than its headers")
    doff = (frame[tcp_off + 12] >> 4) * 4
    payload_off = tcp_off + doff
    mss = header.gso_size
    if mss <= 0:
        raise FrameError("GSO frame with gso_size 0")
    headers = bytearray(frame[:payload_off])
    payload = frame[payload_off:]
    seq = int.from_bytes(headers[tcp_off + 4 : tcp_off + 8], "big")
    flags = headers[tcp_off + 13]
    ip_id = int.from_bytes(headers[ip_off + 4 : ip_off + 6], "big") if gso == spec.GSO_TCPV4 else 0
    out = []
    chunks = range(0, max(len(payload), 1), mss)
    for n, pos in enumerate(chunks):
        data = payload[pos : pos + mss]
        h = bytearray(headers)
        last = n == len(chunks) - 1
        h[tcp_off + 4 : tcp_off + 8] = ((seq + pos) & 0xFFFFFFFF).to_bytes(4, "big")
        # FIN and PSH only on the last segment; CWR only on the first.
        f = flags if last else flags & ~0x09
        if n:
            f &= ~0x80
        h[tcp_off + 13] = f
        h[tcp_off + 16 : tcp_off + 18] = b"\0\0"
        tcp_len = len(h) - tcp_off + len(data)
        if gso == spec.GSO_TCPV4:
            total = len(h) - ip_off + len(data)
            h[ip_off + 2 : ip_off + 4] = total.to_bytes(2, "big")
            h[ip_off + 4 : ip_off + 6] = ((ip_id + n) & 0xFFFF).to_bytes(2, "big")
            h[ip_off + 10 : ip_off + 12] = b"\0\0"
            ip_sum = ~ones_complement_sum(bytes(h[ip_off:tcp_off])) & 0xFFFF
            h[ip_off + 10 : ip_off + 12] = ip_sum.to_bytes(2, "big")
            pseudo = bytes(h[ip_off + 12 : ip_off + 20]) + struct.pack("!BBH", 0, 6, tcp_len)
        else:
            h[ip_off + 4 : ip_off + 6] = (len(h) - ip_off - 40 + len(data)).to_bytes(2, "big")
            pseudo = bytes(h[ip_off + 8 : ip_off + 40]) + struct.pack("!IxxxB", tcp_len, 6)
        seg = bytes(h) + data
        csum = ~ones_complement_sum(seg[tcp_off:], ones_complement_sum(pseudo)) & 0xFFFF
        out.append(seg[: tcp_off + 16] + csum.to_bytes(2, "big") + seg[tcp_off + 18 :])
    return out


def accepts(offloads: int, header: VnetHeader) -> bool:
    """Can a port that took `offloads` (TUN_F_*) receive this frame as it is?"""
    if header.gso != spec.GSO_NONE:
        need = {spec.GSO_TCPV4: TUN_F_TSO4, spec.GSO_TCPV6: TUN_F_TSO6}.get(header.gso, 0)
        if not need or not offloads & need:
            return False
        if header.gso_type & spec.GSO_ECN and not offloads & TUN_F_TSO_ECN:
            return False
    return not header.needs_csum or bool(offloads & TUN_F_CSUM)


def adapt(frame: Frame, offloads: int) -> list[Frame]:
    """The frame as a port that took `offloads` can receive it: itself, or its
    segments, or itself with the checksum done (copies only in the last two)."""
    if accepts(offloads, frame.header):
        return [frame]
    data = frame.tobytes()
    if frame.header.gso != spec.GSO_NONE:
        return [Frame(PLAIN, [seg], frame.vlan) for seg in segment(data, frame.header)]
    return [Frame(PLAIN, [complete_checksum(data, frame.header)], frame.vlan)]
