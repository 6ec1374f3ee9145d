"""Frames for tests and benchmarks: a TCP/IPv4 frame and a GSO virtio-net header."""

from __future__ import annotations

import struct

from pyvhost.devices.net import spec


def tcp4_frame(payload_len: int, src: bytes, dst: bytes) -> bytes:
    """Ethernet + IPv4 (valid header checksum) + TCP with a patterned payload."""
    payload = bytes(i % 251 for i in range(payload_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]))  # fmt: skip
    s = sum(int.from_bytes(ip[i : i + 2], "big") for i in range(0, 20, 2))
    s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
    return dst + src + b"\x08\x00" + ip + tcp + payload


def gso_header(hdr_size: int, num_buffers: int = 0) -> bytes:
    """NEEDS_CSUM over TCP, TSO4 segments of 1448 bytes, cut to the header size in use."""
    return spec.HDR.pack(spec.HDR_F_NEEDS_CSUM, spec.GSO_TCPV4, 54, 1448, 34, 16, num_buffers)[
        :hdr_size
    ]
