"""One single-threaded event loop for the control socket, kicks and device fds.

A thin layer over selectors (epoll on Linux). Pollers are callbacks run on
every iteration, for rings the front-end asked to be polled (no kick fd).
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
        self._pollers: dict[object, Callback] = {}
        self.stopping = False

    def add_reader(self, fd: int, callback: Callback) -> None:
        try:
            self._selector.modify(fd, selectors.EVENT_READ, callback)
        except KeyError:
            self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def has_reader(self, fd: int) -> bool:
        try:
            self._selector.get_key(fd)
            return True
        except (KeyError, ValueError):
            return False

    def add_poller(self, key: object, callback: Callback) -> None:
        self._pollers[key] = callback

    def remove_poller(self, key: object) -> None:
        self._pollers.pop(key, None)

    def run_once(self, timeout: float | None = None) -> None:
        if self._pollers:
            timeout = POLL_INTERVAL if timeout is None else min(timeout, POLL_INTERVAL)
        events = self._selector.select(timeout)
        registered = self._selector.get_map()
        for key, _ in events:
            # An earlier callback in this batch may have unregistered this fd
            # (a front-end left and its kick fds were closed), or the number
            # may already belong to a new registration. epoll is level-
            # triggered here, so skipping a stale event loses nothing.
            if registered.get(key.fd) is key:
                key.data()
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
