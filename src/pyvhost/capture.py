"""Live capture as pcapng: an interface block per port, each frame with its direction.

`PcapngWriter` builds the blocks (pure bytes, no I/O); a `Capture` is one
client's live capture: the datapath calls `record(port, direction, views)`
for each frame on the ports it watches, and the bytes go to the client
through the control socket. Capture costs nothing when none is attached:
the datapath checks one empty list.

Direction is the port's: "in" is a frame the port (the VM, the TAP) sent
into pyvhost, "out" one pyvhost delivered to it (pcapng's epb_flags
inbound and outbound). tcpdump and Wireshark read the result.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_ENDOFOPT, _OPT_IF_NAME, _OPT_EPB_FLAGS, _OPT_SHB_USERAPPL = 0, 2, 2, 4
_INBOUND, _OUTBOUND = 1, 2


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad(value)


def _block(kind: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


class PcapngWriter:
    """pcapng blocks: the section header, an interface per name, packets."""

    def __init__(self) -> None:
        self.interfaces: dict[str, int] = {}

    def section(self, application: str = "pyvhost") -> bytes:
        options = _option(_OPT_SHB_USERAPPL, application.encode()) + _option(_OPT_ENDOFOPT, b"")
        body = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + options
        return _block(_SHB, body)

    def interface(self, name: str) -> tuple[int, bytes]:
        """(its index, the block to write first) for a new interface name."""
        index = len(self.interfaces)
        self.interfaces[name] = index
        options = _option(_OPT_IF_NAME, name.encode()) + _option(_OPT_ENDOFOPT, b"")
        return index, _block(_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN) + options)

    def packet(self, interface: int, inbound: bool, data: bytes, ts_us: int) -> bytes:
        flags = struct.pack("<I", _INBOUND if inbound else _OUTBOUND)
        options = _option(_OPT_EPB_FLAGS, flags) + _option(_OPT_ENDOFOPT, b"")
        captured = data[:SNAPLEN]
        body = (
            struct.pack(
                "<IIIII",
                interface,
                ts_us >> 32,
                ts_us & 0xFFFFFFFF,
                len(captured),
                len(data),
            )
            + _pad(captured)
            + options
        )
        return _block(_EPB, body)


class Capture:
    """One live capture: pcapng bytes to `write` (False when the reader lags)."""

    def __init__(self, write: Callable[[bytes], bool], ports: list[str]) -> None:
        """`ports`: the interfaces, announced at once (libpcap wants an interface
        block right after the section header)."""
        self.write = write
        self.ports = set(ports)
        self.writer = PcapngWriter()
        self.frames = 0
        self.dropped = 0  # frames the reader was too slow for
        self.closed = False
        blocks = self.writer.section()
        for name in ports:
            blocks += self.writer.interface(name)[1]
        write(blocks)

    def watches(self, port: str) -> bool:
        return port in self.ports

    def record(self, port: str, direction: str, views: list) -> None:
        index = self.writer.interfaces.get(port)
        if self.closed or index is None:
            return
        data = b"".join(bytes(v) for v in views)
        if self.write(self.writer.packet(index, direction == "in", data, time.time_ns() // 1000)):
            self.frames += 1
        else:
            self.dropped += 1


def read_pcapng(data: bytes) -> list[tuple[str, str, bytes]]:
    """(interface name, "in" or "out", frame) for each packet of a capture."""
    names: list[str] = []
    out = []
    pos = 0
    while pos + 12 <= len(data):
        kind, length = struct.unpack_from("<II", data, pos)
        body = data[pos + 8 : pos + length - 4]
        if kind == _IDB:
            name = ""
            opt = 8
            while opt + 4 <= len(body):
                code, olen = struct.unpack_from("<HH", body, opt)
                if code == _OPT_ENDOFOPT:
                    break
                if code == _OPT_IF_NAME:
                    name = body[opt + 4 : opt + 4 + olen].decode()
                opt += 4 + olen + (-olen % 4)
            names.append(name)
        elif kind == _EPB:
            iface, _, _, caplen, _ = struct.unpack_from("<IIIII", body)
            frame = body[20 : 20 + caplen]
            opt = 20 + caplen + (-caplen % 4)
            direction = ""
            while opt + 4 <= len(body):
                code, olen = struct.unpack_from("<HH", body, opt)
                if code == _OPT_ENDOFOPT:
                    break
                if code == _OPT_EPB_FLAGS:
                    bits = struct.unpack_from("<I", body, opt + 4)[0] & 3
                    direction = {_INBOUND: "in", _OUTBOUND: "out"}.get(bits, "")
                opt += 4 + olen + (-olen % 4)
            out.append((names[iface], direction, frame))
        pos += length
    return out
