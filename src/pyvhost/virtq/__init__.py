"""The split virtqueue: device side (SplitQueue) and driver side (DriverQueue)."""

from pyvhost.virtq.driver import DriverQueue, ring_footprint
from pyvhost.virtq.layout import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from pyvhost.virtq.split import DescriptorChain, SplitQueue

__all__ = [
    "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "DescriptorChain",
    "DriverQueue",
    "SplitQueue",
    "ring_footprint",
]
