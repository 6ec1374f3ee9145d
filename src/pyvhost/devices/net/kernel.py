"""The kernel datapath of one queue pair: the rings handed to vhost-net.

As QEMU's hw/virtio/vhost.c does for a tap netdev with vhost=on, but with
pyvhost as the process whose memory vhost-net reads: the memory table is
derived from pyvhost's own GuestMemory (a MemoryListener, replaced whole at
each committed change), the ring addresses are pyvhost's mappings of the
rings, and the front-end's own kick, call and error eventfds are passed
straight through, so no Python runs per packet. The TAP queue is the
backend (VHOST_NET_SET_BACKEND) while the ring is enabled.

Stopping a ring detaches the backend (the kernel completes what it had in
flight) and reads the next avail index (VHOST_GET_VRING_BASE): the Python
datapath, or the kernel again, goes on from there.
"""

from __future__ import annotations

import logging
import os

from pyvhost.backends.vhost_net import (
    RX,
    TX,
    VHOST_F_LOG_ALL,
    VHOST_NET_F_VIRTIO_NET_HDR,
    VhostNet,
)
from pyvhost.device import RingConfig
from pyvhost.devices.net import spec
from pyvhost.devices.net.metrics import QueueCounters
from pyvhost.errors import InvalidRequestError
from pyvhost.memory import GuestMemory, MemoryRegion
from pyvhost.virtq.layout import avail_ring_size, desc_table_size, used_ring_size

log = logging.getLogger(__name__)

# Ring and transport bits the kernel's vhost-net implements itself (QEMU's
# kernel_feature_bits): the device offers them only as far as the kernel
# does. Everything else (offloads, MAC, control queue, config) stays
# pyvhost's, with the TAP doing the offloads.
KERNEL_FEATURE_BITS = (24, 28, 29, spec.F_MRG_RXBUF, 32, 33, 34, 40)


def kernel_mask(supported: int) -> int:
    """The feature bits to withhold from the front-end: kernel bits the kernel lacks."""
    bits = sum(1 << b for b in KERNEL_FEATURE_BITS)
    return bits & ~supported


class KernelPair:
    """RX 2N and TX 2N+1 served by one vhost-net instance, on TAP queue N."""

    kind = "kernel"

    def __init__(self, pair: int, host, vhost: VhostNet) -> None:
        self.pair = pair
        self.host = host
        self.vhost = vhost
        self.supported = vhost.get_features()
        self.rx_counters = QueueCounters()  # the kernel keeps none: these stay still
        self.tx_counters = QueueCounters()
        self._features = 0
        self._configs: dict[bool, RingConfig] = {}  # rx -> the ring it serves
        self._enabled = {True: False, False: False}
        self._memory: GuestMemory | None = None
        self._addresses: dict[bool, tuple[int, int, int, int | None]] = {}
        self._logging = False  # LOG_ALL set in the kernel

    # --- the engine interface ----------------------------------------------------------

    def configure(self, features: int) -> None:
        self._features = features

    def start_ring(self, rx: bool, config: RingConfig) -> None:
        if config.kick_fd is None:
            raise InvalidRequestError(
                f"ring {config.index}: the kernel datapath needs a kick eventfd; this "
                "front-end asked for a polled ring (use vhost=off)"
            )
        self._begin(config.memory)
        index = RX if rx else TX
        v = self.vhost
        v.set_vring_num(index, config.size)
        v.set_vring_base(index, config.base)
        self._configs[rx] = config
        self._set_addresses(rx)
        self._set_fds(index, config)
        if self._enabled[rx]:
            v.set_backend(index, self.host.fileno())
        # A previous engine may have left kicks disabled: look at the ring now.
        os.eventfd_write(config.kick_fd, 1)

    def stop_ring(self, rx: bool) -> int:
        config = self._configs.pop(rx)
        index = RX if rx else TX
        v = self.vhost
        v.set_backend(index, None)  # the kernel finishes what it holds, then stops
        base = v.get_vring_base(index)
        for unbind in (v.set_vring_kick, v.set_vring_call, v.set_vring_err):
            unbind(index, None)  # the kernel lets go of the front-end's eventfds
        self._addresses.pop(rx, None)
        self._enabled[rx] = False
        if not self._configs:
            self._end()
        log.debug("pair %d %s: kernel stopped at %d (%s)", self.pair, _name(rx), base, config.name)
        return base

    def set_ring_enabled(self, rx: bool, enabled: bool) -> None:
        self._enabled[rx] = enabled
        if rx in self._configs:
            self.vhost.set_backend(RX if rx else TX, self.host.fileno() if enabled else None)

    def ring_fds_changed(self, rx: bool) -> None:
        self._set_fds(RX if rx else TX, self._configs[rx])

    def holds_frames(self) -> bool:
        return False  # the kernel completes everything it took when its backend goes

    def host_io(self) -> dict[str, str]:
        return {_name(rx): "kernel" for rx in self._configs}

    def close(self) -> None:
        for rx in list(self._configs):
            self.stop_ring(rx)

    def reset(self) -> None:
        """The front-end is gone: a fresh instance for the next one (the kernel
        drops its memory table and any eventfd it still held). Ownership is
        taken again when the next session starts a ring."""
        self.close()
        self.vhost.reset_owner()

    # --- the memory table ---------------------------------------------------------------

    def _begin(self, memory: GuestMemory) -> None:
        """First ring of a session: features, then the memory table, kept current."""
        if self._memory is memory:
            return
        self._end()
        self.vhost.set_owner()  # after a reset; a no-op while still owned
        self._memory = memory
        memory.add_listener(self)
        self._apply_log()
        self.map_committed()

    def _acked(self) -> int:
        """The features the kernel is told: the ring's, and LOG_ALL while logging."""
        acked = self._features & self.supported & ~(1 << VHOST_NET_F_VIRTIO_NET_HDR)
        acked &= ~(1 << VHOST_F_LOG_ALL)
        if self._logging:
            acked |= 1 << VHOST_F_LOG_ALL
        if not self.host.has_vnet_hdr:
            acked |= 1 << VHOST_NET_F_VIRTIO_NET_HDR  # the TAP has none: vhost adds it
        return acked

    def _apply_log(self) -> None:
        """Tell the kernel about the memory's dirty log, in the order it checks
        them: the log's address, then LOG_ALL, then the used rings' log addresses
        (as QEMU's vhost_dev_set_log does)."""
        dirty = self._memory.log if self._memory is not None else None
        v = self.vhost
        if dirty is not None:
            v.set_log_base(dirty.host_address)
            v.set_log_fd(dirty.notify_fd)
        self._logging = dirty is not None
        v.set_features(self._acked())
        self._addresses.clear()  # the log flag is part of each ring's address
        for rx in list(self._configs):
            self._set_addresses(rx)
        if dirty is None:
            v.set_log_fd(None)

    def log_changed(self) -> None:
        """GuestMemory's dirty log came or went (a live migration began or ended)."""
        if self._memory is not None:
            self._apply_log()
            log.info("pair %d: kernel dirty logging %s", self.pair,
                     "on" if self._logging else "off")  # fmt: skip

    def _end(self) -> None:
        if self._memory is not None:
            try:
                self._memory.remove_listener(self)
            except ValueError:
                pass
            self._memory = None

    def region_added(self, region: MemoryRegion) -> None:
        pass  # the whole table is replaced when the change is committed

    def region_removed(self, region: MemoryRegion) -> None:
        pass

    def map_committed(self) -> None:
        """The map changed: the kernel gets the new table, before any removed region
        is unmapped, and rings whose mapping moved get their new addresses."""
        memory = self._memory
        if memory is None:
            return
        self.vhost.set_mem_table((r.start, r.size, r.host_address) for r in memory.regions)
        for rx in list(self._configs):
            try:
                self._set_addresses(rx)
            except Exception as e:  # rings outside the map: they idle until it returns
                log.warning("pair %d %s: %s", self.pair, _name(rx), e)

    def _set_addresses(self, rx: bool) -> None:
        c = self._configs[rx]
        memory = c.memory
        addresses = (
            memory.host_address(c.desc, desc_table_size(c.size)),
            memory.host_address(c.used, used_ring_size(c.size)),
            memory.host_address(c.avail, avail_ring_size(c.size)),
        )
        log_used = None
        if self._logging:
            log_used = c.used if c.log_used is None else c.log_used
        if self._addresses.get(rx) != (*addresses, log_used):
            self.vhost.set_vring_addr(RX if rx else TX, *addresses, log=log_used)
            self._addresses[rx] = (*addresses, log_used)

    def _set_fds(self, index: int, c: RingConfig) -> None:
        self.vhost.set_vring_kick(index, c.kick_fd)
        self.vhost.set_vring_call(index, c.call_fd)
        self.vhost.set_vring_err(index, c.err_fd)


def _name(rx: bool) -> str:
    return "rx" if rx else "tx"
