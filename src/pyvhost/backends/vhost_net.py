"""The kernel's vhost-net: one instance (fd) serves one queue pair (linux/vhost.h).

VhostNet exposes only the ioctls, as Tap does for the TAP: ownership,
features, the memory table, the two rings' layout, base and eventfds, and
the backend (a TAP queue fd). Which values go in is the device's business
(devices/net/kernel.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Iterable

from pyvhost.errors import OptionError, TapError

VHOST_NET = "/dev/vhost-net"
VHOST_NET_RDEV = os.makedev(10, 238)  # misc device minor of vhost-net
MAX_MEM_REGIONS_PARAM = "/sys/module/vhost/parameters/max_mem_regions"
DEFAULT_MAX_MEM_REGIONS = 64  # the vhost module's default


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | 0xAF << 8 | nr


_W, _R, _RW = 1, 2, 3
VHOST_GET_FEATURES = _ioc(_R, 0x00, 8)
VHOST_SET_FEATURES = _ioc(_W, 0x00, 8)
VHOST_SET_OWNER = _ioc(0, 0x01, 0)
VHOST_RESET_OWNER = _ioc(0, 0x02, 0)
VHOST_SET_MEM_TABLE = _ioc(_W, 0x03, 8)  # struct vhost_memory: its header only
VHOST_SET_LOG_BASE = _ioc(_W, 0x04, 8)
VHOST_SET_LOG_FD = _ioc(_W, 0x07, 4)
VHOST_SET_VRING_NUM = _ioc(_W, 0x10, 8)
VHOST_SET_VRING_ADDR = _ioc(_W, 0x11, 40)
VHOST_SET_VRING_BASE = _ioc(_W, 0x12, 8)
VHOST_GET_VRING_BASE = _ioc(_RW, 0x12, 8)
VHOST_SET_VRING_KICK = _ioc(_W, 0x20, 8)
VHOST_SET_VRING_CALL = _ioc(_W, 0x21, 8)
VHOST_SET_VRING_ERR = _ioc(_W, 0x22, 8)
VHOST_NET_SET_BACKEND = _ioc(_W, 0x30, 8)

# Feature bits only vhost knows (linux/vhost_types.h).
VHOST_F_LOG_ALL = 26
VHOST_NET_F_VIRTIO_NET_HDR = 27  # vhost adds/strips the virtio-net header itself
VHOST_FILE_UNBIND = -1

_STATE = struct.Struct("=II")  # vhost_vring_state: index, num
_FILE = struct.Struct("=Ii")  # vhost_vring_file: index, fd
_ADDR = struct.Struct("=IIQQQQ")  # vhost_vring_addr: index, flags, desc, used, avail, log
_MEM_HEAD = struct.Struct("=II")  # vhost_memory: nregions, padding
_MEM_REGION = struct.Struct("=QQQQ")  # guest_phys_addr, memory_size, userspace_addr, flags

RX, TX = 0, 1  # vhost-net's ring indices within its pair


class VhostNetError(TapError):
    """A vhost-net ioctl failed: says which, and the kernel's reason."""


class VhostUnavailableError(OptionError):
    """vhost=on that cannot be honoured: always an error, never a silent fallback."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"vhost-net requested but could not be initialized: {reason}")


def max_mem_regions() -> int:
    """How many memory regions the kernel's vhost takes (module parameter)."""
    try:
        with open(MAX_MEM_REGIONS_PARAM) as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_MAX_MEM_REGIONS


_SET_OWNER_TRIES = 5


class VhostNet:
    """One vhost-net instance. Owns its fd."""

    def __init__(self, fd: int, origin: str) -> None:
        self.fd = fd
        self.origin = origin  # where the fd came from, for error messages
        self.owned = False  # VHOST_SET_OWNER done and not reset since

    @classmethod
    def open(cls) -> VhostNet:
        try:
            fd = os.open(VHOST_NET, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VhostUnavailableError(
                f"{VHOST_NET}: {e.strerror} (load the vhost_net module, or use vhost=off)"
            ) from e
        return cls(fd, VHOST_NET)

    @classmethod
    def from_fd(cls, fd: int, option: str = "vhostfd") -> VhostNet:
        """Adopt an inherited vhost-net fd (a management process opened it). Takes
        ownership."""
        try:
            st = os.fstat(fd)
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as e:
            raise VhostUnavailableError(f"{option}={fd}: {e.strerror}") from e
        if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == VHOST_NET_RDEV):
            raise VhostUnavailableError(f"{option}={fd} is {target}, not {VHOST_NET}")
        os.set_inheritable(fd, False)
        return cls(fd, f"{option}={fd}")

    def _ioctl(self, what: str, request: int, arg: bytes | int | bytearray = 0) -> bytes | int:
        try:
            return fcntl.ioctl(self.fd, request, arg)
        except OSError as e:
            raise VhostNetError(f"{self.origin}: {what}: {e.strerror}") from e

    # --- the device ------------------------------------------------------------------

    def set_owner(self) -> None:
        """Make this process the owner (the kernel starts its worker thread).

        Linux 6.4 and later create that worker like a thread, which fails while
        a signal is pending; vhost reports any such failure as ENOMEM. It is
        tried again a few times before the error is believed."""
        if self.owned:
            return
        for attempt in range(_SET_OWNER_TRIES):
            try:
                self._ioctl("VHOST_SET_OWNER", VHOST_SET_OWNER)
                break
            except VhostNetError as e:
                if not isinstance(e.__cause__, OSError) or e.__cause__.errno != errno.ENOMEM:
                    raise
                if attempt == _SET_OWNER_TRIES - 1:
                    raise
                time.sleep(0.01)
        self.owned = True

    def reset_owner(self) -> None:
        """Back to a fresh instance: rings, memory table, backends and owner dropped."""
        if not self.owned:
            return  # nothing to drop (the kernel would answer EPERM)
        self.owned = False
        self._ioctl("VHOST_RESET_OWNER", VHOST_RESET_OWNER)

    def get_features(self) -> int:
        return struct.unpack("=Q", self._ioctl("VHOST_GET_FEATURES", VHOST_GET_FEATURES, bytes(8)))[
            0
        ]

    def set_features(self, features: int) -> None:
        self._ioctl("VHOST_SET_FEATURES", VHOST_SET_FEATURES, struct.pack("=Q", features))

    def set_mem_table(self, regions: Iterable[tuple[int, int, int]]) -> None:
        """(guest address, size, our address) per region; replaces the whole table."""
        regions = list(regions)
        table = bytearray(_MEM_HEAD.pack(len(regions), 0))
        for guest, size, host in regions:
            table += _MEM_REGION.pack(guest, size, host, 0)
        # A bytearray, not bytes: fcntl copies bytes into a 1024-byte buffer, too
        # small for a large table; a mutable buffer that size is passed in place.
        self._ioctl(f"VHOST_SET_MEM_TABLE ({len(regions)} regions)", VHOST_SET_MEM_TABLE, table)

    # --- rings ---------------------------------------------------------------------------

    def set_vring_num(self, index: int, num: int) -> None:
        self._ioctl("VHOST_SET_VRING_NUM", VHOST_SET_VRING_NUM, _STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self._ioctl("VHOST_SET_VRING_BASE", VHOST_SET_VRING_BASE, _STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stops the ring (as GET_VRING_BASE does) and returns its next avail index."""
        state = bytearray(_STATE.pack(index, 0))  # the kernel writes num into it
        self._ioctl("VHOST_GET_VRING_BASE", VHOST_GET_VRING_BASE, state)
        return _STATE.unpack(state)[1]

    def set_vring_addr(
        self, index: int, desc: int, used: int, avail: int, log: int | None = None
    ) -> None:
        """Ring addresses in *this process's* address space (the kernel reads our
        mapping of guest memory); `log`: with dirty logging, the used ring's guest
        address, where the kernel logs its used-ring writes."""
        flags = 0 if log is None else 1  # VHOST_VRING_F_LOG
        self._ioctl(
            "VHOST_SET_VRING_ADDR",
            VHOST_SET_VRING_ADDR,
            _ADDR.pack(index, flags, desc, used, avail, log or 0),
        )

    def set_log_base(self, address: int) -> None:
        """The dirty log, at this address of *this process* (our mapping of the
        front-end's log): the kernel sets bits in it as pyvhost does."""
        self._ioctl("VHOST_SET_LOG_BASE", VHOST_SET_LOG_BASE, struct.pack("=Q", address))

    def set_log_fd(self, fd: int | None) -> None:
        """An eventfd the kernel signals after logging writes; None: none."""
        self._ioctl(
            "VHOST_SET_LOG_FD",
            VHOST_SET_LOG_FD,
            struct.pack("=i", VHOST_FILE_UNBIND if fd is None else fd),
        )

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._ioctl("VHOST_SET_VRING_KICK", VHOST_SET_VRING_KICK, _file(index, fd))

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._ioctl("VHOST_SET_VRING_CALL", VHOST_SET_VRING_CALL, _file(index, fd))

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._ioctl("VHOST_SET_VRING_ERR", VHOST_SET_VRING_ERR, _file(index, fd))

    def set_backend(self, index: int, tap_fd: int | None) -> None:
        """Attach a TAP queue to ring `index` (the kernel starts moving frames), or
        detach it (None: the ring stops; what was in flight is completed first)."""
        self._ioctl("VHOST_NET_SET_BACKEND", VHOST_NET_SET_BACKEND, _file(index, tap_fd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"VhostNet({self.origin}, fd={self.fd})"


def _file(index: int, fd: int | None) -> bytes:
    return _FILE.pack(index, VHOST_FILE_UNBIND if fd is None else fd)
