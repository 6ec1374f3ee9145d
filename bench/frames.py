"""Frames the benchmarks send: a 64 KiB TCP/IPv4 GSO frame and its virtio-net header."""

from __future__ import annotations

import struct

GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("020000000001")
PAYLOAD = 64000


def tcp4_frame(payload_len: int, src: bytes, dst: bytes) -> bytes:
    payload = bytes(i % 251 for i in range(payload_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + payload_len
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]))  # fmt: skip
    s = sum(int.from_bytes(ip[i : i + 2], "big") for i in range(0, 20, 2))
    s = (s & 0xFFFF) + (s >> 16)
    ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
    return dst + src + b"\x08\x00" + ip + tcp + payload


def gso_header(size: int) -> bytes:
    """NEEDS_CSUM over TCP, TSO4 segments of 1448 bytes (virtio_net_hdr)."""
    return struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)[:size]


def gso_frame_and_header(hdr_size: int, to_host: bool) -> tuple[bytes, bytes]:
    src, dst = (GUEST_MAC, HOST_MAC) if to_host else (HOST_MAC, GUEST_MAC)
    return tcp4_frame(PAYLOAD, src, dst), gso_header(hdr_size)
