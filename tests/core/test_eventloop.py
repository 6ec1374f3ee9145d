"""The event loop: callbacks for fds that are still registered, and only those."""

from __future__ import annotations

import os

from pyvhost.eventloop import EventLoop


def test_a_callback_that_unregisters_another_ready_fd_suppresses_its_stale_event():
    loop = EventLoop()
    fds = {"a": os.eventfd(1), "b": os.eventfd(1)}  # both readable: one select batch
    ran = []

    def callback(me: str, other: str):
        def run():
            os.eventfd_read(fds[me])  # raises EBADF if called for a closed fd
            ran.append(me)
            loop.remove_reader(fds[other])
            os.close(fds.pop(other))

        return run

    loop.add_reader(fds["a"], callback("a", "b"))
    loop.add_reader(fds["b"], callback("b", "a"))
    loop.run_once(0)
    assert len(ran) == 1  # whichever ran first closed the other; its event was dropped
    loop.close()
    for fd in fds.values():
        os.close(fd)


def test_pollers_run_every_iteration():
    loop = EventLoop()
    ticks = []
    loop.add_poller("ring", lambda: ticks.append(1))
    loop.run_once(0)
    loop.run_once(0)
    loop.remove_poller("ring")
    loop.run_once(0)
    assert len(ticks) == 2
    loop.close()
