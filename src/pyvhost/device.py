"""The interface between the vhost-user protocol and a virtio device model.

A device says what it offers (features, config space, queue count) and is
told what happens to its queues: started (with a SplitQueue over guest
memory and a notifier for the driver), enabled or disabled, kicked, stopped.
It never sees sockets or messages, so the same device could sit behind
another transport.
"""

from __future__ import annotations

import logging
import os

from pyvhost.errors import InvalidRequestError
from pyvhost.eventloop import EventLoop
from pyvhost.virtq import SplitQueue

log = logging.getLogger(__name__)


class QueueNotifier:
    """Signals the driver (the call eventfd) only when the ring's rules say so."""

    __slots__ = ("queue", "call_fd")

    def __init__(self, queue: SplitQueue, call_fd: int | None) -> None:
        self.queue = queue
        self.call_fd = call_fd  # None: the front-end polls (no-fd flag)

    def notify(self) -> bool:
        """After pushing used buffers: signal if needed. True if signalled."""
        if self.queue.needs_notification() and self.call_fd is not None:
            try:
                os.eventfd_write(self.call_fd, 1)
            except BlockingIOError:
                pass  # counter saturated: the driver has a wakeup pending anyway
            return True
        return False


class VirtioDevice:
    """Base class of device models. Override what the device supports."""

    name = "virtio"

    def attach(self, loop: EventLoop) -> None:
        """Called once, before any queue starts: register host-side fds here."""
        self.loop = loop

    def detach(self) -> None:
        """The daemon is shutting down."""

    # --- what the device offers -------------------------------------------------

    def features(self) -> int:
        """Virtio feature bits offered (device, ring and transport bits)."""
        raise NotImplementedError

    def num_queues(self) -> int:
        """How many virtqueues the device has."""
        raise NotImplementedError

    def max_queue_num(self) -> int:
        """GET_QUEUE_NUM's answer (for net devices: queue pairs)."""
        return self.num_queues()

    def config(self) -> bytes:
        """The device's config space as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        raise InvalidRequestError(f"{self.name} config space is read-only")

    def set_mtu(self, mtu: int) -> None:
        raise InvalidRequestError(f"{self.name} has no MTU")

    def send_rarp(self, mac: bytes) -> None:
        raise InvalidRequestError(f"{self.name} cannot announce a MAC address")

    # --- what happens to it -------------------------------------------------------

    def set_features(self, features: int) -> None:
        """The front-end acknowledged these virtio features."""
        self.acked_features = features

    def queue_started(self, index: int, queue: SplitQueue, notifier: QueueNotifier) -> None:
        raise NotImplementedError

    def queue_stopped(self, index: int) -> None:
        raise NotImplementedError

    def queue_enabled(self, index: int, enabled: bool) -> None:
        """Started but disabled rings are processed without side effects."""

    def queue_kicked(self, index: int) -> None:
        """The driver made buffers available on queue `index`."""
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the state before negotiation (RESET_DEVICE, or a front-end left)."""
