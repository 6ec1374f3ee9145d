"""Watch a TAP's link state (admin up/down, carrier) through netlink.

The watcher's socket lives in the namespace the TAP is in; when the TAP is
moved to another one (its old namespace sees it deleted), the watcher opens
a new socket there. `changed()` reads what came and says whether the link
went up or down since the last look.
"""

from __future__ import annotations

import logging
import struct

from pyvhost.backends.tap import Tap

log = logging.getLogger(__name__)

_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")
RTM_NEWLINK, RTM_DELLINK = 16, 17


def link_messages(data: bytes) -> list[tuple[int, int]]:
    """(message type, interface index) of each link message in a netlink read."""
    out = []
    pos = 0
    while pos + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size:
            break
        if kind in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSG.size + _IFINFO.size:
            _, _, index, _, _ = _IFINFO.unpack_from(data, pos + _NLMSG.size)
            out.append((kind, index))
        pos += (length + 3) & ~3
    return out


class LinkWatcher:
    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.up = tap.link_up()
        self._open()

    def _open(self) -> None:
        self.sock = self.tap.link_events()
        self.index = self.tap.ifindex()

    def fileno(self) -> int:
        return self.sock.fileno()

    def changed(self) -> bool:
        """Read the pending link messages; True if the TAP's state changed."""
        moved = False
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:  # ENOBUFS: events were lost; look at the state
                log.debug("link events: %s", e)
                break
            for kind, index in link_messages(data):
                if index == self.index and kind == RTM_DELLINK:
                    moved = True  # gone from this namespace: moved, or being closed
        if moved:
            old = self.sock
            try:
                self._open()
            except OSError:
                return False  # the TAP is going away with pyvhost
            old.close()
        try:
            up = self.tap.link_up()
        except OSError:
            return False
        if up == self.up:
            return False
        self.up = up
        return True

    def close(self) -> None:
        self.sock.close()
