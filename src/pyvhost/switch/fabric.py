"""The switch: ports, a MAC table with ageing, 802.1Q VLANs, per-port MTU and hooks.

No sockets or rings here: a port is anything with `transmit(frame) -> bool`
(a VM's virtio-net RX ring, a TAP) and the switch is told of each frame a
port sends with `ingress(port, frame)`. Forwarding is synchronous: the frame
is still the sender's guest memory when the receiving port copies it into
its own ring, so a frame crosses from VM to VM with one copy.

Per port, in order: VLAN classification (an access port's frames are in its
VLAN and must come untagged; a trunk's carry an allowed tag, or are its
native VLAN), "in" hooks, the MAC policy, learning the source, then the
destination port (known unicast) or every other port in the VLAN (flood);
at each destination: "out" hooks, the VLAN tag for a trunk, the MTU, and
the offloads it takes (segmenting or checksumming in software where not).
Every frame not delivered is counted by reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from pyvhost import hooks
from pyvhost.hooks import DROP, IN, OUT, HookContext, LoadedHook, Redirect
from pyvhost.switch.frame import (
    ALL_OFFLOADS,
    ETH_HLEN,
    Frame,
    FrameError,
    adapt,
    add_tag,
    strip_tag,
)

log = logging.getLogger(__name__)

DEFAULT_AGEING_S = 300.0
MAX_VLAN = 4094

# Why a frame was not delivered (the keys of PortCounters.drops).
DROP_REASONS = (
    "malformed",  # shorter than an Ethernet header, or a GSO header that lies
    "vlan",  # tagged on an access port, or a VLAN the port does not carry
    "spoofed",  # a source MAC other than the port's, with mac_policy lock
    "hook",  # a hook said drop
    "hook-error",  # a hook raised
    "mtu",  # larger than the receiving port's MTU
    "port-down",  # the receiving VM is not there (not connected, rings stopped)
    "no-room",  # the receiving ring (and its backlog) was full
    "unknown-port",  # a hook redirected to a port that does not exist
)


@dataclass
class PortConfig:
    name: str
    vlan: int | None = None  # access VLAN (None: untagged, VLAN 0)
    trunk: frozenset[int] | None = None  # VLANs carried tagged
    native: int | None = None  # a trunk's untagged VLAN
    mtu: int = 1500
    mac: bytes | None = None
    mac_policy: str = "learn"  # "lock": only `mac` may send from this port
    hooks: tuple[str, ...] = ()


@dataclass
class PortCounters:
    rx_packets: int = 0  # frames the port sent into the switch
    rx_bytes: int = 0
    tx_packets: int = 0  # frames the switch delivered to the port
    tx_bytes: int = 0
    drops: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "drops": dict(self.drops),
        }


class Port:
    """A switch port. Subclasses move frames: `transmit` delivers one to the
    port's side (True if taken); they call `switch.ingress` with what it sends."""

    kind = "port"

    def __init__(self, config: PortConfig) -> None:
        self.config = config
        self.name = config.name
        self.counters = PortCounters()
        self.hooks: list[LoadedHook] = []
        self.offloads = 0  # what the port takes (TUN_F_*): set by its device
        self.captures: list = []  # capture sessions watching this port
        self.switch: Switch | None = None

    @property
    def up(self) -> bool:
        return True

    def transmit(self, frame: Frame) -> bool:
        raise NotImplementedError

    def carries(self, vlan: int) -> bool:
        """Does this port carry frames of `vlan` (0: untagged)?"""
        c = self.config
        if c.trunk is not None:
            return vlan in c.trunk or vlan == (c.native or 0)
        return vlan == (c.vlan or 0)

    def describe(self) -> dict:
        c = self.config
        return {
            "kind": self.kind,
            "up": self.up,
            "vlan": c.vlan,
            "trunk": sorted(c.trunk) if c.trunk is not None else None,
            "native": c.native,
            "mtu": c.mtu,
            "hooks": [h.spec for h in self.hooks],
            **self.counters.as_dict(),
        }


class Switch:
    def __init__(self, ageing_s: float = DEFAULT_AGEING_S, clock=time.monotonic) -> None:
        self.ports: dict[str, Port] = {}
        self.ageing_s = ageing_s
        self.clock = clock
        self._macs: dict[tuple[int, bytes], tuple[Port, float]] = {}

    # --- ports -------------------------------------------------------------------

    def add_port(self, port: Port) -> None:
        if port.name in self.ports:
            raise ValueError(f"port {port.name} exists already")
        port.switch = self
        self.ports[port.name] = port

    def forget(self, port: Port) -> None:
        """The port's side went away (a VM disconnected): unlearn its MACs."""
        for key in [k for k, (p, _) in self._macs.items() if p is port]:
            del self._macs[key]

    def mac_table(self) -> list[dict]:
        now = self.clock()
        return [
            {"vlan": vlan, "mac": mac.hex(":"), "port": p.name, "age": round(now - seen, 1)}
            for (vlan, mac), (p, seen) in self._macs.items()
            if now - seen < self.ageing_s
        ]

    # --- forwarding ------------------------------------------------------------------

    def ingress(self, port: Port, frame: Frame) -> None:
        """A frame `port` sent into the switch."""
        c = port.counters
        c.rx_packets += 1
        c.rx_bytes += frame.length
        if port.captures:
            _capture(port, IN, frame.views)
        if frame.length < ETH_HLEN:
            c.drops["malformed"] += 1
            return
        vlan = self._classify(port, frame)
        if vlan is None:
            c.drops["vlan"] += 1
            return
        frame.vlan = vlan
        if port.hooks:
            redirect = self._run_hooks(port, IN, frame)
            if redirect is False:
                return
            if redirect is not None:
                target = self.ports.get(redirect.port)
                if target is None:
                    c.drops["unknown-port"] += 1
                    return
                self._egress(target, frame, port)
                return
        macs = frame.head(12)
        dst, src = macs[:6], macs[6:]
        cfg = port.config
        if cfg.mac_policy == "lock" and src != cfg.mac:
            c.drops["spoofed"] += 1
            return
        now = self.clock()
        if not src[0] & 1:  # learn unicast sources only
            self._macs[(vlan, src)] = (port, now)
        if not dst[0] & 1:
            entry = self._macs.get((vlan, dst))
            if entry is not None:
                target, seen = entry
                if now - seen < self.ageing_s:
                    if target is not port:
                        self._egress(target, frame, port)
                    return
                del self._macs[(vlan, dst)]  # aged out: flood, and relearn from the answer
        for target in self.ports.values():
            if target is not port and target.carries(vlan):
                self._egress(target, frame, port, flooded=True)

    def _classify(self, port: Port, frame: Frame) -> int | None:
        cfg = port.config
        tag = strip_tag(frame)
        if cfg.trunk is None:
            return None if tag is not None else (cfg.vlan or 0)
        if tag is None:
            return cfg.native if cfg.native is not None else None
        vid = tag[0]
        return vid if vid in cfg.trunk else None

    def _egress(self, port: Port, frame: Frame, source: Port, flooded: bool = False) -> None:
        c = port.counters
        if not port.up:
            if not flooded:
                c.drops["port-down"] += 1
            return
        if not port.carries(frame.vlan):
            c.drops["vlan"] += 1
            return
        if port.hooks:
            frame = Frame(frame.header, list(frame.views), frame.vlan)  # hooks may replace it
            redirect = self._run_hooks(port, OUT, frame)
            if redirect is False:
                return
            if redirect is not None:
                c.drops["hook"] += 1  # an "out" hook cannot send it elsewhere
                return
        if frame.header.gso_type == 0 and frame.length - ETH_HLEN > port.config.mtu:
            c.drops["mtu"] += 1
            return
        cfg = port.config
        tagged = cfg.trunk is not None and frame.vlan != (cfg.native or 0)
        try:
            pieces = adapt(frame, port.offloads)
        except FrameError as e:
            c.drops["malformed"] += 1
            log.debug("%s: %s", port.name, e)
            return
        for piece in pieces:
            out = piece
            if tagged:
                header = piece.header.shifted(4) if piece.header.hdr_len else piece.header
                out = Frame(header, add_tag(piece, piece.vlan), piece.vlan)
            if port.transmit(out):
                c.tx_packets += 1
                c.tx_bytes += out.length
                if port.captures:
                    _capture(port, OUT, out.views)
            else:
                c.drops["no-room" if port.up else "port-down"] += 1

    def _run_hooks(self, port: Port, direction: str, frame: Frame):
        """Run the port's hooks: False (dropped), a Redirect, or None (go on)."""
        ctx = HookContext(port.name, direction, frame.vlan, frame.header)
        view = frame.views[0] if len(frame.views) == 1 else frame.tobytes()
        verdict, result = hooks.run(port.hooks, view, ctx)
        if verdict == DROP:
            port.counters.drops[result] += 1
            return False
        port_name, data = result if verdict is Redirect else (None, result)
        if data is not view:
            frame.set_views([data])
        return Redirect(port_name) if verdict is Redirect else None


def _capture(port: Port, direction: str, views: list) -> None:
    for capture in list(port.captures):
        capture.record(port.name, direction, views)


# Re-exported for ports: what a port takes when it takes every offload.
__all__ = ["ALL_OFFLOADS", "DROP_REASONS", "Port", "PortConfig", "PortCounters", "Switch"]
