"""Interrupt moderation: at once on an idle ring, at most once per window on a busy one.

The wrapped notifier is a recording stand-in: moderation only calls its
notify(); the ring rules behind a real QueueNotifier are tested in virtq/.
"""

from __future__ import annotations

import time

from pyvhost.eventloop import EventLoop
from pyvhost.moderation import ModeratedNotifier

WINDOW_NS = 50_000_000  # 50 ms: long enough that "not yet" holds on a slow machine


class RecordingNotifier:
    def __init__(self) -> None:
        self.signals: list[int] = []

    def notify(self) -> bool:
        self.signals.append(time.monotonic_ns())
        return True


def moderated(window_ns: int = WINDOW_NS, **kw) -> tuple[ModeratedNotifier, RecordingNotifier]:
    rec = RecordingNotifier()
    return ModeratedNotifier(rec, EventLoop(), window_ns, **kw), rec


def test_a_lone_completion_is_signalled_at_once():
    m, rec = moderated()
    m.completed()
    assert len(rec.signals) == 1


def test_completions_inside_the_window_share_one_signal_at_its_end():
    m, rec = moderated()
    m.completed()
    first = rec.signals[0]
    for _ in range(5):
        m.completed()
    m.loop.run_once(0)
    assert len(rec.signals) == 1  # deferred, not dropped, not sent
    m.loop.run(until=lambda: len(rec.signals) == 2, timeout=1.0)
    assert rec.signals[1] >= first + WINDOW_NS
    for _ in range(3):
        m.loop.run_once(0)
    assert len(rec.signals) == 2  # one signal covered all five


def test_a_zero_window_signals_every_completion():
    m, rec = moderated(window_ns=0)
    for _ in range(4):
        m.completed()
    assert len(rec.signals) == 4


def test_a_completion_the_device_will_not_delay_is_signalled_inside_the_window():
    m, rec = moderated(may_defer=lambda: False)
    m.completed()
    m.completed()
    assert len(rec.signals) == 2


def test_on_signal_hears_every_decision():
    heard = []
    m, rec = moderated(on_signal=heard.append)
    m.completed()
    assert heard == [True]


def test_cancel_drops_a_pending_signal():
    m, rec = moderated()
    m.completed()
    m.completed()  # inside the window: deferred
    m.cancel()
    time.sleep(WINDOW_NS / 1e9)
    m.loop.run_once(0)
    assert len(rec.signals) == 1
