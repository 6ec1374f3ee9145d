"""`pyvhost switch`: the switch, its ports, and its control socket, in one process.

Every VM port is a vhost-user daemon of its own on the one event loop, so
each VM comes and goes on its own: a session that ends (or fails) is that
port's, and the others forward on. The control socket serves the counters,
the MAC table, hooks added, replaced and removed at run time, and live
captures.
"""

from __future__ import annotations

import logging

from pyvhost import hooks as hook_mod
from pyvhost.capture import Capture
from pyvhost.control import ControlServer, Stream, streaming
from pyvhost.errors import OptionError
from pyvhost.eventloop import EventLoop
from pyvhost.switch.config import SwitchConfig
from pyvhost.switch.fabric import Port, Switch
from pyvhost.switch.ports import UplinkPort, VmPort

log = logging.getLogger(__name__)


class SwitchServer:
    def __init__(self, cfg: SwitchConfig, loop: EventLoop | None = None) -> None:
        self.cfg = cfg
        self.loop = loop or EventLoop()
        self.switch = Switch(cfg.ageing)
        self.vm_ports: list[VmPort] = []
        self.uplinks: list[UplinkPort] = []
        self.control: ControlServer | None = None
        self.captures: list[Capture] = []
        try:
            loaded = {
                spec.config.name: [hook_mod.load(h) for h in spec.config.hooks]
                for spec in [*cfg.ports, *cfg.uplinks]
            }
            for spec in cfg.ports:
                port = VmPort(spec.config, spec.socket, self.loop, client=spec.client)
                self.vm_ports.append(port)
                self._add(port, loaded[spec.config.name])
            for spec in cfg.uplinks:
                uplink = UplinkPort(spec.config, spec.netdev, self.loop)
                self.uplinks.append(uplink)
                self._add(uplink, loaded[spec.config.name])
            self.control = ControlServer(
                cfg.control,
                self.loop,
                {
                    "stats": self.stats,
                    "hook": self.hook,
                    "capture": self.capture,
                    "macs": lambda req: {"macs": self.switch.mac_table()},
                },
            )
        except BaseException:
            self.close()
            raise

    def _add(self, port: Port, hooks: list[hook_mod.LoadedHook]) -> None:
        port.hooks = hooks
        self.switch.add_port(port)

    # --- control commands --------------------------------------------------------

    def stats(self, req: dict | None = None) -> dict:
        return {
            "device": "switch",
            "ports": {name: p.describe() for name, p in self.switch.ports.items()},
            "macs": len(self.switch.mac_table()),
            "captures": len(self.captures),
        }

    def _port(self, req: dict) -> Port:
        name = req.get("port")
        port = self.switch.ports.get(name)
        if port is None:
            raise OptionError(f"no port {name!r}; ports: {', '.join(self.switch.ports)}")
        return port

    def hook(self, req: dict) -> dict:
        """{"port": P, "add": SPEC} | {"remove": SPEC} | {"set": [SPEC, ...]} | (list)."""
        port = self._port(req)
        if "add" in req:
            port.hooks = [*port.hooks, hook_mod.load(req["add"], reload=True)]
        elif "remove" in req:
            left = [h for h in port.hooks if h.spec != req["remove"]]
            if len(left) == len(port.hooks):
                raise OptionError(f"port {port.name} has no hook {req['remove']!r}")
            port.hooks = left
        elif "set" in req:
            specs = req["set"]
            if not isinstance(specs, list):
                raise OptionError('"set" takes a list of module:function')
            port.hooks = [
                hook_mod.load(s, reload=True) for s in specs
            ]  # all loaded before any is swapped in
        log.info("port %s hooks: %s", port.name, [h.spec for h in port.hooks] or "none")
        return {"port": port.name, "hooks": [h.spec for h in port.hooks]}

    @streaming
    def capture(self, req: dict, stream: Stream) -> dict:
        names = req.get("ports")
        if names is not None:
            unknown = [n for n in names if n not in self.switch.ports]
            if unknown:
                raise OptionError(f"no port {unknown[0]!r}; ports: {', '.join(self.switch.ports)}")
        watched = [p for p in self.switch.ports.values() if not names or p.name in names]
        cap = Capture(stream.write, [p.name for p in watched])
        for p in watched:
            p.captures.append(cap)
        self.captures.append(cap)

        def stopped() -> None:
            cap.closed = True
            for p in watched:
                if cap in p.captures:
                    p.captures.remove(cap)
            self.captures.remove(cap)
            log.info("capture ended: %d frames, %d dropped", cap.frames, cap.dropped)

        stream.on_close = stopped
        return {"format": "pcapng", "ports": [p.name for p in watched]}

    # --- running --------------------------------------------------------------------

    def run(self) -> None:
        from pyvhost.vhost_user.daemon import run_daemons

        run_daemons([p.daemon for p in self.vm_ports], self.loop)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        for port in [*self.vm_ports, *self.uplinks]:
            try:
                port.close()
            except Exception:  # one port's trouble must not keep another's socket or TAP
                log.exception("closing port %s", port.name)
        self.vm_ports, self.uplinks = [], []


def format_switch(snapshot: dict) -> str:
    """The switch's counters as a table, with drops by reason."""
    heads = ["port", "kind", "up", "vlan", "in pkts", "in bytes", "out pkts", "out bytes", "drops"]
    rows = [heads]
    for name, p in snapshot["ports"].items():
        vlan = (
            f"trunk {','.join(map(str, p['trunk']))}" if p.get("trunk") else str(p["vlan"] or "-")
        )
        drops = ", ".join(f"{k} {v}" for k, v in sorted(p["drops"].items())) or "0"
        rows.append(
            [name, p["kind"], "yes" if p["up"] else "no", vlan, str(p["rx_packets"]),
             str(p["rx_bytes"]), str(p["tx_packets"]), str(p["tx_bytes"]), drops]
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    lines = [f"switch: {len(snapshot['ports'])} ports, {snapshot['macs']} MACs learned"]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)
