"""Interrupt moderation: signal a driver at most once per window.

Every signal a backend sends costs the guest far more than it costs us: an
eventfd write wakes the VMM on the guest's core (a cross-core IPI), the VMM
injects an interrupt, the guest takes it and reads the ISR. Under TCG that
dominated pyvhost's guest-to-host throughput (BENCHMARKS.md). Like a NIC's
interrupt throttling (ethtool -C rx-usecs/tx-usecs), a ModeratedNotifier
signals at once when the last signal is older than the window, and
otherwise defers the signal to the window's end, when one signal covers
everything completed meanwhile. A lone packet on an idle ring is never
delayed; a busy ring is signalled at most 1/window times per second. An
optional `may_defer()` lets the device say when a delay would hurt (a
driver waiting for exactly this frame): then the signal goes at once.

Deferring is safe for the ring protocol: the used entries are published at
once (a driver that looks, e.g. when it transmits, reaps them without an
interrupt), and with EVENT_IDX the deferred check covers all entries pushed
since the last one, as if they had been pushed together.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pyvhost.device import QueueNotifier
from pyvhost.eventloop import EventLoop, Timer


class ModeratedNotifier:
    """Wraps a QueueNotifier; `on_signal(sent)` hears each decision (sent or
    suppressed by the ring's rules)."""

    def __init__(
        self,
        notifier: QueueNotifier,
        loop: EventLoop,
        window_ns: int,
        on_signal: Callable[[bool], None] | None = None,
        may_defer: Callable[[], bool] | None = None,
    ) -> None:
        self.notifier = notifier
        self.loop = loop
        self.window_ns = window_ns
        self.on_signal = on_signal
        self.may_defer = may_defer
        self._last_ns = 0  # when we last signalled
        self._timer: Timer | None = None

    def completed(self) -> None:
        """Used entries were pushed: signal now, or at the end of the window."""
        if self._timer is not None:
            return  # a deferred signal is pending: it will cover these too
        now = time.monotonic_ns()
        due = self._last_ns + self.window_ns
        if now >= due or (self.may_defer is not None and not self.may_defer()):
            self._signal(now)
        else:
            self._timer = self.loop.call_at(due, self._deferred)

    def cancel(self) -> None:
        """The ring is gone: drop a pending signal."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deferred(self) -> None:
        self._timer = None
        self._signal(time.monotonic_ns())

    def _signal(self, now: int) -> None:
        sent = self.notifier.notify()
        if sent:
            self._last_ns = now
        if self.on_signal is not None:
            self.on_signal(sent)
