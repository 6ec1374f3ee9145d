"""memfd-backed guest RAM for tests, benchmarks and the Python frontend."""

from __future__ import annotations

import os


def memfd(size: int, name: str = "pyvhost-guest-ram") -> int:
    """A new memfd of `size` bytes (zero-filled). The caller owns the fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fds_named(name: str) -> list[int]:
    """This process's open fds that refer to memfd `name` (leak checks)."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue
        if target.startswith(f"/memfd:{name} "):
            found.append(int(entry))
    return found


def mappings_named(name: str) -> list[str]:
    """Lines of /proc/self/maps for memfd `name` (mapping leak checks)."""
    with open("/proc/self/maps") as f:
        return [line for line in f if f"/memfd:{name} " in line]


def open_fds(pid: int | str = "self") -> set[int]:
    """The fds open in a process (for leak checks)."""
    entries = {int(x) for x in os.listdir(f"/proc/{pid}/fd")}
    if pid != "self":
        return entries
    # listdir's own directory fd is in the list but closed by now.
    live = set()
    for fd in entries:
        try:
            os.fstat(fd)
            live.add(fd)
        except OSError:
            pass
    return live
