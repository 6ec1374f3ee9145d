"""The virtio-net device: features, config space, queues, control commands.

Queue layout (virtio 1.x 5.1.2): RX of pair N is queue 2N, TX is 2N+1, and
the control queue comes after all pairs. Each pair is bound to its own
host-side queue (a TAP fd); the datapath lives in datapath.QueuePair.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Protocol

from pyvhost.backends.link import LinkWatcher
from pyvhost.backends.vhost_net import VHOST_F_LOG_ALL, VhostNet, max_mem_regions
from pyvhost.device import QueueNotifier, RingConfig, ServedRing, VirtioDevice
from pyvhost.devices.net import ctrl, spec
from pyvhost.devices.net.datapath import HostQueue, QueuePair
from pyvhost.devices.net.engine import DatapathError, PairEngine
from pyvhost.devices.net.kernel import KernelPair, kernel_mask
from pyvhost.devices.net.metrics import QueueCounters, notify, queue_name
from pyvhost.devices.net.worker import WorkerPair
from pyvhost.errors import InvalidRequestError, InvalidRingIndexError, PyvhostError
from pyvhost.eventloop import EventLoop
from pyvhost.memory import GuestMemory
from pyvhost.virtq import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    SplitQueue,
)
from pyvhost.virtq.layout import VIRTIO_F_ACCESS_PLATFORM
from pyvhost.virtq.packed_layout import VIRTIO_F_RING_PACKED

log = logging.getLogger(__name__)

# Offload flags for TUNSETOFFLOAD (linux/if_tun.h), mirrored here so the
# device speaks to any host queue with the same vocabulary.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
ALL_TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN

OFFLOAD_FEATURES = (
    spec.F_CSUM,
    spec.F_GUEST_CSUM,
    spec.F_HOST_TSO4,
    spec.F_HOST_TSO6,
    spec.F_HOST_ECN,
    spec.F_GUEST_TSO4,
    spec.F_GUEST_TSO6,
    spec.F_GUEST_ECN,
    spec.F_CTRL_GUEST_OFFLOADS,
)
# The guest's receive offloads: what the TAP may hand over (see tun_offloads).
GUEST_OFFLOAD_MASK = sum(
    1 << b for b in (spec.F_GUEST_CSUM, spec.F_GUEST_TSO4, spec.F_GUEST_TSO6, spec.F_GUEST_ECN)
)
DEFAULT_MAC = bytes.fromhex("525400123456")


class HostInterface(HostQueue, Protocol):
    """What the device needs of a host-side queue beyond frames (the TAP offers it)."""

    name: str

    def set_vnet_hdr_size(self, size: int) -> None: ...

    def set_offload(self, flags: int) -> None: ...

    def offload_supported(self, flags: int) -> bool: ...

    def set_queue_attached(self, attached: bool) -> None: ...

    def link_up(self) -> bool: ...

    def set_mtu(self, mtu: int) -> None: ...


def _bit(n: int) -> int:
    return 1 << n


def _sum(a: QueueCounters, b: QueueCounters) -> QueueCounters:
    return QueueCounters(**{k: v + getattr(b, k) for k, v in a.as_dict().items()})


def tun_offloads(features: int) -> int:
    """TUNSETOFFLOAD flags for the guest's receive offloads, as QEMU derives them
    (net/tap-linux.c): TSO only with checksum offload, ECN only with TSO. The
    kernel refuses any other combination (EINVAL)."""
    if not features & _bit(spec.F_GUEST_CSUM):
        return 0
    flags = TUN_F_CSUM
    if features & _bit(spec.F_GUEST_TSO4):
        flags |= TUN_F_TSO4
    if features & _bit(spec.F_GUEST_TSO6):
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features & _bit(spec.F_GUEST_ECN):
        flags |= TUN_F_TSO_ECN
    return flags


class VirtioNet(VirtioDevice):
    name = "virtio-net"

    def __init__(
        self,
        hosts: list[HostInterface],
        *,
        mac: bytes = DEFAULT_MAC,
        mtu: int | None = None,
        poll_us: int = 0,
        tx_usecs: int = 0,
        rx_usecs: int = 0,
        rx_defer_us: int = 0,
        tx_defer_us: int = 0,
        vhosts: list[VhostNet] | None = None,
        migration: bool = True,
        workers: bool = False,
    ) -> None:
        """`poll_us`: busy-poll a TX ring this long after its last frame before
        asking for kicks again. `tx_usecs`, `rx_usecs`: signal that kind of ring
        at most once per so many microseconds (pyvhost.moderation). 0: off.
        `rx_defer_us`: in a stream of large frames into the guest, leave the TAP
        unread this long after an event that read few (datapath.RX_DEFER_AFTER);
        `tx_defer_us`: from the guest, drain this often with kicks off.
        `vhosts`: one vhost-net instance per host queue; the pairs then start on
        the kernel datapath and can be moved to Python and back while they run.
        `migration`: offer dirty logging (VHOST_F_LOG_ALL), which QEMU needs to
        live-migrate the guest. `workers`: each pair's Python datapath runs in
        a process of its own (worker.py), so pairs use more than one core."""
        if not hosts:
            raise ValueError("a virtio-net device needs at least one host queue")
        if vhosts and len(vhosts) != len(hosts):
            raise ValueError("one vhost-net instance per host queue")
        self.hosts = hosts
        self.vhosts = vhosts or []
        self.mac = self.configured_mac = mac
        self.mtu = mtu
        self.migration = migration
        self.workers = workers
        # A Python datapath's settings, the same for each pair and either engine.
        self.pair_settings = {
            "poll_ns": poll_us * 1000,
            "tx_window_ns": tx_usecs * 1000,
            "rx_window_ns": rx_usecs * 1000,
            "rx_defer_ns": rx_defer_us * 1000,
            "tx_defer_ns": tx_defer_us * 1000,
        }
        self.vnet_hdr = all(h.has_vnet_hdr for h in hosts)
        self.offloads = self.vnet_hdr and hosts[0].offload_supported(ALL_TUN_OFFLOADS)
        for h in hosts:
            if h.has_vnet_hdr:
                h.set_vnet_hdr_size(spec.HDR_SIZE)
        self.acked_features = 0
        self.rx_mode = ctrl.RxMode()
        # Queue pairs the driver chose through our control queue; None when it
        # does not use ours (QEMU keeps the control queue and tells us with
        # SET_VRING_ENABLE instead).
        self.ctrl_pairs: int | None = None
        self.ctrl_counters = QueueCounters()
        self.pairs: list[QueuePair] = []  # the Python datapath of each pair
        self.kernel_pairs: list[KernelPair] = [
            KernelPair(i, h, v) for i, (h, v) in enumerate(zip(hosts, self.vhosts, strict=False))
        ]
        self.worker_pairs: list[WorkerPair] = []  # a worker process per pair, on demand
        # The engine serving each pair now (engine.py): Python, a worker or the kernel.
        self.engines: list[PairEngine] = []
        # Pairs moved to the Python datapath while observed: the engine to go back to.
        self._moved_for_observers: dict[int, str] = {}
        self._data_rings: dict[int, RingConfig] = {}  # started RX/TX rings, by index
        self._enabled: set[int] = set()  # ... and which of them are enabled
        self._ctrl_ring: ServedRing | None = None
        self.on_reset: Callable[[], None] | None = None  # told when the driver goes
        self._ctrlq: SplitQueue | None = None
        self._ctrl_notifier: QueueNotifier | None = None

    @property
    def queue_pairs(self) -> int:
        return len(self.hosts)

    @property
    def ctrl_index(self) -> int:
        """Virtio 5.1.2: after all pairs with MQ; index 2 without it."""
        if self.acked_features & _bit(spec.F_MQ):
            return 2 * self.queue_pairs
        return 2

    def _is_ctrl(self, index: int) -> bool:
        return bool(self.acked_features & _bit(spec.F_CTRL_VQ)) and index == self.ctrl_index

    @property
    def negotiated_pairs(self) -> int:
        """Queue pairs the driver may use: all of them with MQ, else one (5.1.2)."""
        return self.queue_pairs if self.acked_features & _bit(spec.F_MQ) else 1

    def _check_ring(self, index: int) -> None:
        """Refuse a ring that the negotiated features do not give this device."""
        if self._is_ctrl(index) or index < 2 * self.negotiated_pairs:
            return
        pairs = self.negotiated_pairs
        why = (
            "MQ was not negotiated"
            if not self.acked_features & _bit(spec.F_MQ)
            else f"the device has {self.queue_pairs}"
        )
        raise InvalidRingIndexError(
            f"ring {index} is not a queue of this device: it serves {pairs} queue "
            f"pair{'s' if pairs > 1 else ''} ({why}); for more, start pyvhost with "
            f"--netdev tap,...,queues=N"
        )

    def attach(self, loop: EventLoop) -> None:
        super().attach(loop)
        self.pairs = [QueuePair(i, h, loop, **self.pair_settings) for i, h in enumerate(self.hosts)]
        self.worker_pairs = [
            WorkerPair(
                i,
                h,
                loop,
                settings=self.pair_settings,
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
            )
            for i, h in enumerate(self.hosts)
        ]
        if self.kernel_pairs:
            self.engines = list(self.kernel_pairs)
        elif self.workers:
            self.engines = list(self.worker_pairs)
        else:
            self.engines = list(self.pairs)
        self._update_tap_queues()
        self._watch_link()

    # --- link state, pushed to the driver --------------------------------------------

    def _watch_link(self) -> None:
        """Hear the TAP's link go down and up (netlink), to tell the driver."""
        self.link: LinkWatcher | None = None
        if not hasattr(self.hosts[0], "link_events"):
            return  # a host side without a link of its own (a switch port)
        try:
            self.link = LinkWatcher(self.hosts[0])
        except OSError as e:
            log.warning("link changes of %s will not reach the guest: %s", self.hosts[0].name, e)
            return
        self._link_fd = self.link.fileno()
        self.loop.add_reader(self._link_fd, self._on_link_event)

    def _on_link_event(self) -> None:
        changed = self.link.changed()
        if self.link.fileno() != self._link_fd:  # the TAP moved namespace: a new socket
            self.loop.remove_reader(self._link_fd)
            self._link_fd = self.link.fileno()
            self.loop.add_reader(self._link_fd, self._on_link_event)
        if changed:
            log.info("link of %s is %s", self.hosts[0].name, "up" if self.link.up else "down")
            if self.on_link_change is not None:
                self.on_link_change(self.link.up)

    # --- what the device offers ----------------------------------------------------

    def features(self) -> int:
        bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_RING_PACKED,
            VIRTIO_F_ACCESS_PLATFORM,
            spec.F_MAC,
            spec.F_STATUS,
            spec.F_MRG_RXBUF,
            spec.F_CTRL_VQ,
            spec.F_CTRL_RX,
            spec.F_CTRL_MAC_ADDR,
        ]
        if self.queue_pairs > 1:
            bits.append(spec.F_MQ)
        if self.mtu is not None:
            bits.append(spec.F_MTU)
        if self.offloads:
            bits += OFFLOAD_FEATURES
        features = sum(_bit(b) for b in bits)
        for k in self.kernel_pairs:  # only what both datapaths can serve
            features &= ~kernel_mask(k.supported)
        if self.kernel_pairs or self.workers:
            # Neither the kernel nor a worker is given the IOTLB: no device behind an IOMMU.
            features &= ~_bit(VIRTIO_F_ACCESS_PLATFORM)
        return features

    def describe_features(self, bits: int) -> str:
        text = spec.feature_names(bits)
        withheld = bits & sum(kernel_mask(k.supported) for k in self.kernel_pairs[:1])
        if withheld:
            text += f" ({spec.feature_names(withheld)}: the kernel's vhost-net lacks it)"
        return text

    def dirty_logging_unavailable(self) -> str | None:
        if not self.migration:
            return "turned off (--no-migration)"
        for k in self.kernel_pairs:
            if not k.supported & (1 << VHOST_F_LOG_ALL):
                return "this kernel's vhost-net lacks VHOST_F_LOG_ALL"
        return None

    def max_memory_regions(self) -> int | None:
        """With vhost=on, the kernel's table is the limit (vhost's max_mem_regions)."""
        return max_mem_regions() if self.kernel_pairs else None

    def num_queues(self) -> int:
        return 2 * self.queue_pairs + 1

    def max_queue_num(self) -> int:
        return self.queue_pairs

    def link_up(self) -> bool:
        try:
            return self.hosts[0].link_up()
        except OSError as e:
            log.warning("link state of %s unknown (%s); reporting up", self.hosts[0].name, e)
            return True

    def config(self) -> bytes:
        status = spec.S_LINK_UP if self.link_up() else 0
        return spec.CONFIG.pack(self.mac, status, self.queue_pairs, self.mtu or 1500)

    def set_mtu(self, mtu: int) -> None:
        """NET_SET_MTU: the VMM's host_mtu. The TAP is set to match when we may."""
        if not 68 <= mtu <= 65535:
            raise InvalidRequestError(f"MTU {mtu} is outside 68..65535")
        self.mtu = mtu
        try:
            self.hosts[0].set_mtu(mtu)
        except PyvhostError as e:
            log.warning(
                "guest MTU is %d but %s; set it on the host: ip link set dev %s mtu %d",
                mtu,
                e,
                self.hosts[0].name,
                mtu,
            )

    def send_rarp(self, mac: bytes) -> None:
        """Announce `mac` on the host side with a RARP broadcast (after migration)."""
        frame = (
            b"\xff" * 6
            + mac
            + struct.pack("!HHHBBH", 0x8035, 1, 0x0800, 6, 4, 3)
            + mac
            + bytes(4)
            + mac
            + bytes(4)
        ).ljust(60, b"\0")
        host = self.hosts[0]
        hdr = bytes(spec.header_size(self.acked_features)) if host.has_vnet_hdr else b""
        host.write_iovec([hdr + frame])

    # --- what happens to it ---------------------------------------------------------

    def set_features(self, features: int) -> None:
        self.acked_features = features
        hdr = spec.header_size(features)
        for h in self.hosts:
            if h.has_vnet_hdr:
                h.set_vnet_hdr_size(hdr)
        self._apply_guest_offloads(features & GUEST_OFFLOAD_MASK)
        for p in self.pairs:
            p.configure(features)
        for k in self.kernel_pairs:
            k.configure(features)
        for w in self.worker_pairs:
            w.configure(features)

    def _apply_guest_offloads(self, features: int) -> None:
        """Tell the TAP which offloaded frames the guest takes (TUNSETOFFLOAD).

        Whatever the driver negotiated, only a combination the kernel accepts is
        asked for, as QEMU's tap code derives it: TSO needs checksum offload,
        ECN needs TSO. Should the kernel refuse anyway, the TAP hands over
        plain frames (always correct for the guest), and the reason is logged.
        """
        if not self.vnet_hdr:
            return
        flags = tun_offloads(features)
        for h in self.hosts:
            try:
                h.set_offload(flags)
            except PyvhostError as e:
                log.warning("%s; the guest gets frames without offloads", e)
                h.set_offload(0)

    def _update_tap_queues(self) -> None:
        """A TAP queue takes frames only while its pair's RX ring is in use.

        Detached queues make the kernel steer flows to the others, so no frame
        waits on a queue the guest does not read.
        """
        for i, h in enumerate(self.hosts):
            rx_enabled = spec.rx_queue(i) in self._enabled
            in_use = rx_enabled and (self.ctrl_pairs is None or i < self.ctrl_pairs)
            h.set_queue_attached(in_use or self.queue_pairs == 1)

    # --- rings, as the transport starts and stops them ------------------------------

    def ring_started(self, config: RingConfig) -> None:
        index = config.index
        self._check_ring(index)
        if self._is_ctrl(index):
            ring = ServedRing(config, self.loop, self._process_ctrl_queue_event)
            self._ctrl_ring = ring
            self._ctrlq, self._ctrl_notifier = ring.queue, ring.notifier
            if self.acked_features & _bit(spec.F_MQ):
                self.ctrl_pairs = 1  # until VQ_PAIRS_SET, only the first pair (5.1.6.5.5)
                self._update_tap_queues()
            ring.watch()
            self._process_ctrl_queue_event()  # commands may be waiting (a reconnect)
            return
        self.engines[index // 2].start_ring(index % 2 == 0, config)
        self._data_rings[index] = config

    def ring_stopped(self, index: int) -> int:
        if self._data_rings.pop(index, None) is not None:
            self._enabled.discard(index)
            base = self.engines[index // 2].stop_ring(index % 2 == 0)
            if index % 2 == 0:
                self._update_tap_queues()
            return base
        ring, self._ctrl_ring = self._ctrl_ring, None
        self._ctrlq = self._ctrl_notifier = None
        return ring.stop()

    def ring_enabled(self, index: int, enabled: bool) -> None:
        if index not in self._data_rings:
            if enabled:
                self._process_ctrl_queue_event()
            return
        (self._enabled.add if enabled else self._enabled.discard)(index)
        self.engines[index // 2].set_ring_enabled(index % 2 == 0, enabled)
        if index % 2 == 0:
            self._update_tap_queues()

    def ring_fds_changed(self, index: int) -> None:
        if index in self._data_rings:
            self.engines[index // 2].ring_fds_changed(index % 2 == 0)
        elif self._ctrl_ring is not None:
            self._ctrl_ring.fds_changed()

    def reset(self) -> None:
        """Every ring has been stopped by the transport already."""
        for k in self.kernel_pairs:
            k.reset()  # the kernel lets go of the session's memory and eventfds
        if self.on_reset is not None:
            self.on_reset()
        self.acked_features = 0
        self.mac = self.configured_mac
        self.rx_mode = ctrl.RxMode()
        self.ctrl_pairs = None
        if self.vnet_hdr:
            for h in self.hosts:
                h.set_offload(0)
        if self.pairs:
            self._update_tap_queues()

    def detach(self) -> None:
        self.reset()
        for w in self.worker_pairs:
            w.close()
        link = getattr(self, "link", None)
        if link is not None:
            self.loop.remove_reader(self._link_fd)
            link.close()
            self.link = None

    # --- moving a pair between datapaths -----------------------------------------------

    def datapaths(self) -> list[str]:
        """Which datapath serves each pair now."""
        return [e.kind for e in self.engines]

    def host_io(self) -> list[dict[str, str]]:
        """How each pair's started rings cross to the host side now (PairEngine.host_io)."""
        return [e.host_io() for e in self.engines]

    # --- observers: hooks and captures, which only the Python datapath runs -----------

    def set_hooks(self, pair: int, hooks: list) -> None:
        self._observe(pair, lambda p: p.set_observers(hooks=hooks))

    def add_capture(self, capture, pair: int) -> None:
        self._observe(pair, lambda p: p.set_observers(captures=[*p.captures, capture]))

    def remove_capture(self, capture, pair: int) -> None:
        self._observe(
            pair, lambda p: p.set_observers(captures=[c for c in p.captures if c is not capture])
        )

    def _observe(self, pair: int, change: Callable[[QueuePair], None]) -> None:
        """Change a pair's observers. A pair on the kernel datapath moves to Python
        for its first observer (refused, with the reason, if it cannot move now)
        and back to the kernel when its last one goes."""
        p = self.pairs[pair]
        before = (list(p.hooks), list(p.captures))
        change(p)
        kind = self.engines[pair].kind
        if p.observed and kind != "python":
            try:
                self._switch(pair, "python")
            except DatapathError:
                p.set_observers(*before)
                raise
            self._moved_for_observers[pair] = kind
            log.info("pair %d: in the control process while hooks or a capture run", pair)
        elif not p.observed and pair in self._moved_for_observers:
            back = self._moved_for_observers.pop(pair)
            try:
                self._switch(pair, back)
            except DatapathError as e:
                log.warning("pair %d stays on the Python datapath: %s", pair, e)

    def switch_datapath(self, pair: int, kind: str) -> None:
        """Move pair `pair` to the "kernel", "python" or "worker" datapath while it runs.

        Each started ring stops on the old engine, which completes every chain
        it took and says where it stopped; the new engine goes on from that
        index with the same eventfds. No frame is lost, doubled or reordered,
        and the driver sees nothing.
        """
        if 0 <= pair < self.queue_pairs and kind != "python" and self.pairs[pair].observed:
            raise DatapathError(
                f"pair {pair} has hooks or a capture attached, which run in the control "
                f"process; remove them and it goes to the {kind} datapath"
            )
        self._switch(pair, kind)
        self._moved_for_observers.pop(pair, None)

    def _switch(self, pair: int, kind: str) -> None:
        if not 0 <= pair < self.queue_pairs:
            raise DatapathError(f"pair {pair}: the device has pairs 0 to {self.queue_pairs - 1}")
        if kind == "kernel":
            if not self.kernel_pairs:
                raise DatapathError(
                    "the kernel datapath needs vhost-net: start pyvhost with "
                    "--netdev tap,...,vhost=on"
                )
            new: PairEngine = self.kernel_pairs[pair]
        elif kind == "python":
            new = self.pairs[pair]
        elif kind == "worker":
            new = self.worker_pairs[pair]
        else:
            raise DatapathError(f"datapath {kind!r}: use kernel, python or worker")
        old = self.engines[pair]
        if old is new:
            return
        rings = [(rx, spec.rx_queue(pair) if rx else spec.tx_queue(pair)) for rx in (True, False)]
        rings = [(rx, i) for rx, i in rings if i in self._data_rings]
        if kind == "kernel" and any(self._data_rings[i].kick_fd is None for _, i in rings):
            raise DatapathError(f"pair {pair}: a polled ring (no kick fd) stays in Python")
        if kind == "worker" and any(
            not isinstance(self._data_rings[i].memory, GuestMemory) for _, i in rings
        ):
            raise DatapathError(
                f"pair {pair}: the device is behind a vIOMMU (ACCESS_PLATFORM), which "
                "only the control process serves"
            )
        if old.holds_frames():
            raise DatapathError(
                f"pair {pair}: a received frame waits for RX buffers the guest has not "
                "posted; try again once it takes frames"
            )
        for rx, i in rings:
            self._data_rings[i].base = old.stop_ring(rx)
        self.engines[pair] = new
        new.configure(self.acked_features)
        for rx, i in rings:
            new.start_ring(rx, self._data_rings[i])
            if i in self._enabled:
                new.set_ring_enabled(rx, True)
        log.info("pair %d: moved from the %s datapath to the %s one", pair, old.kind, kind)

    # --- counters ---------------------------------------------------------------------

    def counters(self) -> dict[str, QueueCounters]:
        out: dict[str, QueueCounters] = {}
        for p, w in zip(self.pairs, self.worker_pairs, strict=True):
            # Python's, here and in the pair's worker; the kernel keeps none per ring.
            rx, tx = p.rx_counters, p.tx_counters
            if w.pid is not None:
                rx, tx = (_sum(a, b) for a, b in zip((rx, tx), w.counters(), strict=True))
            out[queue_name(2 * p.pair, self.ctrl_index)] = rx
            out[queue_name(2 * p.pair + 1, self.ctrl_index)] = tx
        out["ctrl"] = self.ctrl_counters
        return out

    # --- the control queue -------------------------------------------------------------

    def _process_ctrl_queue_event(self) -> None:
        q = self._ctrlq
        if q is None:
            return
        c = self.ctrl_counters
        while (chain := q.pop()) is not None:
            try:
                cls, cmd, data = ctrl.parse_chain(chain)
            except ctrl.CommandError as e:
                c.errors += 1
                log.warning("malformed control command: %s", e)
                q.push_used(chain.head, 0)
                continue
            try:
                self._command(cls, cmd, data)
                status = ctrl.OK
                c.packets += 1
            except ctrl.CommandError as e:
                ctrl.log_refusal(cls, cmd, str(e))
                status = ctrl.ERR
                c.errors += 1
            q.push_used(chain.head, ctrl.ack(chain, status))
        notify(self._ctrl_notifier, c)

    def _need(self, bit: int, what: str) -> None:
        if not self.acked_features & _bit(bit):
            raise ctrl.CommandError(f"{what} needs a feature the driver did not negotiate")

    def _command(self, cls: int, cmd: int, data: bytes) -> None:
        if cls == spec.CTRL_RX and cmd in (spec.CTRL_RX_PROMISC, spec.CTRL_RX_ALLMULTI):
            self._need(spec.F_CTRL_RX, "RX mode")
            if len(data) != 1:
                raise ctrl.CommandError(f"RX mode takes 1 byte, got {len(data)}")
            if cmd == spec.CTRL_RX_PROMISC:
                self.rx_mode.promisc = bool(data[0])
            else:
                self.rx_mode.allmulti = bool(data[0])
        elif cls == spec.CTRL_MAC and cmd == spec.CTRL_MAC_ADDR_SET:
            self._need(spec.F_CTRL_MAC_ADDR, "MAC address set")
            if len(data) != 6:
                raise ctrl.CommandError(f"a MAC address is 6 bytes, got {len(data)}")
            self.mac = bytes(data)
        elif cls == spec.CTRL_MAC and cmd == spec.CTRL_MAC_TABLE_SET:
            self._need(spec.F_CTRL_RX, "MAC table set")
            self.rx_mode.mac_table = ctrl.parse_mac_table(data)
        elif cls == spec.CTRL_MQ and cmd == spec.CTRL_MQ_VQ_PAIRS_SET:
            self._need(spec.F_MQ, "queue pairs set")
            if len(data) != 2:
                raise ctrl.CommandError(f"queue pair count is 2 bytes, got {len(data)}")
            n = int.from_bytes(data, "little")
            if not 1 <= n <= self.queue_pairs:
                raise ctrl.CommandError(f"{n} queue pairs asked; the device has {self.queue_pairs}")
            self.ctrl_pairs = n
            self._update_tap_queues()
        elif cls == spec.CTRL_GUEST_OFFLOADS and cmd == spec.CTRL_GUEST_OFFLOADS_SET:
            self._need(spec.F_CTRL_GUEST_OFFLOADS, "guest offloads set")
            if len(data) != 8:
                raise ctrl.CommandError(f"offloads are a u64, got {len(data)} bytes")
            offloads = int.from_bytes(data, "little")
            allowed = self.acked_features & GUEST_OFFLOAD_MASK
            if offloads & ~allowed:
                raise ctrl.CommandError(
                    f"offloads 0x{offloads:x} include ones never negotiated (0x{allowed:x})"
                )
            self._apply_guest_offloads(offloads)
        else:
            raise ctrl.CommandError("unknown command")
