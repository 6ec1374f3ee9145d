"""QEMU with a vhost-user NIC on pyvhost, and a console to drive the guest.

Facts of these machines (see README): KVM may not boot Linux, so TCG is the
default; Debian 12's QEMU 7.2 crashes in vhost_net_start under TCG when a
vhost-user virtio-net-pci device uses MSI-X, so whether to use MSI-X is
decided per QEMU version (pyvhost.guest.msix; vectors=0 is INTx, fine with
multiqueue too); guest RAM must be shareable (a memfd backend with
share=on) for a vhost-user back-end to map it.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvhost.errors import PyvhostError
from pyvhost.guest.image import GuestImage

QEMU = "qemu-system-x86_64"


class GuestError(PyvhostError):
    """The guest did not boot, answer, or run a command in time."""


@functools.cache
def qemu_version(binary: str = QEMU, wrapper: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """The version of the QEMU on PATH (run through `wrapper`, e.g. a chroot), as
    (major, minor, micro)."""
    try:
        r = subprocess.run([*wrapper, binary, "--version"], capture_output=True, text=True)
    except FileNotFoundError:
        raise GuestError(f"{binary} not found: apt-get install qemu-system-x86") from None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", r.stdout)
    if m is None:
        raise GuestError(f"cannot tell {binary}'s version from: {(r.stdout or r.stderr).strip()!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@dataclass
class NicOptions:
    socket: str
    queues: int = 1
    mem: str = "512M"
    mac: str = "52:54:00:12:34:56"
    msix: bool = False  # MSI-X crashes Debian's QEMU 7.2 with vhost-user under TCG
    host_mtu: int | None = None
    reconnect: int = 1
    properties: str = ""  # more virtio-net-pci properties, e.g. "mrg_rxbuf=off,event_idx=off"
    qemu_version: tuple[int, int, int] | None = None  # None: the QEMU on PATH


def nic_args(o: NicOptions) -> list[str]:
    """The arguments for a vhost-user NIC on pyvhost (and the shared RAM it needs)."""
    vectors = 2 * o.queues + 2 if o.msix else 0
    version = o.qemu_version or qemu_version()
    # QEMU 9.2 deprecated reconnect= (seconds) for reconnect-ms=.
    reconnect = (
        f"reconnect-ms={o.reconnect * 1000}" if version >= (9, 2, 0) else f"reconnect={o.reconnect}"
    )
    device = f"virtio-net-pci,netdev=n0,mac={o.mac},vectors={vectors}"
    if o.queues > 1:
        device += ",mq=on"
    if o.host_mtu:
        device += f",host_mtu={o.host_mtu}"
    if o.properties:
        device += f",{o.properties}"
    return [
        "-object", f"memory-backend-memfd,id=mem,size={o.mem},share=on",
        "-machine", "memory-backend=mem",
        "-chardev", f"socket,id=c0,path={o.socket},{reconnect}",
        "-netdev", f"vhost-user,id=n0,chardev=c0,queues={o.queues}",
        "-device", device,
    ]  # fmt: skip


@dataclass
class VmOptions:
    nic: NicOptions
    image: GuestImage
    accel: str = "tcg"
    smp: int = 1
    ip: str = "10.0.2.15/24"
    extra_append: str = ""
    taskset: str | None = None
    extra_args: list[str] = field(default_factory=list)
    # Run QEMU through this (e.g. ["chroot", "/srv/trixie"]: another release's QEMU).
    wrapper: list[str] = field(default_factory=list)


def vm_args(o: VmOptions) -> list[str]:
    """QEMU's command line. With `nic.socket` empty, no vhost-user NIC is added:
    `extra_args` brings the NIC (how benchmarks run QEMU's own tap path)."""
    append = f"console=ttyS0 quiet loglevel=3 panic=-1 pyvhost.ip={o.ip} {o.extra_append}"
    nic = nic_args(o.nic) if o.nic.socket else [
        "-object", f"memory-backend-memfd,id=mem,size={o.nic.mem},share=on",
        "-machine", "memory-backend=mem",
    ]  # fmt: skip
    cmd = [
        QEMU, "-accel", o.accel, "-m", o.nic.mem, "-smp", str(o.smp),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", str(o.image.kernel), "-initrd", str(o.image.initrd),
        "-append", append.strip(),
        *nic, *o.extra_args,
    ]  # fmt: skip
    cmd = [*o.wrapper, *cmd]
    if o.taskset:
        cmd = ["taskset", "-c", o.taskset, *cmd]
    return cmd


class Guest:
    """A running QEMU guest, driven through pyvhost's init on its serial console."""

    def __init__(self, options: VmOptions, log_path: str | None = None) -> None:
        if not options.wrapper and shutil.which(QEMU) is None:
            raise GuestError(f"{QEMU} not found: apt-get install qemu-system-x86")
        self.options = options
        self.started = time.monotonic()
        self.boot_seconds: float | None = None
        self._lines: queue.Queue[str] = queue.Queue()
        self.transcript: list[str] = []
        self._log = open(log_path, "w") if log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            vm_args(options),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").rstrip("\r")
                self.transcript.append(text)
                if self._log:
                    self._log.write(text + "\n")
                    self._log.flush()
                self._lines.put(text)
        self._lines.put("\0EOF")

    def _next_line(self, deadline: float, waiting_for: str) -> str:
        left = deadline - time.monotonic()
        try:
            line = self._lines.get(timeout=max(left, 0.01))
        except queue.Empty:
            raise GuestError(
                f"guest: no {waiting_for} in time; last output:\n{self.tail()}"
            ) from None
        if line == "\0EOF":
            raise GuestError(
                f"QEMU exited ({self.proc.poll()}) while waiting for {waiting_for}:\n{self.tail()}"
            )
        return line

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.transcript[-n:])

    def wait_ready(self, timeout: float = 120) -> float:
        """Wait for init's ready marker; returns seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline, "boot")
            if "PYVHOST-ERROR" in line:
                raise GuestError(f"guest init: {line}")
            if line.startswith("PYVHOST-READY"):
                self.boot_seconds = time.monotonic() - self.started
                return self.boot_seconds

    def run(
        self,
        command: str,
        timeout: float = 60,
        check: bool = True,
        echo: Callable[[str], None] | None = None,
    ) -> tuple[int, str]:
        """Run a shell command in the guest; (exit status, output). `echo` sees each
        line of output as it comes (progress of a long command)."""
        if "\n" in command:
            raise ValueError("one line per command")
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            # QEMU is gone (a guest that panicked and did not reboot, say): say
            # so with its last words, once the reader has them all.
            self._reader.join(5)
            raise GuestError(
                f"QEMU exited ({self.proc.poll()}) before {command!r} could be sent:\n{self.tail()}"
            ) from None
        deadline = time.monotonic() + timeout
        out: list[str] = []
        while True:
            line = self._next_line(deadline, f"the end of {command!r}")
            m = re.match(r"PYVHOST-DONE (\d+)$", line)
            if m:
                status = int(m.group(1))
                if check and status != 0:
                    raise GuestError(f"guest: {command!r} exited {status}:\n" + "\n".join(out))
                return status, "\n".join(out)
            out.append(line)
            if echo is not None:
                echo(line)

    def iperf3(self, server: str, seconds: int, *, reverse: bool = False, port: int = 5201,
               extra: str = "") -> dict:  # fmt: skip
        """Run iperf3's client in the guest against `server` (-R with `reverse`:
        the server sends); its JSON result. The guest's own `timeout` ends a
        client that does not (iperf3 3.12 can spin at the end of a reverse
        run), so a hung client fails the caller instead of stalling it."""
        cmd = (f"timeout {seconds + 30} iperf3 -c {server} -p {port} -t {seconds} -J"
               f"{' -R' if reverse else ''} {extra}")  # fmt: skip
        status, out = self.run(cmd.rstrip(), timeout=seconds + 60, check=False)
        try:
            result = json.loads(out[out.index("{") :])
        except ValueError:  # no JSON: iperf3 did not get as far as a result
            result = {}
        if status or "error" in result:
            why = result.get("error") or ("timed out" if status == 124 else f"exited {status}")
            raise GuestError(f"guest: iperf3 to {server}:{port}: {why}:\n{out[-2000:]}")
        return result

    def stop(self, timeout: float = 5) -> int:
        """Power off (or, failing that, end QEMU by its PID); returns QEMU's status.

        Closing QEMU's stdin is no EOF on the guest's serial console, so init is
        asked to power off as a command; a guest that does not answer is ended
        with SIGTERM, then SIGKILL.
        """
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"poweroff -f\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._reader.join(5)
        if self._log:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
