"""The virtio-net control queue: commands from the driver, one ack byte back.

Each chain is: class u8, command u8, command data (device-readable), then
one device-writable ack byte (VIRTIO_NET_OK or VIRTIO_NET_ERR).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from pyvhost.devices.net import spec
from pyvhost.virtq import DescriptorChain

log = logging.getLogger(__name__)


@dataclass
class RxMode:
    promisc: bool = True  # a TAP delivers what the host sends it: promiscuous in effect
    allmulti: bool = True
    mac_table: list[bytes] = field(default_factory=list)


class CommandError(Exception):
    """A control command refused with VIRTIO_NET_ERR, and why."""


def parse_chain(chain: DescriptorChain) -> tuple[int, int, bytes]:
    """(class, command, data) of a control chain; CommandError if malformed."""
    if chain.writable_len < 1:
        raise CommandError("no writable ack byte")
    data = b"".join(chain.readable)
    if len(data) < 2:
        raise CommandError(f"command header is {len(data)} bytes")
    return data[0], data[1], data[2:]


def parse_mac_table(data: bytes) -> list[bytes]:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET: two tables (unicast, multicast) of u32 count + MACs."""
    macs = []
    pos = 0
    for _ in range(2):
        if len(data) < pos + 4:
            raise CommandError("MAC table truncated")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if len(data) < pos + 6 * n:
            raise CommandError(f"MAC table claims {n} entries, has room for fewer")
        macs += [data[pos + 6 * i : pos + 6 * i + 6] for i in range(n)]
        pos += 6 * n
    if pos != len(data):
        raise CommandError("trailing bytes after the MAC tables")
    return macs


def ack(chain: DescriptorChain, status: int) -> int:
    """Write the ack byte (the last writable byte); returns bytes written."""
    last = chain.writable[-1]
    last[len(last) - 1] = status
    return 1


def log_refusal(cls: int, cmd: int, reason: str) -> None:
    log.warning("control command class %d cmd %d refused: %s", cls, cmd, reason)


# Re-exported for the device.
OK, ERR = spec.CTRL_OK, spec.CTRL_ERR
