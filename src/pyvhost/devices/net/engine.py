"""What serves a queue pair's rings: one interface, several engines.

The device (control plane) keeps each started ring's RingConfig and hands it
to the engine serving the pair: QueuePair (datapath.py, Python, in this
process), KernelPair (kernel.py, the kernel's vhost-net). Stopping a ring on
an engine completes what it took and returns the avail index to go on from;
any engine can start the ring from there. That one contract is what moving a
pair between datapaths while it runs is built on (DESIGN.md, "Datapath").
"""

from __future__ import annotations

from typing import Protocol

from pyvhost.device import RingConfig
from pyvhost.errors import PyvhostError


class DatapathError(PyvhostError):
    """A datapath change that cannot be made now: says why and what to do."""


class PairEngine(Protocol):
    """Serves the RX (2N) and TX (2N+1) rings of one queue pair."""

    kind: str  # "python", "kernel"

    def configure(self, features: int) -> None:
        """The virtio features the driver acked (header size, MRG_RXBUF...)."""

    def start_ring(self, rx: bool, config: RingConfig) -> None:
        """Serve the ring from config.base on, with config's eventfds."""

    def stop_ring(self, rx: bool) -> int:
        """Stop serving the ring, every chain taken completed; the next avail index."""

    def set_ring_enabled(self, rx: bool, enabled: bool) -> None:
        """SET_VRING_ENABLE: a disabled ring moves no frames."""

    def ring_fds_changed(self, rx: bool) -> None:
        """The front-end replaced a started ring's kick, call or error fd."""

    def holds_frames(self) -> bool:
        """Would stopping RX now drop a frame already taken from the host side?"""

    def host_io(self) -> dict[str, str]:
        """How each started ring's frames cross to the host side now, by "rx" and
        "tx": "readv"/"writev" frame by frame, "io_uring" in batches, "kernel",
        or "switch" (a port of pyvhost's switch)."""
