"""An ACL hook: drop TCP and UDP traffic to listed ports, pass everything else.

    pyvhost switch ... --hook vm1=examples.acl:hook
    PYVHOST_ACL="tcp:5201,udp:53"      # what to drop (default: tcp:5201, iperf3's port)

Attach it to a port and frames that port sends or receives are checked:
IPv4 and IPv6, TCP or UDP, by destination port. ARP, ICMP and the rest
pass untouched, so a guest behind it still pings.
"""

from __future__ import annotations

import os

from pyvhost.hooks import DROP

PROTOCOLS = {"tcp": 6, "udp": 17}


def _rules(text: str) -> set[tuple[int, int]]:
    rules = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        proto, _, port = item.partition(":")
        rules.add((PROTOCOLS[proto.lower()], int(port)))
    return rules


DENY = _rules(os.environ.get("PYVHOST_ACL", "tcp:5201"))


def l4(frame: memoryview) -> tuple[int, int] | None:
    """(IP protocol, destination port) of a TCP or UDP frame, else None."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == 0x0800 and len(frame) >= 34:
        proto = frame[23]
        offset = 14 + (frame[14] & 0x0F) * 4
    elif ethertype == 0x86DD and len(frame) >= 58:
        proto = frame[20]
        offset = 54  # no extension headers: enough for an example
    else:
        return None
    if proto not in (6, 17) or len(frame) < offset + 4:
        return None
    return proto, int.from_bytes(frame[offset + 2 : offset + 4], "big")


def hook(frame: memoryview, ctx) -> object:
    flow = l4(frame)
    return DROP if flow in DENY else None
