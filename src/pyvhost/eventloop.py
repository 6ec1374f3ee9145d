"""One single-threaded event loop for the control socket, kicks and device fds.

A thin layer over epoll (level-triggered), used directly: the selectors
module's own bookkeeping cost more per iteration than the dispatch (2.4
against 1.0 us with one ready fd, bench/loop_turn.py). An fd may have
a reader and a writer callback. Pollers are callbacks run on every
iteration, for rings the front-end asked to be polled (no kick fd); busy
pollers run on every iteration too, and while there is one the loop does not
sleep (a datapath polling its ring instead of waiting for kicks). Timers run
a callback once at a monotonic time in nanoseconds; epoll's own timeout is in
milliseconds, so the earliest timer arms a timerfd that epoll watches, which
wakes it on time without spinning.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable

from pyvhost.timerfd import TimerFd

log = logging.getLogger(__name__)

Callback = Callable[[], None]

# While a ring is polled rather than kicked, wake up this often.
POLL_INTERVAL = 0.001
# epoll's report, and which of an fd's callbacks it calls: an error or hang-up
# wakes both, as the selectors module maps them (a reader then sees EOF).
_NOT_ONLY_OUT = ~select.EPOLLOUT
_NOT_ONLY_IN = ~select.EPOLLIN


class Timer:
    """A pending call_at(); cancel() makes it a no-op."""

    __slots__ = ("when_ns", "callback", "cancelled", "owner")

    def __init__(self, when_ns: int, callback: Callback, owner: object = None) -> None:
        self.when_ns = when_ns
        self.callback = callback
        self.cancelled = False
        self.owner = owner

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """Callbacks belong to an owner: whoever was running (or `owned_by`) when they
    were registered. An exception a callback raises goes to its owner's
    `loop_error(exc)` (a daemon drops that one session), else to
    `error_handler`, else out of run_once. Several sessions share one loop
    (the switch's ports) without one's failure touching another."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        # fd -> [reader, writer, reader's owner, writer's owner]
        self._callbacks: dict[int, list] = {}
        # fds unregistered while this iteration's events are dispatched: an
        # event already reported for one is stale (see run_once).
        self._dropped: set[int] = set()
        self._pollers: dict[object, tuple[Callback, object]] = {}
        self._busy: dict[object, tuple[Callback, object]] = {}
        self._timers: list[tuple[int, int, Timer]] = []  # heap of (when_ns, seq, timer)
        self._timerfd: TimerFd | None = None
        self._soon: list[tuple[Callback, object]] = []  # run once, at the next iteration
        self._seq = itertools.count()
        self.stopping = False
        self.owner: object = None  # whose callbacks run, and are registered, now
        # Called with an exception whose owner has no loop_error (then the loop
        # goes on); None: the exception propagates out of run_once.
        self.error_handler: Callable[[Exception], None] | None = None
        # Wakes epoll for the earliest timer; made now, so a loop's fds are the
        # same before and after its first timer.
        self._timerfd = TimerFd()
        self._update(self._timerfd.fd, 0, self._timerfd.clear)

    @contextlib.contextmanager
    def owned_by(self, owner: object):
        """Callbacks registered inside the block belong to `owner`."""
        previous, self.owner = self.owner, owner
        try:
            yield
        finally:
            self.owner = previous

    def _update(self, fd: int, slot: int, callback: Callback | None) -> None:
        cbs = self._callbacks.get(fd, [None, None, None, None])
        cbs[slot] = callback
        cbs[slot + 2] = self.owner
        events = (select.EPOLLIN if cbs[0] else 0) | (select.EPOLLOUT if cbs[1] else 0)
        try:
            if not events:
                if fd in self._callbacks:
                    self._epoll.unregister(fd)
            elif fd in self._callbacks:
                try:
                    self._epoll.modify(fd, events)
                except FileNotFoundError:
                    # The fd was closed while watched (epoll forgot it) and its
                    # number now belongs to a new one: watch that.
                    self._epoll.register(fd, events)
            else:
                try:
                    self._epoll.register(fd, events)
                except FileExistsError:
                    self._epoll.modify(fd, events)  # a dup of a closed one is still watched
        except (ValueError, OSError):
            pass  # the fd is already closed: nothing to watch
        if events:
            self._callbacks[fd] = cbs
        elif self._callbacks.pop(fd, None) is not None:
            self._dropped.add(fd)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._update(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        if fd in self._callbacks:
            self._update(fd, 0, None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._update(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        if fd in self._callbacks:
            self._update(fd, 1, None)

    def add_poller(self, key: object, callback: Callback) -> None:
        self._pollers[key] = (callback, self.owner)

    def remove_poller(self, key: object) -> None:
        self._pollers.pop(key, None)

    def add_busy_poller(self, key: object, callback: Callback) -> None:
        self._busy[key] = (callback, self.owner)

    def remove_busy_poller(self, key: object) -> None:
        self._busy.pop(key, None)

    def call_soon(self, callback: Callback) -> None:
        """Run `callback` once at the next iteration, after the fds that are ready:
        a handler that used up its budget yields to the others this way."""
        self._soon.append((callback, self.owner))

    def call_at(self, when_ns: int, callback: Callback) -> Timer:
        """Run `callback` once, at time.monotonic_ns() >= when_ns."""
        timer = Timer(when_ns, callback, self.owner)
        heapq.heappush(self._timers, (when_ns, next(self._seq), timer))
        return timer

    def _sleep_limit(self, timeout: float | None) -> float | None:
        if self._busy or self._soon:
            return 0
        if self._pollers:
            timeout = POLL_INTERVAL if timeout is None else min(timeout, POLL_INTERVAL)
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            when = self._timers[0][0]
            if when <= time.monotonic_ns():
                return 0
            self._timerfd.arm(when)
        elif self._timerfd is not None:
            self._timerfd.disarm()  # a no-op when not armed
        return timeout

    def _run_timers(self) -> None:
        timers = self._timers
        now = time.monotonic_ns()
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if not timer.cancelled:
                self._call(timer.callback, timer.owner)

    def _call(self, callback: Callback, owner: object) -> None:
        previous, self.owner = self.owner, owner
        try:
            callback()
        except Exception as e:
            handler = getattr(owner, "loop_error", None) or self.error_handler
            if handler is None:
                raise
            handler(e)
        finally:
            self.owner = previous

    def run_once(self, timeout: float | None = None) -> None:
        limit = self._sleep_limit(timeout)
        callbacks = self._callbacks
        events = self._epoll.poll(-1 if limit is None else limit, len(callbacks) or 1)
        call = self._call
        dropped = self._dropped
        dropped.clear()
        for fd, mask in events:
            # An earlier callback in this batch may have unregistered this fd
            # (a front-end left and its kick fds were closed), and the number
            # may already belong to a new registration. epoll is level-
            # triggered here, so skipping a stale event loses nothing.
            if fd in dropped:
                continue
            cbs = callbacks.get(fd)
            if cbs is None:
                continue
            if mask & _NOT_ONLY_OUT and cbs[0] is not None:
                call(cbs[0], cbs[2])
                if fd in dropped:
                    continue
            if mask & _NOT_ONLY_IN and cbs[1] is not None:
                call(cbs[1], cbs[3])
        if self._pollers:
            for poll, owner in list(self._pollers.values()):
                call(poll, owner)
        if self._busy:
            for poll, owner in list(self._busy.values()):
                call(poll, owner)
        if self._soon:
            soon, self._soon = self._soon, []
            for callback, owner in soon:
                call(callback, owner)
        if self._timers:
            self._run_timers()

    def run(self, until: Callable[[], bool] | None = None, timeout: float = 0.5) -> None:
        """Run until stop() (or `until()` is true)."""
        while not self.stopping and not (until is not None and until()):
            self.run_once(timeout)

    def stop(self) -> None:
        self.stopping = True

    def close(self) -> None:
        if self._timerfd is not None:
            self._timerfd.close()
            self._timerfd = None
        self._epoll.close()
        self._callbacks.clear()
        self._pollers.clear()
        self._busy.clear()
        self._timers.clear()
        self._soon.clear()
