"""A whole setup on one machine: pyvhost on a TAP, the host side in a network
namespace, and a Linux guest in QEMU connected to pyvhost.

The demo, the end-to-end tests and the benchmarks all build on it. Every
process it starts is ended by its PID, the namespace is removed, and the
TAP goes with pyvhost's last fd, also when something fails half-way.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import Callable

from pyvhost.guest.image import GuestImage, ensure_image
from pyvhost.guest.msix import msix_works
from pyvhost.guest.qemu import Guest, GuestError, NicOptions, VmOptions
from pyvhost.testing.netns import NetNamespace
from pyvhost.testing.processes import PyvhostProcess, end_all, wait_for

HOST_IP = "10.0.2.1"
GUEST_IP = "10.0.2.15"
PREFIX = 24
# A fixed MAC on the host side: a restarted pyvhost makes a new TAP, and the
# guest's ARP entry for the host must stay right.
HOST_MAC = "02:00:00:00:00:01"


class Lab:
    def __init__(
        self,
        *,
        queues: int = 1,
        smp: int = 1,
        accel: str = "tcg",
        msix: bool | None = None,
        host_mtu: int | None = None,
        device_properties: str = "",
        mem: str = "512M",
        image: GuestImage | None = None,
        progress: Callable[[str], None] = lambda msg: None,
        workdir: str | None = None,
        pyvhost_taskset: str | None = None,
        qemu_taskset: str | None = None,
        qemu_args: list[str] | None = None,
        pyvhost_args: list[str] | None = None,
    ) -> None:
        """`qemu_args`: more QEMU arguments (e.g. a machine type and a vIOMMU);
        `pyvhost_args`: more `pyvhost net` options (e.g. --workers)."""
        self.queues = queues
        self.smp = smp
        self.accel = accel
        self.msix = msix
        self.host_mtu = host_mtu
        self.device_properties = device_properties
        self.mem = mem
        self.progress = progress
        self.image = image
        self.pyvhost_taskset = pyvhost_taskset
        self.qemu_taskset = qemu_taskset
        self.qemu_args = list(qemu_args or [])
        self.pyvhost_args = list(pyvhost_args or [])
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pyvhost-lab-")
        self.workdir = workdir or self._tmp.name
        self.socket = os.path.join(self.workdir, "vhost.sock")
        self.ifname = f"pv{uuid.uuid4().hex[:8]}"
        self.netns: NetNamespace | None = None
        self.pyvhost: PyvhostProcess | None = None
        self.pyvhost_log: str | None = None
        self._pyvhost_starts = 0
        self.guest: Guest | None = None
        self._servers: list[subprocess.Popen] = []

    # --- pieces --------------------------------------------------------------------

    def start(self) -> Lab:
        """Namespace, pyvhost on its TAP, host address: everything but the guest."""
        try:
            if self.image is None:
                self.image = ensure_image(self.progress)
            if self.msix is None:  # MSI-X wherever this QEMU handles it under TCG
                self.msix = self.accel != "tcg" or msix_works(self.image, self.progress)
            self.netns = NetNamespace("pyvhost-lab")
            self.start_pyvhost()
        except BaseException:
            self.close()
            raise
        return self

    def start_pyvhost(self) -> None:
        self.progress(f"starting pyvhost net on TAP {self.ifname} ({self.queues} queue pairs)")
        args = ["net", "--socket", self.socket, "--netdev",
                f"tap,ifname={self.ifname},queues={self.queues}", "--log-level", "info",
                *self.pyvhost_args]  # fmt: skip
        # Its log goes to a file, one per start: a pipe read only at the end
        # would block a pyvhost that logs much, and the file says what it was
        # doing when a guest does not boot (boot()).
        self._pyvhost_starts += 1
        self.pyvhost_log = os.path.join(self.workdir, f"pyvhost.{self._pyvhost_starts}.log")
        self.pyvhost = PyvhostProcess(args, self.socket, stderr_path=self.pyvhost_log)
        if self.pyvhost_taskset:
            subprocess.run(["taskset", "-a", "-p", "-c", self.pyvhost_taskset,
                            str(self.pyvhost.pid)], capture_output=True, check=True)  # fmt: skip
        self.netns.adopt(self.ifname, address=f"{HOST_IP}/{PREFIX}", mac=HOST_MAC)

    def kill_pyvhost(self) -> None:
        """SIGKILL, as a crash: no cleanup of its own (its socket file stays)."""
        self.pyvhost.kill()

    def restart_pyvhost(self) -> None:
        self.kill_pyvhost()
        self.start_pyvhost()

    def iperf_server(self, port: int = 5201) -> None:
        proc = self.netns.popen(
            "iperf3", "-s", "-p", str(port),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._servers.append(proc)
        wait_for(
            lambda: f":{port:04X}" in _listening_tcp(self.netns) or proc.poll() is not None,
            10,
            f"iperf3 server on port {port}",
        )

    def boot(self, extra_append: str = "", log_path: str | None = None) -> Guest:
        self.progress("booting the guest (QEMU, " + self.accel + ")")
        nic = NicOptions(self.socket, queues=self.queues, mem=self.mem, msix=self.msix,
                         host_mtu=self.host_mtu, properties=self.device_properties)  # fmt: skip
        opts = VmOptions(nic, self.image, accel=self.accel, smp=self.smp,
                         ip=f"{GUEST_IP}/{PREFIX}", extra_append=extra_append,
                         taskset=self.qemu_taskset, extra_args=self.qemu_args)  # fmt: skip
        self.guest = Guest(opts, log_path or os.path.join(self.workdir, "guest.log"))
        try:
            self.guest.wait_ready()
        except GuestError as e:
            raise GuestError(f"{e}\n{self.why_not_booted()}") from None
        return self.guest

    def why_not_booted(self) -> str:
        """What QEMU's threads wait in and the tail of pyvhost's log: a guest
        that prints nothing may be held by QEMU waiting on its back-end."""
        lines = []
        if self.guest is not None:
            lines.append(f"QEMU (pid {self.guest.pid}) threads: {thread_states(self.guest.pid)}")
        if self.pyvhost is not None:
            alive = self.pyvhost.proc.poll() is None
            lines.append(f"pyvhost (pid {self.pyvhost.pid}) "
                         f"{'running' if alive else f'exited {self.pyvhost.proc.returncode}'}, "
                         f"threads: {thread_states(self.pyvhost.pid)}")  # fmt: skip
            lines.append(f"pyvhost's log ({self.pyvhost_log}), its end:")
            lines.append(tail_of(self.pyvhost_log, 40))
        return "\n".join(lines)

    def stats(self) -> dict:
        from pyvhost.stats import fetch

        return fetch(self.socket + ".stats")

    def iperf(self, reverse: bool = False, seconds: int = 5, port: int = 5201,
              extra: str = "") -> float:  # fmt: skip
        """Run iperf3 in the guest against the host; Gbit/s received."""
        result = self.guest.iperf3(HOST_IP, seconds, reverse=reverse, port=port, extra=extra)
        return result["end"]["sum_received"]["bits_per_second"] / 1e9

    # --- teardown ------------------------------------------------------------------------

    def abort(self, grace: float = 1.0) -> None:
        """Interrupted: end QEMU, the servers and pyvhost together (SIGTERM, then
        SIGKILL after `grace`), without waiting for the guest to power off; then
        close() finds them gone and removes the rest."""
        procs = [p.proc for p in (self.guest, self.pyvhost) if p is not None]
        end_all([*procs, *self._servers], grace)
        self.close()

    def close(self) -> None:
        if self.guest is not None:
            self.guest.stop()
            self.guest = None
        end_all(self._servers, grace=5)
        self._servers.clear()
        if self.pyvhost is not None:
            self.pyvhost.stop()
            self.pyvhost = None
        if self.netns is not None:
            self.netns.delete()
            self.netns = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def thread_states(pid: int) -> str:
    """Each thread of a process as name:state:wait channel (from /proc)."""
    out = []
    try:
        tids = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError:
        return "gone"
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip() or "-"
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state = stat[stat.rindex(")") + 2]
        out.append(f"{name}:{state}:{wchan}")
    return " ".join(out)


def tail_of(path: str | None, lines: int) -> str:
    if path is None:
        return "(none)"
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]) or "(empty)"
    except OSError as e:
        return f"(unreadable: {e.strerror})"


def _listening_tcp(netns: NetNamespace) -> str:
    r = netns.run("cat", "/proc/net/tcp", "/proc/net/tcp6", capture_output=True, text=True)
    return "\n".join(line for line in r.stdout.splitlines() if line.split()[3:4] == ["0A"])
