"""The dirty log of a live migration: a bitmap of guest pages the back-end wrote.

The front-end shares the log (a memfd, SET_LOG_BASE); one bit per 4 KiB
guest-physical page, bit `page % 8` of byte `page // 8`. The front-end
fetches and clears it concurrently (QEMU with atomic exchanges), and the
kernel's vhost-net sets bits in it too, so every bit is set with an atomic
OR (libatomic's __atomic_fetch_or_8, one call per 64 pages): a plain
read-modify-write could clear a bit another writer just set.

The log is owned by GuestMemory, and the virtqueue marks what the device
wrote as it returns each chain, so no datapath can forget a write.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import stat

from pyvhost.errors import GuestMemoryError, InvalidRegionError
from pyvhost.memory.region import buffer_address

log = logging.getLogger(__name__)

LOG_PAGE = 0x1000
_LOG_PAGE_SHIFT = 12


def _load_atomic_or():
    """libatomic's 64-bit atomic OR, or None where the library is missing."""
    try:
        lib = ctypes.CDLL("libatomic.so.1")
    except OSError:
        return None
    fetch_or = lib.__atomic_fetch_or_8
    fetch_or.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    fetch_or.restype = ctypes.c_uint64
    return fetch_or


_atomic_or = _load_atomic_or()
_SEQ_CST = 5


def logging_supported() -> str | None:
    """None if dirty logging works here, else why not (to say so, not to hide it)."""
    if _atomic_or is None:
        return "libatomic.so.1 is missing (apt-get install libatomic1)"
    return None


class DirtyLog:
    """A mapped dirty log. Takes ownership of its fd."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        why = logging_supported()
        if why is not None:
            os.close(fd)
            raise GuestMemoryError(f"cannot log dirty pages: {why}")
        try:
            if size <= 0 or size % 8 or offset < 0 or offset % 8:
                raise InvalidRegionError(
                    f"dirty log of {size} bytes at offset {offset}: both must be positive "
                    "multiples of 8 (the log is 64-bit words)"
                )
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise InvalidRegionError(f"dirty log fd is not usable: {e.strerror}") from e
            if not stat.S_ISREG(st.st_mode):
                raise InvalidRegionError("the dirty log's fd is no memfd or file")
            # Past the file's end a mapping faults (SIGBUS) instead of failing here.
            if st.st_size < offset + size:
                raise InvalidRegionError(
                    f"dirty log needs file bytes up to 0x{offset + size:x}; the file has "
                    f"0x{st.st_size:x}"
                )
            granule = mmap.ALLOCATIONGRANULARITY
            aligned = offset - offset % granule
            try:
                self._mm = mmap.mmap(fd, size + offset - aligned, mmap.MAP_SHARED,
                                     offset=aligned)  # fmt: skip
            except (OSError, ValueError, OverflowError) as e:
                raise InvalidRegionError(f"cannot map the dirty log: {e}") from e
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # kept for share_fd(): a worker process marks the same log
        self.offset = offset
        self.size = size
        self.pages = size * 8
        self._delta = offset - aligned
        self.host_address = buffer_address(self._mm) + self._delta
        self.marked = 0  # mark() calls, for stats
        self.outside = 0  # pages past the log's end (the front-end gave too small a log)
        self.notify_fd: int | None = None  # SET_LOG_FD: told after writes are logged

    def mark(self, addr: int, length: int) -> None:
        """Guest [addr, addr+length) was written: set its pages' bits."""
        if length <= 0:
            return
        first = addr >> _LOG_PAGE_SHIFT
        last = (addr + length - 1) >> _LOG_PAGE_SHIFT
        if last >= self.pages:
            self.outside += 1
            if self.outside == 1:
                log.error(
                    "dirty log of %d pages is too small for guest 0x%x+0x%x: those pages "
                    "will not be migrated right",
                    self.pages,
                    addr,
                    length,
                )
            last = self.pages - 1
            if first > last:
                return
        self.marked += 1
        base = self.host_address
        page = first
        while page <= last:
            word = page >> 6
            bits = 0
            while page <= last and page >> 6 == word:
                bits |= 1 << (page & 63)
                page += 1
            _atomic_or(base + 8 * word, bits, _SEQ_CST)

    def signal(self) -> None:
        if self.notify_fd is not None:
            try:
                os.eventfd_write(self.notify_fd, 1)
            except BlockingIOError:
                pass

    def dirty_pages(self) -> list[int]:
        """The pages marked (a test's view; the front-end reads its own mapping)."""
        data = self._mm[self._delta : self._delta + self.size]
        return [i * 8 + b for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1]

    def share_fd(self) -> int:
        """A new fd of the log's file, for another process to map it (caller closes)."""
        return os.dup(self._fd)

    def close(self) -> None:
        if self.notify_fd is not None:
            os.close(self.notify_fd)
            self.notify_fd = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._mm.close()
