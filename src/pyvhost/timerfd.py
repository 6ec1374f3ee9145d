"""A timerfd: a deadline, in nanoseconds of CLOCK_MONOTONIC, that epoll waits for.

epoll_wait's own timeout is in milliseconds, too coarse for interrupt
moderation windows of a few hundred microseconds; waiting for those by
spinning costs a core. A timerfd armed at the deadline wakes epoll on time
(a high-resolution timer) and costs nothing until then. Python has
os.timerfd_create from 3.13; before that, libc through ctypes.
"""

from __future__ import annotations

import ctypes
import os

CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [
    ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p,
]  # fmt: skip


class TimerFd:
    """One deadline at a time: arm(when_ns) replaces it, disarm() clears it."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd
        self.armed_at: int | None = None
        self._spec = _Itimerspec()

    def fileno(self) -> int:
        return self.fd

    def arm(self, when_ns: int) -> None:
        """Become readable at CLOCK_MONOTONIC time `when_ns` (at once if past)."""
        if when_ns == self.armed_at:
            return
        when_ns = max(when_ns, 1)  # 0 would disarm
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(when_ns, 1_000_000_000)
        self._settime()
        self.armed_at = when_ns

    def disarm(self) -> None:
        if self.armed_at is not None:
            self._spec.it_value.tv_sec = self._spec.it_value.tv_nsec = 0
            self._settime()
            self.armed_at = None

    def clear(self) -> None:
        """Consume an expiry (the fd is level-triggered until read)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed_at = None

    def _settime(self) -> None:
        if _libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None):
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
