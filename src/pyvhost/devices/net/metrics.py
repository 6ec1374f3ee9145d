"""Per-queue counters of the virtio-net device: plain numbers, read by anyone."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pyvhost.device import QueueNotifier


@dataclass
class QueueCounters:
    packets: int = 0
    bytes: int = 0
    drops: int = 0  # frames not delivered for a reason the peer caused (ring disabled, ...)
    errors: int = 0  # malformed chains, I/O errors
    kicks: int = 0  # times the ring was served for a kick (and once when it starts)
    notifications_sent: int = 0
    notifications_suppressed: int = 0
    # A stream's deferrals: RX, the TAP left unread to gather frames; TX, a
    # drain put off with kicks left off (datapath's RX_/TX_DEFER_AFTER).
    deferrals: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def queue_name(index: int, ctrl_index: int) -> str:
    if index == ctrl_index:
        return "ctrl"
    return f"{'rx' if index % 2 == 0 else 'tx'}{index // 2}"


def count_signal(c: QueueCounters, sent: bool) -> None:
    """Count one decision to signal the driver: sent, or suppressed by the ring's rules."""
    if sent:
        c.notifications_sent += 1
    else:
        c.notifications_suppressed += 1


def notify(notifier: QueueNotifier | None, c: QueueCounters) -> None:
    """Signal the driver if the ring's rules say so, and count which it was."""
    if notifier is not None:
        count_signal(c, notifier.notify())
