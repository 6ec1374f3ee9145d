"""Where a virtqueue's rings are, and keeping them mapped as memory changes.

Shared by the split and packed queues: the placement checks of their ring
parts, the pins that map each part as one view, and what happens when the
memory under them changes. A region removed under a ring unmaps it, and the
queue idles until the ring is in guest memory again. Behind an IOMMU a queue
may find a ring or a buffer without a translation (IotlbMiss). It then
stalls: nothing is consumed or dropped, the miss has been sent to the
front-end (the address space's on_miss), and pop() returns None until an
IOTLB update arrives; then the queue maps its rings if they were missing and
`on_unstall` asks the device to serve it again. An invalidation under a ring
unmaps it until it is translated again. A queue that meets an error it
cannot go on from breaks, once, and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pyvhost.errors import (
    DescriptorMemoryError,
    GuestMemoryError,
    IotlbAccessError,
    IotlbMiss,
    QueueConfigError,
    QueueError,
)
from pyvhost.memory import Pin

log = logging.getLogger(__name__)


def check_alignment(name: str, parts) -> None:
    """QueueConfigError for the first (what, guest address, alignment) ring
    part whose address the ring's layout does not allow."""
    for what, addr, align in parts:
        if addr % align:
            raise QueueConfigError(f"{name}: {what} at 0x{addr:x} is not {align}-aligned")


class RingMapping:
    """Mixed into SplitQueue and PackedQueue; they provide the ring hooks below."""

    stalled: IotlbMiss | None = None
    on_unstall: Callable[[], None] | None = None
    # Called once, when the queue breaks, whoever was driving it (a kick, a
    # host-side event, a busy poller): the transport tells the driver.
    on_broken: Callable[[QueueError], None] | None = None
    broken: QueueError | None = None
    name: str
    _pins: list[Pin]

    def _rings_mapped(self) -> bool:
        raise NotImplementedError

    def _ring_ranges(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _map_rings(self) -> None:
        raise NotImplementedError

    def _unmap_rings(self) -> None:
        raise NotImplementedError

    def region_added(self, region) -> None:
        if not self._rings_mapped():
            try:
                self._map_rings()
            except QueueConfigError:
                pass  # still not all there; stay idle

    def region_removed(self, region) -> None:
        if any(region in p.regions for p in self._pins):
            self._unmap_rings()
            try:
                self._map_rings()
            except QueueConfigError as e:
                log.warning(
                    "%s: rings are no longer in guest memory; idle until they are: %s", self.name, e
                )

    def _break(self, error: QueueError) -> None:
        if self.broken is not None:
            return  # the first error is the one reported
        # Kept for its message only: its traceback's frames hold views of guest
        # memory, and a queue that points at them (a cycle) would keep the
        # mapping, and its fd, until Python's cycle collector happened to run.
        error.__traceback__ = error.__context__ = error.__cause__ = None
        self.broken = error
        log.error("%s: queue broken: %s", self.name, error)
        if self.on_broken is not None:
            self.on_broken(error)

    def _pin_rings(self, memory, parts) -> list[Pin] | None:
        """Pin each (what, guest address, length, write) ring part as one view.
        None: behind an IOMMU the queue stalled (a miss) or broke (forbidden);
        raises QueueConfigError if a part is not in guest memory."""
        pins: list[Pin] = []
        try:
            for what, addr, length, write in parts:
                pin = memory.pin(addr, length, write=write)
                pins.append(pin)
                if len(pin.views) != 1:
                    raise QueueConfigError(
                        f"{self.name}: {what} at 0x{addr:x} crosses a memory region boundary"
                    )
        except (IotlbMiss, IotlbAccessError, GuestMemoryError, QueueConfigError) as e:
            for p in pins:
                p.release()
            if isinstance(e, IotlbMiss):  # idle until translated
                self._stall(e)
            elif isinstance(e, IotlbAccessError):  # the vIOMMU forbids what a ring needs
                self._break(DescriptorMemoryError(f"a ring at its I/O virtual address: {e}"))
            elif isinstance(e, GuestMemoryError):
                raise QueueConfigError(f"{self.name}: ring is not in guest memory: {e}") from e
            else:
                raise
            return None
        return pins

    def _stall(self, miss: IotlbMiss) -> None:
        if self.stalled is None:
            log.info("%s: waiting for the IOTLB: %s", self.name, miss)
        self.stalled = miss

    def iotlb_updated(self, iova: int, size: int) -> None:
        if self.stalled is None and self._rings_mapped():
            return
        if self.stalled is not None and not iova <= self.stalled.iova < iova + size:
            return  # not what this queue waits for: asking again would repeat its miss
        self.stalled = None
        if not self._rings_mapped():
            self.region_added(None)  # map them now, or stall again on the next miss
        if self.stalled is None and self._rings_mapped() and self.on_unstall is not None:
            self.on_unstall()

    def iotlb_invalidated(self, iova: int, size: int) -> None:
        if not self._rings_mapped():
            return
        end = iova + size
        if any(a < end and iova < a + n for a, n in self._ring_ranges()):
            self._unmap_rings()
            self.region_added(None)  # translated again at once if still mapped elsewhere
