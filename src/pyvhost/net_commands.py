"""The control socket's commands for `pyvhost net`: stats, datapath, hook, capture.

Ports are the device's queue pairs, named pair0, pair1, ...; hooks and
captures run in the Python datapath, so a pair on the kernel datapath moves
to Python while one is attached and back when the last goes.
"""

from __future__ import annotations

import logging

from pyvhost import hooks as hook_mod
from pyvhost.capture import Capture
from pyvhost.control import Stream, streaming
from pyvhost.devices.net.device import VirtioNet
from pyvhost.errors import OptionError

log = logging.getLogger(__name__)


class NetCommands:
    def __init__(
        self, device: VirtioNet, interface: str, socket: str, sessions, iotlb=lambda: None
    ) -> None:
        self.device = device
        self.interface = interface
        self.socket = socket
        self.sessions = sessions  # () -> the daemon's session count
        self.iotlb = iotlb  # () -> the session's IOTLB counters, or None

    def handlers(self) -> dict:
        return {
            "stats": self.stats,
            "datapath": self.datapath,
            "hook": self.hook,
            "capture": self.capture,
        }

    def stats(self, req: dict | None = None) -> dict:
        d = self.device
        return {
            "device": d.name,
            "interface": self.interface,
            "socket": self.socket,
            "sessions": self.sessions(),
            "features": f"0x{d.acked_features:x}",
            "iotlb": self.iotlb(),
            "datapaths": d.datapaths(),
            "host_io": d.host_io(),
            "hooks": {p.port_name: [h.spec for h in p.hooks] for p in d.pairs if p.hooks},
            "queues": {name: c.as_dict() for name, c in d.counters().items()},
        }

    def datapath(self, req: dict) -> dict:
        to = req.get("to")
        pair = req.get("pair")
        pairs = range(self.device.queue_pairs) if pair is None else [pair]
        for p in pairs:
            if not isinstance(p, int):
                raise OptionError(f"pair {p!r}: a queue pair number")
            self.device.switch_datapath(p, to)
        return {"datapaths": self.device.datapaths()}

    def _pair(self, name) -> int:
        names = [p.port_name for p in self.device.pairs]
        if name not in names:
            raise OptionError(f"no port {name!r}; ports: {', '.join(names)}")
        return names.index(name)

    def hook(self, req: dict) -> dict:
        """{"port": "pair0", "add": SPEC} | {"remove": SPEC} | {"set": [SPEC...]} | (list)."""
        index = self._pair(req.get("port"))
        current = self.device.pairs[index].hooks
        if "add" in req:
            new = [*current, hook_mod.load(req["add"], reload=True)]
        elif "remove" in req:
            new = [h for h in current if h.spec != req["remove"]]
            if len(new) == len(current):
                raise OptionError(f"{req['port']} has no hook {req['remove']!r}")
        elif "set" in req:
            if not isinstance(req["set"], list):
                raise OptionError('"set" takes a list of module:function')
            new = [hook_mod.load(s, reload=True) for s in req["set"]]
        else:
            new = current
        if new is not current:
            self.device.set_hooks(index, new)
        pair = self.device.pairs[index]
        return {
            "port": pair.port_name,
            "hooks": [h.spec for h in pair.hooks],
            "datapath": self.device.datapaths()[index],
        }

    @streaming
    def capture(self, req: dict, stream: Stream) -> dict:
        names = req.get("ports") or [p.port_name for p in self.device.pairs]
        indices = [self._pair(n) for n in names]
        cap = Capture(stream.write, names)
        attached = []
        try:
            for i in indices:
                self.device.add_capture(cap, i)
                attached.append(i)
        except Exception:
            for i in attached:
                self.device.remove_capture(cap, i)
            raise

        def stopped() -> None:
            cap.closed = True
            for i in attached:
                self.device.remove_capture(cap, i)
            log.info("capture ended: %d frames, %d dropped", cap.frames, cap.dropped)

        stream.on_close = stopped
        return {"format": "pcapng", "ports": names, "datapaths": self.device.datapaths()}
