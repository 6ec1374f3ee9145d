"""What a virtqueue does when its addresses go through an IOMMU's IOTLB.

A queue over an IommuAddressSpace may find a ring or a buffer without a
translation (IotlbMiss). It then stalls: nothing is consumed or dropped, the
miss has been sent to the front-end (the address space's on_miss), and pop()
returns None until an IOTLB update arrives; then the queue maps its rings if
they were missing and `on_unstall` asks the device to serve it again. An
invalidation under a ring unmaps it until it is translated again.
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
)
from pyvhost.memory import Pin

log = logging.getLogger(__name__)


class IotlbStalls:
    """Mixed into SplitQueue and PackedQueue; they provide the ring hooks below."""

    stalled: IotlbMiss | None = None
    on_unstall: Callable[[], None] | None = None
    name: str

    def _rings_mapped(self) -> bool:
        raise NotImplementedError

    def _ring_ranges(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _unmap_rings(self) -> None:
        raise NotImplementedError

    def region_added(self, region) -> None:
        raise NotImplementedError

    def _break(self, error) -> None:
        raise NotImplementedError

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
