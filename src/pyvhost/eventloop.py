"""One single-threaded event loop for the control socket, kicks and device fds.

A thin layer over selectors (epoll on Linux, level-triggered). An fd may have
a reader and a writer callback. Pollers are callbacks run on every
iteration, for rings the front-end asked to be polled (no kick fd).
"""

from __future__ import annotations

import logging
import selectors
from collections.abc import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], None]

# While a ring is polled rather than kicked, wake up this often.
POLL_INTERVAL = 0.001


class EventLoop:
    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._callbacks: dict[int, list[Callback | None]] = {}  # fd -> [reader, writer]
        self._pollers: dict[object, Callback] = {}
        self.stopping = False

    def _update(self, fd: int, slot: int, callback: Callback | None) -> None:
        cbs = self._callbacks.get(fd, [None, None])
        cbs[slot] = callback
        events = (selectors.EVENT_READ if cbs[0] else 0) | (selectors.EVENT_WRITE if cbs[1] else 0)
        try:
            if fd in self._callbacks:
                if events:
                    self._selector.modify(fd, events, cbs)
                else:
                    self._selector.unregister(fd)
            elif events:
                self._selector.register(fd, events, cbs)
        except (KeyError, ValueError, OSError):
            pass  # the fd is already closed: nothing to watch
        if events:
            self._callbacks[fd] = cbs
        else:
            self._callbacks.pop(fd, None)

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
        self._pollers[key] = callback

    def remove_poller(self, key: object) -> None:
        self._pollers.pop(key, None)

    def run_once(self, timeout: float | None = None) -> None:
        if self._pollers:
            timeout = POLL_INTERVAL if timeout is None else min(timeout, POLL_INTERVAL)
        events = self._selector.select(timeout)
        for key, mask in events:
            # An earlier callback in this batch may have unregistered this fd
            # (a front-end left and its kick fds were closed), or the number
            # may already belong to a new registration. epoll is level-
            # triggered here, so skipping a stale event loses nothing.
            cbs = self._callbacks.get(key.fd)
            if cbs is not key.data:
                continue
            if mask & selectors.EVENT_READ and cbs[0] is not None:
                cbs[0]()
            if (
                mask & selectors.EVENT_WRITE
                and cbs[1] is not None
                and self._callbacks.get(key.fd) is cbs
            ):
                cbs[1]()
        for poll in list(self._pollers.values()):
            poll()

    def run(self, until: Callable[[], bool] | None = None, timeout: float = 0.5) -> None:
        """Run until stop() (or `until()` is true)."""
        while not self.stopping and not (until is not None and until()):
            self.run_once(timeout)

    def stop(self) -> None:
        self.stopping = True

    def close(self) -> None:
        self._selector.close()
        self._callbacks.clear()
