"""The interface between a transport (vhost-user) and a virtio device model.

A device says what it offers (features, config space, queue count) and is
told what happens to its rings: started, enabled or disabled, their fds
changed, stopped. It never sees sockets or messages, so the same device
could sit behind another transport.

A started ring is handed over as a `RingConfig`: plain data (where the ring
is in guest memory, the index to go on from, how it is notified) that any
engine can serve. pyvhost has three (DESIGN.md, "Datapath"): `ServedRing`
serves it here, in this event loop; the kernel's vhost-net serves it with
the same fds; a worker process serves it from its own mapping. Stopping a
ring on one engine gives the index another engine starts from, which is all
that live switching between them needs.

Simple devices (loopback, the protocol tests' recorder) keep the older,
smaller interface: the default `ring_*` methods serve every ring with a
`ServedRing` and call `queue_started`, `queue_kicked`, `queue_enabled` and
`queue_stopped`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvhost.errors import InvalidRequestError
from pyvhost.eventloop import EventLoop
from pyvhost.memory import GuestMemory
from pyvhost.virtq import SplitQueue
from pyvhost.virtq.packed import PackedQueue

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RingConfig:
    """One ring as the front-end set it up. The transport owns the fds; an engine
    uses them while it serves the ring and never closes them."""

    index: int
    size: int
    desc: int  # guest-physical addresses of the three parts
    avail: int
    used: int
    base: int  # where to serve from: the avail index (split), or 32-bit position (packed)
    memory: GuestMemory
    packed: bool = False  # VIRTIO_F_RING_PACKED: desc/avail/used are the ring and event areas
    event_idx: bool = False
    indirect: bool = False
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    polled: bool = False  # no kick fd: the front-end asked for the ring to be polled
    name: str = ""
    errors: list[str] = field(default_factory=list)  # why the ring broke, if it did
    # With dirty logging: the guest address where used-ring writes are logged
    # (SET_VRING_ADDR's log_guest_addr); None: the used ring's own.
    log_used: int | None = None

    def signal_error(self, error: Exception) -> None:
        """The ring broke (hostile or corrupt driver data): say so on its error
        eventfd. The ring stays dead until it is reset."""
        self.errors.append(str(error))
        if self.err_fd is not None:
            _eventfd_signal(self.err_fd)


class QueueNotifier:
    """Signals the driver (the call eventfd) only when the ring's rules say so."""

    __slots__ = ("queue", "call_fd")

    def __init__(self, queue: SplitQueue, call_fd: int | None) -> None:
        self.queue = queue
        self.call_fd = call_fd  # None: the front-end polls (no-fd flag)

    def notify(self) -> bool:
        """After pushing used buffers: signal if needed. True if signalled."""
        if self.queue.needs_notification() and self.call_fd is not None:
            _eventfd_signal(self.call_fd)
            return True
        return False


class ServedRing:
    """A ring served in this process: its SplitQueue, notifier and kick watch.

    `on_kick` runs when the driver kicks (or, for a polled ring, on every loop
    iteration). Nothing runs until `watch()`.
    """

    def __init__(self, config: RingConfig, loop: EventLoop, on_kick: Callable[[], None]) -> None:
        self.config = config
        self.loop = loop
        self.on_kick = on_kick
        name = config.name or f"ring {config.index}"
        if config.packed:
            self.queue = PackedQueue(
                config.memory,
                config.size,
                config.desc,
                config.avail,
                config.used,
                event_idx=config.event_idx,
                indirect=config.indirect,
                base=config.base,
                name=name,
                log_used=config.log_used,
            )
        else:
            self.queue = SplitQueue(
                config.memory,
                config.size,
                config.desc,
                config.avail,
                config.used,
                event_idx=config.event_idx,
                indirect=config.indirect,
                next_avail=config.base,
                name=name,
                log_used=config.log_used,
            )
        self.queue.on_broken = config.signal_error
        if self.queue.broken is not None:  # broke as it mapped its rings (an IOMMU's say)
            config.signal_error(self.queue.broken)
        # Behind an IOMMU: a translation the ring waited for arrived; serve it.
        self.queue.on_unstall = lambda: loop.call_soon(on_kick)
        self.notifier = QueueNotifier(self.queue, config.call_fd)
        self._kick_fd: int | None = None
        self._polled = False

    def watch(self) -> None:
        """Serve kicks from now on (with the config's current fds)."""
        self.unwatch()
        fd = self.config.kick_fd
        if fd is not None:
            self._kick_fd = fd
            self.loop.add_reader(fd, self._on_kick_fd)
        elif self.config.polled:
            self._polled = True
            self.loop.add_poller(self, self.on_kick)

    def unwatch(self) -> None:
        if self._kick_fd is not None:
            self.loop.remove_reader(self._kick_fd)
            self._kick_fd = None
        if self._polled:
            self.loop.remove_poller(self)
            self._polled = False

    def fds_changed(self) -> None:
        """The front-end replaced the ring's kick, call or error fd."""
        self.notifier.call_fd = self.config.call_fd
        if self._kick_fd is not None or self._polled:
            self.watch()

    def _on_kick_fd(self) -> None:
        fd = self._kick_fd
        if fd is None:
            return  # unwatched by an earlier callback in this loop iteration
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        self.on_kick()

    def stop(self) -> int:
        """Stop serving; returns where to go on from (GET_VRING_BASE's value)."""
        self.unwatch()
        base = self.queue.vring_base
        self.queue.close()
        return base


class VirtioDevice:
    """Base class of device models. Override what the device supports."""

    name = "virtio"

    # Set by the transport: call it when the device's link goes down or up, so
    # the driver hears of it (a config change message, or the transport's own way).
    on_link_change: Callable[[bool], None] | None = None

    def attach(self, loop: EventLoop) -> None:
        """Called once, before any ring starts: register host-side fds here."""
        self.loop = loop
        self._served: dict[int, ServedRing] = {}

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

    def describe_features(self, bits: int) -> str:
        """Feature bits as a user should read them in an error message."""
        return f"0x{bits:x}"

    def dirty_logging_unavailable(self) -> str | None:
        """None if the device can have its writes logged for live migration,
        else why not (it is then not offered)."""
        return None

    def max_memory_regions(self) -> int | None:
        """A limit on guest memory regions below the transport's own, or None."""
        return None

    def config(self) -> bytes:
        """The device's config space as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        raise InvalidRequestError(f"{self.name} config space is read-only")

    def set_mtu(self, mtu: int) -> None:
        raise InvalidRequestError(f"{self.name} has no MTU")

    def send_rarp(self, mac: bytes) -> None:
        raise InvalidRequestError(f"{self.name} cannot announce a MAC address")

    # --- what happens to it: the transport calls these -------------------------------

    def set_features(self, features: int) -> None:
        """The front-end acknowledged these virtio features."""
        self.acked_features = features

    def ring_started(self, config: RingConfig) -> None:
        """Serve ring `config.index` from `config.base` on. Raise a ProtocolError to
        refuse it (a ring the negotiated features do not give the device)."""
        ring = ServedRing(config, self.loop, lambda: self.queue_kicked(config.index))
        try:
            self.queue_started(config.index, ring.queue, ring.notifier)
        except BaseException:
            ring.stop()
            raise
        self._served[config.index] = ring
        ring.watch()
        # Buffers may already be waiting (a reconnect): look once without a kick.
        self.queue_kicked(config.index)

    def ring_stopped(self, index: int) -> int:
        """Stop serving ring `index`; returns the avail index to go on from."""
        ring = self._served.pop(index)
        try:
            self.queue_stopped(index)
        finally:
            base = ring.stop()
        return base

    def ring_enabled(self, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE on a started ring. Disabled rings are processed
        without side effects."""
        self.queue_enabled(index, enabled)
        if enabled:
            self.queue_kicked(index)

    def ring_fds_changed(self, index: int) -> None:
        """The front-end replaced a started ring's kick, call or error fd."""
        self._served[index].fds_changed()

    def reset(self) -> None:
        """Back to the state before negotiation (RESET_DEVICE, or a front-end left).
        Every ring has been stopped already."""

    # --- the smaller interface of devices served by ServedRing ------------------------

    def queue_started(self, index: int, queue: SplitQueue, notifier: QueueNotifier) -> None:
        raise NotImplementedError

    def queue_stopped(self, index: int) -> None:
        raise NotImplementedError

    def queue_enabled(self, index: int, enabled: bool) -> None:
        """Started but disabled rings are processed without side effects."""

    def queue_kicked(self, index: int) -> None:
        """The driver made buffers available on queue `index`."""
        raise NotImplementedError


def _eventfd_signal(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # counter saturated: the other side has a wakeup pending anyway
