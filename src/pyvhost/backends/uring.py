"""Batched writes to one fd through io_uring (linux/io_uring.h), with no binding.

A TAP takes one frame per write, so writing N frames costs N system calls; a
batch of N writes submitted through io_uring costs one. That is all this
module does: IORING_OP_WRITE of contiguous spans of this process's memory
(host addresses of guest buffers), submitted together and all reaped before
`write_spans` returns, so no buffer is in the kernel's hands afterwards and
nothing outlives the call that could see a mapping go away.

The ABI is packed by hand (the structs are fixed by the kernel), the rings are
mmap'd, and the three system calls go through libc's syscall(). Every static
field of a submission entry (opcode, fd) is written once at setup; a batch
writes only the address, length and tag of each entry: that is what makes it
cheaper than os.writev from Python.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from array import array

from pyvhost.errors import UringUnavailableError
from pyvhost.memory.region import buffer_address

# x86-64 and aarch64 share these numbers (the generic syscall table).
_SYS_IO_URING_SETUP = 425
_SYS_IO_URING_ENTER = 426
_SYS_IO_URING_REGISTER = 427

IORING_OP_READV = 1
IORING_OP_WRITE = 23  # since 5.6
RWF_NOWAIT = 8  # linux/fs.h: fail with EAGAIN rather than wait for data
IORING_ENTER_GETEVENTS = 1
IORING_REGISTER_PROBE = 8
IO_URING_OP_SUPPORTED = 1
IORING_FEAT_SINGLE_MMAP = 1
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# struct io_uring_params: sq_entries, cq_entries, flags, sq_thread_cpu,
# sq_thread_idle, features, wq_fd, resv[3]; then io_sqring_offsets (head, tail,
# ring_mask, ring_entries, flags, dropped, array, resv1, user_addr) and
# io_cqring_offsets (head, tail, ring_mask, ring_entries, overflow, cqes, flags,
# resv1, user_addr): 120 bytes.
_PARAMS = struct.Struct("=6I4x12x 7I4xQ 8IQ")
# struct io_uring_sqe, the fields a write uses: opcode, flags, ioprio, fd, off,
# addr, len, rw_flags, user_data (then buf_index... left zero): 64 bytes.
_SQE = struct.Struct("=BBHiQQIIQ24x")
_SQE_SIZE = 64
_CQE_SIZE = 16
# struct io_uring_probe: last_op, ops_len, resv, resv2[3]; then 256 of
# io_uring_probe_op: op, resv, flags, resv2.
_PROBE_OPS = 256
_PROBE_HEAD = 16
_PROBE_OP = struct.Struct("=BBHI")

DEFAULT_ENTRIES = 256

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class _SpanRing:
    """An io_uring whose every entry is the same operation on `fd`: a batch
    fills in only each entry's buffer, submits, and waits for all of it.

    Results come back in submission order: bytes, or -errno. Owns its ring fd
    and mappings; `close()` releases them. Not for sharing across processes
    (the rings are this process's)."""

    opcode = IORING_OP_WRITE
    rw_flags = 0

    def __init__(self, fd: int, entries: int = DEFAULT_ENTRIES) -> None:
        self.target_fd = fd
        self.ring_fd = -1
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        params = bytearray(_PARAMS.size)
        try:
            raw = (ctypes.c_char * len(params)).from_buffer(params)
            try:
                ring_fd = _syscall(_SYS_IO_URING_SETUP, entries, raw)
            finally:
                del raw
            self.ring_fd = _check(ring_fd, "io_uring_setup")
            self._map(_PARAMS.unpack(params))
            self._require_op()
        except OSError as e:
            self.close()
            raise UringUnavailableError(e.errno, e.strerror or str(e)) from e

    def _map(self, p: tuple) -> None:
        sq_entries, cq_entries, _flags, _cpu, _idle, features = p[:6]
        sq_head, sq_tail, sq_mask, _sq_n, _sq_flags, _dropped, sq_array = p[6:13]
        _sq_user = p[13]
        cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes = p[14:20]
        sq_size = sq_array + 4 * sq_entries
        cq_size = cqes + _CQE_SIZE * cq_entries
        shared = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        if features & IORING_FEAT_SINGLE_MMAP:
            sq = cq = mmap.mmap(self.ring_fd, max(sq_size, cq_size), shared, offset=0)
            self._maps.append(sq)
        else:  # before 5.4: the CQ ring is a mapping of its own
            sq = mmap.mmap(self.ring_fd, sq_size, shared, offset=IORING_OFF_SQ_RING)
            self._maps.append(sq)
            cq = mmap.mmap(self.ring_fd, cq_size, shared, offset=IORING_OFF_CQ_RING)
            self._maps.append(cq)
        sqes = mmap.mmap(self.ring_fd, _SQE_SIZE * sq_entries, shared, offset=IORING_OFF_SQES)
        self._maps.append(sqes)
        self.entries = sq_entries
        sq32 = self._view(sq, "I")
        cq32 = self._view(cq, "I")
        self._sq32, self._cq32 = sq32, cq32
        self._sq_tail = sq_tail // 4
        self._sq_mask = sq32[sq_mask // 4]
        self._cq_head, self._cq_tail = cq_head // 4, cq_tail // 4
        self._cq_mask = cq32[cq_mask // 4]
        self._cq_entries = cq_entries
        self._iota = list(range(sq_entries))
        self._cqes = cqes // 4  # in u32 units; a CQE is user_data (u64), res (s32), flags
        self._cq_s32 = self._view(cq, "i")
        # Slot i of the submission array names entry i, for good: a batch is
        # always written to consecutive entries, in ring order.
        slots = sq32[sq_array // 4 : sq_array // 4 + sq_entries]
        for i in range(sq_entries):
            slots[i] = i
        del slots
        for i in range(sq_entries):  # user_data: the entry's own index, for good
            _SQE.pack_into(
                sqes, i * _SQE_SIZE, self.opcode, 0, 0, self.target_fd, 0, 0, 0, self.rw_flags, i
            )
        self._sqe64 = self._view(sqes, "Q")  # addr at [8i+2]
        self._sqe32 = self._view(sqes, "I")  # len at [16i+6]
        self._sq_head = sq_head // 4

    def _view(self, m: mmap.mmap, fmt: str) -> memoryview:
        v = memoryview(m).cast(fmt)
        self._views.append(v)
        return v

    def _require_op(self) -> None:
        """The ring's operation (IORING_OP_WRITE came in 5.6, like the probe
        itself): ask the kernel for it."""
        probe = bytearray(_PROBE_HEAD + _PROBE_OP.size * _PROBE_OPS)
        raw = (ctypes.c_char * len(probe)).from_buffer(probe)
        try:
            ret = _syscall(
                _SYS_IO_URING_REGISTER, self.ring_fd, IORING_REGISTER_PROBE, raw, _PROBE_OPS
            )
        finally:
            del raw
        _check(ret, "io_uring_register(PROBE)")
        at = _PROBE_HEAD + _PROBE_OP.size * self.opcode
        if (
            probe[0] < self.opcode
            or not _PROBE_OP.unpack_from(probe, at)[2] & IO_URING_OP_SUPPORTED
        ):
            raise OSError(errno.EOPNOTSUPP, f"this kernel's io_uring lacks operation {self.opcode}")

    def _run_batch(self, addresses: list[int], lengths: list[int]) -> list[int]:
        """Fill one entry per span from the ring's tail on, submit them, wait for
        all of them; their results in order."""
        n = len(addresses)
        if n > self.entries:
            raise ValueError(f"{n} spans in one batch; the ring holds {self.entries}")
        if not n:
            return []
        sq32 = self._sq32
        tail = sq32[self._sq_tail]
        first = self._first = tail & self._sq_mask
        # The batch's entries are consecutive: its addresses and lengths go in as
        # one strided store each (two when the batch wraps the ring's end).
        k = min(n, self.entries - first)
        if k == n:
            self._fill(first, addresses, lengths)
        else:
            self._fill(first, addresses[:k], lengths[:k])
            self._fill(0, addresses[k:], lengths[k:])
        sq32[self._sq_tail] = (tail + n) & 0xFFFFFFFF  # the system call is the barrier
        return self._submit_and_reap(n, first)

    def _fill(self, first: int, addresses: list[int], lengths: list[int]) -> None:
        """Write the spans into entries first, first+1, ... (no wrap)."""
        raise NotImplementedError

    def _submit_and_reap(self, n: int, first: int) -> list[int]:
        """Submit n entries from entry `first` on and wait for all n completions;
        their results in submission order."""
        to_submit, got = n, 0
        results = [0] * n
        mask = self._sq_mask
        while got < n:
            ret = _syscall(
                _SYS_IO_URING_ENTER, self.ring_fd, to_submit, n - got,
                IORING_ENTER_GETEVENTS, None, 0,
            )  # fmt: skip
            if ret < 0:
                err = ctypes.get_errno()
                if err not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            else:
                to_submit -= ret
            slots, res = self._reap()
            if got == 0 and len(slots) == n and slots == self._in_order(first, n):
                return res  # all of them, in submission order: the common case
            for slot, r in zip(slots, res, strict=True):
                results[(slot - first) & mask] = r
            got += len(slots)
        return results

    def _in_order(self, first: int, n: int) -> list[int]:
        end = first + n
        if end <= self.entries:
            return self._iota[first:end]
        return self._iota[first:] + self._iota[: end - self.entries]

    def _reap(self) -> tuple[list[int], list[int]]:
        """The completions waiting: (user_data, res) lists, in completion order."""
        cq32 = self._cq32
        head = cq32[self._cq_head]
        count = (cq32[self._cq_tail] - head) & 0xFFFFFFFF
        if not count:
            return [], []
        at = head & self._cq_mask
        k = min(count, self._cq_entries - at)
        base = self._cqes
        s32 = self._cq_s32
        slots = cq32[base + 4 * at : base + 4 * (at + k) : 4].tolist()
        res = s32[base + 4 * at + 2 : base + 4 * (at + k) + 2 : 4].tolist()
        if k < count:  # the completions wrap the ring's end
            slots += cq32[base : base + 4 * (count - k) : 4].tolist()
            res += s32[base + 2 : base + 4 * (count - k) + 2 : 4].tolist()
        cq32[self._cq_head] = (head + count) & 0xFFFFFFFF
        return slots, res

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._views.clear()
        for m in self._maps:
            m.close()
        self._maps.clear()
        if self.ring_fd >= 0:
            os.close(self.ring_fd)
            self.ring_fd = -1


class SpanWriter(_SpanRing):
    """Writes batches of (address, length) spans to `fd`, one system call a batch."""

    opcode = IORING_OP_WRITE

    def write_spans(self, addresses: list[int], lengths: list[int]) -> list[int]:
        """Write each span as one write(2) to the fd, in order; returns what each
        returned (bytes, or -errno). At most `entries` spans per call."""
        return self._run_batch(addresses, lengths)

    def _fill(self, first: int, addresses: list[int], lengths: list[int]) -> None:
        end = first + len(addresses)
        self._sqe64[8 * first + 2 : 8 * end + 2 : 8] = array("Q", addresses)
        self._sqe32[16 * first + 6 : 16 * end + 6 : 16] = array("I", lengths)

    def __repr__(self) -> str:
        return f"SpanWriter(fd={self.target_fd}, ring fd={self.ring_fd})"


class SpanReader(_SpanRing):
    """Reads one frame into each of a batch of spans, one system call a batch.

    Each entry is a readv of two buffers: the span, and an overflow buffer of
    the entry's own behind it, so a frame longer than its span is kept whole
    (`overflow()` shows the rest) instead of being cut by the kernel. The
    reads are RWF_NOWAIT: a read that finds no frame completes with -EAGAIN
    at once rather than waiting for one. The overflow buffers are anonymous
    memory, touched (and so allocated) only when a frame needs them."""

    opcode = IORING_OP_READV
    rw_flags = RWF_NOWAIT

    def __init__(self, fd: int, entries: int = 64, overflow: int = 65536 + 256) -> None:
        super().__init__(fd, entries)
        try:
            self._overflow_size = overflow
            n = self.entries
            iov = mmap.mmap(-1, 32 * n)
            self._maps.append(iov)
            spill = mmap.mmap(-1, overflow * n)
            self._maps.append(spill)
            self._spill = self._view(spill, "B")
            spill_base = buffer_address(spill)
            iov_base = buffer_address(iov)
            self._iov64 = self._view(iov, "Q")  # entry i: span at [4i], [4i+1]; overflow after
            for i in range(n):
                self._iov64[4 * i + 2] = spill_base + overflow * i
                self._iov64[4 * i + 3] = overflow
                self._sqe64[8 * i + 2] = iov_base + 32 * i  # addr: the entry's iovec pair
                self._sqe32[16 * i + 6] = 2  # len: two iovecs
            self._first = 0
            self._require_nowait_reads()
        except OSError as e:
            self.close()
            raise UringUnavailableError(e.errno, e.strerror or str(e)) from e

    def _require_nowait_reads(self) -> None:
        """A read of nothing, RWF_NOWAIT: it takes no frame, and tells whether the
        fd honours RWF_NOWAIT (a TAP does from Linux 6.x on; before, the flag is
        refused with EOPNOTSUPP, and without it a read of an empty TAP would
        wait for a frame)."""
        iov64 = self._iov64
        iov64[1] = 0
        iov64[3] = 0
        try:
            (got,) = self.read_spans([0], [0])
        finally:
            iov64[3] = self._overflow_size
        if got < 0 and got != -errno.EAGAIN:
            raise OSError(-got, f"a RWF_NOWAIT read of fd {self.target_fd}: {os.strerror(-got)}")

    def read_spans(self, addresses: list[int], lengths: list[int]) -> list[int]:
        """Read a frame into each span, in order; returns what each read returned
        (bytes, which may run past the span into its overflow; or -errno,
        -EAGAIN when no frame was waiting). At most `entries` spans per call."""
        return self._run_batch(addresses, lengths)

    def _fill(self, first: int, addresses: list[int], lengths: list[int]) -> None:
        end = first + len(addresses)
        self._iov64[4 * first : 4 * end : 4] = array("Q", addresses)
        self._iov64[4 * first + 1 : 4 * end + 1 : 4] = array("Q", lengths)

    def overflow(self, position: int, length: int) -> memoryview:
        """The first `length` bytes past the span of the last batch's
        `position`-th read: good until the next batch."""
        at = ((self._first + position) & self._sq_mask) * self._overflow_size
        return self._spill[at : at + min(length, self._overflow_size)]

    def __repr__(self) -> str:
        return f"SpanReader(fd={self.target_fd}, ring fd={self.ring_fd})"


def probe() -> str | None:
    """None when batched writes work here; else why not (for a message)."""
    r, w = os.pipe()
    try:
        SpanWriter(w, 8).close()
    except UringUnavailableError as e:
        return str(e)
    finally:
        os.close(r)
        os.close(w)
    return None
