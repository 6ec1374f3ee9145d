"""A header rewriter hook: 1:1 NAT of an IPv4 address, MACs and checksums kept right.

    pyvhost switch ... --hook vm1=examples.rewrite:hook
    PYVHOST_NAT="10.0.2.99=10.0.2.16"     # the address vm1 uses = the one it reaches

On the port it is attached to, frames going in (sent by that VM) to the
virtual address are rewritten to the real one, and frames coming out (the
answers) from the real address are rewritten back, ARP included: vm1 sees
10.0.2.99 answer, while it is really talking to 10.0.2.16. The IP header
checksum and the TCP/UDP checksum (whole, or the partial one a guest leaves
for checksum offload) are updated incrementally (RFC 1624).
"""

from __future__ import annotations

import os
import socket

virtual, _, real = os.environ.get("PYVHOST_NAT", "10.0.2.99=10.0.2.16").partition("=")
VIRTUAL = socket.inet_aton(virtual)
REAL = socket.inet_aton(real)


def _fold(x: int) -> int:
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def _update(csum: int, old: bytes, new: bytes) -> int:
    """RFC 1624: HC' = ~(~HC + ~m + m') over the 16-bit words that changed."""
    total = ~csum & 0xFFFF
    for i in range(0, len(old), 2):
        total += ~int.from_bytes(old[i : i + 2], "big") & 0xFFFF
        total += int.from_bytes(new[i : i + 2], "big")
    return ~_fold(total) & 0xFFFF


def _swap_ip(data: bytearray, at: int, old: bytes, new: bytes) -> None:
    """Replace the address at `at` in an IPv4 frame, fixing both checksums."""
    data[at : at + 4] = new
    ip_csum = int.from_bytes(data[24:26], "big")
    data[24:26] = _update(ip_csum, old, new).to_bytes(2, "big")
    proto = data[23]
    l4 = 14 + (data[14] & 0x0F) * 4
    field = {6: l4 + 16, 17: l4 + 6}.get(proto)
    if field is not None and len(data) >= field + 2:
        csum = int.from_bytes(data[field : field + 2], "big")
        if proto == 17 and csum == 0:
            return  # UDP without a checksum stays without
        data[field : field + 2] = _update(csum, old, new).to_bytes(2, "big")


def hook(frame: memoryview, ctx) -> object:
    ethertype = bytes(frame[12:14])
    if ethertype == b"\x08\x06" and len(frame) >= 42:  # ARP
        data = bytearray(frame)
        if ctx.direction == "in" and data[38:42] == VIRTUAL:
            data[38:42] = REAL  # who has the virtual address? ask for the real one
            return bytes(data)
        if ctx.direction == "out" and data[28:32] == REAL:
            data[28:32] = VIRTUAL  # and the answer is the virtual address's
            return bytes(data)
        return None
    if ethertype != b"\x08\x00" or len(frame) < 34:
        return None
    data = bytearray(frame)
    if ctx.direction == "in" and data[30:34] == VIRTUAL:
        _swap_ip(data, 30, VIRTUAL, REAL)  # destination
        return bytes(data)
    if ctx.direction == "out" and data[26:30] == REAL:
        _swap_ip(data, 26, REAL, VIRTUAL)  # source
        return bytes(data)
    return None
