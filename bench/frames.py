"""Frames the benchmarks send: a 64 KiB TCP/IPv4 GSO frame and its virtio-net header."""

from __future__ import annotations

from pyvhost.testing.frames import gso_header, tcp4_frame

GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("020000000001")
PAYLOAD = 64000


def gso_frame_and_header(hdr_size: int, to_host: bool) -> tuple[bytes, bytes]:
    src, dst = (GUEST_MAC, HOST_MAC) if to_host else (HOST_MAC, GUEST_MAC)
    return tcp4_frame(PAYLOAD, src, dst), gso_header(hdr_size)
