"""Giving up Linux capabilities once the TAP is open.

A service manager may start pyvhost as an unprivileged user that holds only
CAP_NET_ADMIN (systemd's AmbientCapabilities=), enough to create the TAP.
Nothing after that needs it: the TAP's fd and the vhost-net fds are open, and
a TAP without an owner lets its fd holder attach and detach queues. So the
capabilities go, for good, before the first front-end is served.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from pyvhost.errors import PyvhostError

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def held() -> dict[str, int]:
    """This process's capability sets, from /proc/self/status (CapEff, CapPrm, ...)."""
    sets = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Cap"):
                name, value = line.split(":")
                sets[name] = int(value, 16)
    return sets


def drop_all() -> bool:
    """Clear the effective, permitted, inheritable and ambient sets; True if any
    capability was held. Root keeps its uid: this is for the non-root case."""
    before = held()
    if not any(before.get(k, 0) for k in ("CapEff", "CapPrm", "CapInh", "CapAmb")):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PyvhostError(f"giving up capabilities (capset): {os.strerror(err)}")
    after = held()
    if any(after.get(k, 0) for k in ("CapEff", "CapPrm", "CapAmb")):
        raise PyvhostError("capabilities remain after capset; refusing to run")
    return True
