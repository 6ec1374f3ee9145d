"""A virtio-net device whose cable is looped back.

Every frame the driver transmits on queue pair N is received on pair N, with
a fresh virtio-net header. No host networking involved: it is the device the
protocol tests and the DPDK interop test drive, and a quick way to check a
guest driver or a front-end end to end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyvhost.device import QueueNotifier, VirtioDevice
from pyvhost.devices.net import spec
from pyvhost.virtq import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    SplitQueue,
)
from pyvhost.virtq.iov import scatter
from pyvhost.virtq.layout import VIRTIO_F_ACCESS_PLATFORM
from pyvhost.virtq.packed_layout import VIRTIO_F_RING_PACKED

log = logging.getLogger(__name__)


@dataclass
class LoopbackCounters:
    frames: int = 0
    bytes: int = 0
    truncated: int = 0
    discarded: int = 0


class LoopbackNet(VirtioDevice):
    name = "loopback-net"

    def __init__(self, queue_pairs: int = 1, mac: bytes = b"\x52\x54\x00\x12\x34\x56") -> None:
        self.queue_pairs = queue_pairs
        self.mac = mac
        self.acked_features = 0
        self.counters = LoopbackCounters()
        self._queues: dict[int, tuple[SplitQueue, QueueNotifier]] = {}
        self._enabled: set[int] = set()

    def features(self) -> int:
        bits = (
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_RING_PACKED,
            VIRTIO_F_ACCESS_PLATFORM,
            spec.F_MAC,
            spec.F_STATUS,
            spec.F_MRG_RXBUF,
        )
        return sum(1 << b for b in bits)

    def describe_features(self, bits: int) -> str:
        from pyvhost.devices.net.spec import feature_names

        return feature_names(bits)

    def num_queues(self) -> int:
        return 2 * self.queue_pairs

    def max_queue_num(self) -> int:
        return self.queue_pairs

    def config(self) -> bytes:
        return spec.CONFIG.pack(self.mac, spec.S_LINK_UP, self.queue_pairs, 1500)

    def queue_started(self, index: int, queue: SplitQueue, notifier: QueueNotifier) -> None:
        self._queues[index] = (queue, notifier)

    def queue_stopped(self, index: int) -> None:
        self._queues.pop(index, None)
        self._enabled.discard(index)

    def queue_enabled(self, index: int, enabled: bool) -> None:
        (self._enabled.add if enabled else self._enabled.discard)(index)

    def reset(self) -> None:
        self._queues.clear()
        self._enabled.clear()
        self.acked_features = 0

    def queue_kicked(self, index: int) -> None:
        self._forward(index // 2)

    def _forward(self, pair: int) -> None:
        tx = self._queues.get(spec.tx_queue(pair))
        if tx is None:
            return
        txq, tx_notifier = tx
        rx = self._queues.get(spec.rx_queue(pair))
        rx_ok = rx is not None and spec.rx_queue(pair) in self._enabled
        hdr_size = spec.header_size(self.acked_features)
        txq.disable_notification()
        while True:
            chain = txq.pop()
            if chain is None:
                if txq.enable_notification():
                    txq.disable_notification()
                    continue  # a frame slipped in while we re-armed
                break
            if not rx_ok:
                txq.push_used(chain.head, 0)
                self.counters.discarded += 1  # a disabled RX ring takes no packets
                continue
            rx_chain = rx[0].pop()
            if rx_chain is None:
                txq.unpop()  # the frame waits in its ring until RX buffers are posted
                break
            frame = b"".join(chain.readable)[hdr_size:]
            header = spec.HDR.pack(0, spec.GSO_NONE, 0, 0, 0, 0, 1)[:hdr_size]
            written = scatter(rx_chain.writable, header + frame)
            if written < hdr_size + len(frame):
                self.counters.truncated += 1
            txq.push_used(chain.head, 0)
            rx[0].push_used(rx_chain.head, written)
            self.counters.frames += 1
            self.counters.bytes += len(frame)
        tx_notifier.notify()
        if rx is not None:
            rx[1].notify()
