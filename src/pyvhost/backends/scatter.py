"""One frame read from an fd across buffers named by address, or written from
them: readv(2) and writev(2) of (host address, length) spans, with no view
built per buffer.

A 64 KiB GSO frame for a Linux guest lands in about 17 of its 4 KiB mergeable
RX buffers. Handing os.readv a memoryview of each costs more Python than the
read itself; the ring already knows each buffer's address in this process
(SplitQueue.pop_spans), so this writes them straight into an iovec table and
calls readv through libc. An overflow buffer of this reader's own ends the
table, so a frame longer than the buffers is not cut by the kernel: the
caller sees its true length and the rest in `overflow()`.

A TX frame from a Linux guest is the same shape the other way: its header
and linear part, then a page per fragment, in one indirect table
(SplitQueue.pop_gathers); GatherWriter writes it with one writev.

The calls are synchronous: no buffer is in the kernel's hands after they
return, so nothing outlives a memory-map change. A bad address is the
kernel's EFAULT for the read, never a fault in this process.
"""

from __future__ import annotations

import ctypes
import errno
import os
from array import array

from pyvhost.memory.region import buffer_address

MAX_SPANS = 64  # a frame across at most this many buffers (the datapath's batch)
OVERFLOW = 65536 + 256  # the largest frame a TAP gives, with its header

_libc = ctypes.CDLL(None, use_errno=True)
_readv = _libc.readv
_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_readv.restype = ctypes.c_ssize_t
_writev = _libc.writev
_writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_writev.restype = ctypes.c_ssize_t


def _failed() -> OSError:
    err = ctypes.get_errno()
    if err == errno.EAGAIN:
        return BlockingIOError(err, os.strerror(err))
    return OSError(err, os.strerror(err))


class ScatterReader:
    """readv of one frame from `fd` into spans of this process's memory."""

    def __init__(self, fd: int, max_spans: int = MAX_SPANS, overflow: int = OVERFLOW) -> None:
        self.fd = fd
        self.max_spans = max_spans
        self._spill = bytearray(overflow)
        self._iov_raw = bytearray(16 * (max_spans + 1))  # struct iovec: base, len
        self._iov = memoryview(self._iov_raw).cast("Q")
        self._iov_addr = buffer_address(self._iov_raw)
        self._spill_addr = buffer_address(self._spill)
        self._overflow_size = overflow

    def read(self, addresses: list[int], lengths: list[int]) -> int:
        """One frame into the spans, in order, then the overflow buffer: its
        length, which exceeds sum(lengths) when it ran on into `overflow()`.
        Raises BlockingIOError when no frame is queued, OSError on failure."""
        n = len(addresses)
        if not 0 < n <= self.max_spans or len(lengths) != n:
            raise ValueError(f"{n} spans: 1 to {self.max_spans}, with a length each")
        iov = self._iov
        iov[0 : 2 * n : 2] = array("Q", addresses)
        iov[1 : 2 * n : 2] = array("Q", lengths)
        iov[2 * n] = self._spill_addr
        iov[2 * n + 1] = self._overflow_size
        got = _readv(self.fd, self._iov_addr, n + 1)
        if got < 0:
            raise _failed()
        return got

    def overflow(self, n: int) -> memoryview:
        """The first `n` bytes the last read put past its spans."""
        return memoryview(self._spill)[:n]

    def close(self) -> None:
        """Nothing to release but memory; here so that every reader closes alike."""
        self._iov.release()


class GatherWriter:
    """writev of one frame to `fd` from spans of this process's memory."""

    def __init__(self, fd: int, max_spans: int = MAX_SPANS) -> None:
        self.fd = fd
        self.max_spans = max_spans
        self._iov_raw = bytearray(16 * max_spans)
        self._iov = memoryview(self._iov_raw).cast("Q")
        self._iov_addr = buffer_address(self._iov_raw)

    def write(self, addresses: list[int], lengths: list[int]) -> int:
        """The spans, in order, as one frame: the bytes written. Raises
        BlockingIOError when the fd's send buffer is full, OSError on failure."""
        n = len(addresses)
        if not 0 < n <= self.max_spans or len(lengths) != n:
            raise ValueError(f"{n} spans: 1 to {self.max_spans}, with a length each")
        iov = self._iov
        iov[0 : 2 * n : 2] = array("Q", addresses)
        iov[1 : 2 * n : 2] = array("Q", lengths)
        done = _writev(self.fd, self._iov_addr, n)
        if done < 0:
            raise _failed()
        return done

    def close(self) -> None:
        """Nothing to release but memory; here so that every writer closes alike."""
        self._iov.release()
