"""The event loop: callbacks for fds that are still registered, and only those."""

from __future__ import annotations

import os
import socket
import time

import pytest

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


def test_an_fd_number_reused_within_a_batch_is_not_called_for_the_old_fd_s_event():
    loop = EventLoop()
    fds = {"a": os.eventfd(1), "b": os.eventfd(1)}  # both readable: one epoll batch
    stale = []
    reused = {}

    def callback(me: str, other: str):
        def run():
            os.eventfd_read(fds[me])
            loop.remove_reader(fds[other])
            os.close(fds.pop(other))
            fresh = os.eventfd(0)  # not readable; takes the closed fd's number
            reused["fd"] = fresh
            loop.add_reader(fresh, lambda: stale.append(fresh))

        return run

    loop.add_reader(fds["a"], callback("a", "b"))
    loop.add_reader(fds["b"], callback("b", "a"))
    loop.run_once(0)
    assert stale == []  # the event reported for the old fd did not reach the new one
    loop.run_once(0)
    assert stale == []  # and the new one, never readable, is not called later either
    loop.close()
    for fd in [*fds.values(), reused["fd"]]:
        os.close(fd)


def test_an_fd_closed_without_removal_leaves_its_number_free_for_a_new_reader():
    loop = EventLoop()
    old = os.eventfd(0)
    loop.add_reader(old, lambda: None)
    os.close(old)  # its owner forgot remove_reader (epoll drops the closed fd)
    new = os.eventfd(1)
    assert new == old  # the same number
    ran = []
    loop.add_reader(new, lambda: ran.append(os.eventfd_read(new)))
    loop.run_once(0)
    assert ran == [1]
    loop.close()
    os.close(new)


def test_a_peer_hanging_up_wakes_the_reader_which_then_reads_the_end():
    loop = EventLoop()
    a, b = socket.socketpair()
    got = []
    loop.add_reader(a.fileno(), lambda: got.append(a.recv(16)))
    b.close()
    loop.run_once(0)
    assert got == [b""]
    loop.close()
    a.close()


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


def test_a_timer_runs_once_and_not_before_its_time():
    loop = EventLoop()
    ran = []
    due = time.monotonic_ns() + 3_000_000  # 3 ms: first epoll sleep, then a spin
    loop.call_at(due, lambda: ran.append(time.monotonic_ns()))
    loop.run(until=lambda: bool(ran), timeout=1.0)
    for _ in range(3):
        loop.run_once(0)
    assert len(ran) == 1 and ran[0] >= due
    loop.close()


def test_timers_run_in_the_order_of_their_times():
    loop = EventLoop()
    ran = []
    now = time.monotonic_ns()
    loop.call_at(now + 2_000_000, lambda: ran.append("late"))
    loop.call_at(now + 1_000_000, lambda: ran.append("early"))
    loop.run(until=lambda: len(ran) == 2, timeout=1.0)
    assert ran == ["early", "late"]
    loop.close()


def test_a_cancelled_timer_never_runs():
    loop = EventLoop()
    ran = []
    timer = loop.call_at(time.monotonic_ns(), lambda: ran.append(1))
    timer.cancel()
    loop.run_once(0)
    assert ran == []
    loop.close()


def test_a_busy_poller_keeps_the_loop_from_sleeping():
    loop = EventLoop()
    fd = os.eventfd(0)  # never readable
    loop.add_reader(fd, lambda: None)
    ticks = []
    loop.add_busy_poller("tx0", lambda: ticks.append(1))
    start = time.monotonic()
    for _ in range(100):
        loop.run_once(10.0)  # would sleep 10 s per iteration without the poller
    assert len(ticks) == 100 and time.monotonic() - start < 5
    loop.remove_busy_poller("tx0")
    loop.close()
    os.close(fd)


class Owner:
    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def loop_error(self, error: Exception) -> None:
        self.errors.append(error)


def test_a_failing_callback_reaches_its_owner_and_the_others_run_on():
    """Two sessions on one loop (the switch's ports): one's bug is its own."""
    loop = EventLoop()
    a, b = Owner(), Owner()
    ran = []
    fds = [os.eventfd(1), os.eventfd(1)]

    def broken():
        raise RuntimeError("a bug in a's datapath")

    def fine():
        os.eventfd_read(fds[1])
        ran.append("b")
        loop.call_soon(lambda: ran.append("b again"))  # registered while b's callback runs

    with loop.owned_by(a):
        loop.add_reader(fds[0], broken)
    with loop.owned_by(b):
        loop.add_reader(fds[1], fine)
    loop.run_once(0)
    loop.remove_reader(fds[0])
    loop.run_once(0)
    assert [str(e) for e in a.errors] == ["a bug in a's datapath"]
    assert b.errors == [] and ran == ["b", "b again"]
    loop.close()
    for fd in fds:
        os.close(fd)


def test_without_an_owner_an_error_propagates():
    loop = EventLoop()
    loop.call_soon(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        loop.run_once(0)
    loop.close()


def test_waiting_for_timers_sleeps_rather_than_spins():
    # Moderation windows are shorter than epoll's millisecond: 200 timers, each
    # 500 us after the last, are waited for asleep, each on time.
    loop = EventLoop()
    fired: list[int] = []
    due: list[int] = []

    def rearm() -> None:
        fired.append(time.monotonic_ns())
        if len(fired) < 200:
            due.append(time.monotonic_ns() + 500_000)
            loop.call_at(due[-1], rearm)

    due.append(time.monotonic_ns() + 500_000)
    loop.call_at(due[-1], rearm)
    cpu0 = time.process_time()
    while len(fired) < 200:
        loop.run_once(None)
    cpu = time.process_time() - cpu0
    assert all(f >= d for f, d in zip(fired, due, strict=True))
    assert cpu < 0.05, f"{cpu:.3f} s of CPU to wait 0.1 s for timers"
    loop.close()


def test_a_timer_due_within_a_millisecond_wakes_the_loop_without_a_ready_fd():
    loop = EventLoop()
    fired = []
    loop.call_at(time.monotonic_ns() + 200_000, lambda: fired.append(True))  # 200 us
    loop.run_once(None)  # no fd will become ready: only the timer can end the wait
    while not fired:
        loop.run_once(None)
    assert fired == [True]
    loop.close()


def test_an_idle_loop_has_no_timer_armed():
    loop = EventLoop()
    t = loop.call_at(time.monotonic_ns() + 10_000_000_000, lambda: None)
    loop.run_once(0)
    t.cancel()
    loop.run_once(0)
    spec = open(f"/proc/self/fdinfo/{loop._timerfd.fd}").read()
    assert "it_value: (0, 0)" in spec, spec  # nothing will wake an idle daemon
    loop.close()
