"""Several Linux guests on one `pyvhost switch`, and the host side through an uplink.

The switch e2e tests, `pyvhost demo --vms N` and the switch benchmark build
on it. Guest i is 10.0.2.(15+i) with MAC 52:54:00:12:34:(56+i) on port vm<i>;
the host side is 10.0.2.1 in a namespace, behind the uplink TAP. Every
process started is ended by its PID, and the namespace and TAP go too.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import Callable

from pyvhost.guest.image import GuestImage, ensure_image
from pyvhost.guest.lab import HOST_IP, HOST_MAC, PREFIX, _listening_tcp
from pyvhost.guest.msix import msix_works
from pyvhost.guest.qemu import Guest, NicOptions, VmOptions
from pyvhost.testing.netns import NetNamespace
from pyvhost.testing.processes import PyvhostProcess, end_all, wait_for


def guest_ip(i: int) -> str:
    return f"10.0.2.{15 + i}"


def guest_mac(i: int) -> str:
    return f"52:54:00:12:34:{0x56 + i:02x}"


class SwitchLab:
    def __init__(
        self,
        vms: int = 2,
        *,
        switch_args: list[str] = (),
        env: dict[str, str] | None = None,
        uplink: bool = True,
        image: GuestImage | None = None,
        workdir: str | None = None,
        progress: Callable[[str], None] = lambda msg: None,
        msix: bool | None = None,
    ) -> None:
        self.n = vms
        self.switch_args = list(switch_args)
        self.env = env
        self.uplink = uplink
        self.image = image
        self.progress = progress
        self.msix = msix
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pyvhost-swlab-")
        self.workdir = workdir or self._tmp.name
        self.sockets = [os.path.join(self.workdir, f"vm{i}.sock") for i in range(vms)]
        self.control = os.path.join(self.workdir, "switch.ctl")
        self.ifname = f"pvs{uuid.uuid4().hex[:8]}"
        self.netns: NetNamespace | None = None
        self.switch: PyvhostProcess | None = None
        self.guests: list[Guest | None] = [None] * vms
        self._servers: list[subprocess.Popen] = []

    def start(self) -> SwitchLab:
        try:
            if self.image is None:
                self.image = ensure_image(self.progress)
            if self.msix is None:
                self.msix = msix_works(self.image, self.progress)
            self.netns = NetNamespace("pyvhost-swlab")
            args = ["switch", "--control", self.control]
            for i, sock in enumerate(self.sockets):
                args += ["--port", f"vm{i}={sock}", "--mac", f"vm{i}={guest_mac(i)}"]
            if self.uplink:
                args += ["--uplink", f"up=tap,ifname={self.ifname}"]
            self.progress(f"starting pyvhost switch ({self.n} VM ports, uplink {self.ifname})")
            self.switch = PyvhostProcess([*args, *self.switch_args], self.control, env=self.env)
            if self.uplink:
                self.netns.adopt(self.ifname, address=f"{HOST_IP}/{PREFIX}", mac=HOST_MAC)
        except BaseException:
            self.close()
            raise
        return self

    def boot(self, i: int, log_path: str | None = None) -> Guest:
        self.progress(f"booting guest vm{i} ({guest_ip(i)})")
        nic = NicOptions(self.sockets[i], mac=guest_mac(i), msix=self.msix)
        opts = VmOptions(nic, self.image, ip=f"{guest_ip(i)}/{PREFIX}")
        guest = Guest(opts, log_path or os.path.join(self.workdir, f"vm{i}.log"))
        self.guests[i] = guest
        guest.wait_ready()
        return guest

    def boot_all(self) -> list[Guest]:
        return [self.boot(i) for i in range(self.n)]

    def iperf_server(self, i: int, port: int = 5201) -> None:
        """An iperf3 server in guest i (in the background)."""
        self.guests[i].run(f"iperf3 -s -D -p {port}")

    def host_iperf_server(self, port: int = 5201) -> None:
        proc = self.netns.popen("iperf3", "-s", "-p", str(port), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self._servers.append(proc)
        wait_for(lambda: f":{port:04X}" in _listening_tcp(self.netns), 10, "iperf3 on the host")

    def stats(self) -> dict:
        from pyvhost.control import request

        return request(self.control, {"cmd": "stats"})

    def abort(self, grace: float = 1.0) -> None:
        """Interrupted: everything ended at once (SIGTERM, SIGKILL after `grace`)."""
        procs = [g.proc for g in self.guests if g is not None]
        if self.switch is not None:
            procs.append(self.switch.proc)
        end_all([*procs, *self._servers], grace)
        self.close()

    def close(self) -> None:
        for g in self.guests:
            if g is not None:
                g.stop()
        self.guests = [None] * self.n
        end_all(self._servers, grace=5)
        self._servers.clear()
        if self.switch is not None:
            self.switch.stop()
            self.switch = None
        if self.netns is not None:
            self.netns.delete()
            self.netns = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SwitchLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
