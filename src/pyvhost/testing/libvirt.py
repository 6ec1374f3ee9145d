"""A private libvirt for tests: libvirtd in the foreground, in session mode.

A root libvirtd is the system instance, with its state in /etc/libvirt and
/var/lib/libvirt and QEMU run as a user that only the full libvirt-daemon-system
package creates. A session libvirtd keeps everything under $HOME and
$XDG_RUNTIME_DIR, so the test runs one as `nobody` in a directory of its own and
leaves nothing behind: domains are destroyed and undefined, libvirtd and any
QEMU it left are ended by PID, the directory is removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from pyvhost.errors import PyvhostError
from pyvhost.testing.processes import wait_for

NOBODY = (65534, 65534)
URI = "qemu:///session"


class LibvirtError(PyvhostError):
    """libvirt refused or failed a command."""


class SessionLibvirt:
    def __init__(self, run_as: tuple[int, int] = NOBODY) -> None:
        if shutil.which("libvirtd") is None or shutil.which("virsh") is None:
            raise LibvirtError(
                "libvirtd or virsh not found: apt-get install libvirt-daemon "
                "libvirt-daemon-driver-qemu libvirt-clients"
            )
        self.uid, self.gid = run_as
        self.dir = tempfile.mkdtemp(prefix="pyvhost-libvirt-", dir="/tmp")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": self.dir,
            "XDG_RUNTIME_DIR": os.path.join(self.dir, "run"),
            "XDG_CONFIG_HOME": os.path.join(self.dir, "config"),
            "XDG_CACHE_HOME": os.path.join(self.dir, "cache"),
            "XDG_DATA_HOME": os.path.join(self.dir, "data"),
            "LANG": "C",
        }
        for key in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
            os.makedirs(self.env[key], mode=0o700)
        conf = os.path.join(self.env["XDG_CONFIG_HOME"], "libvirt")
        os.makedirs(conf)
        with open(os.path.join(conf, "qemu.conf"), "w") as f:
            # QEMU's output to a file, not through a virtlogd of its own.
            f.write('stdio_handler = "file"\n')
        for root, dirs, files in os.walk(self.dir):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, self.uid, self.gid)
        os.chmod(self.dir, 0o755)  # QEMU (as this user) and the test both reach in
        self.log_path = os.path.join(self.dir, "libvirtd.log")
        self.defined: list[str] = []
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self._as_user(["libvirtd"]),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sock = os.path.join(self.env["XDG_RUNTIME_DIR"], "libvirt", "libvirt-sock")
        try:
            wait_for(lambda: os.path.exists(sock) or self.proc.poll() is not None, 30, "libvirtd")
            if self.proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited {self.proc.returncode}: {self.log()}")
        except BaseException:
            self.close()
            raise

    def _as_user(self, argv: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]

    def give(self, path: str) -> str:
        """Copy a file in where QEMU, running as the session's user, can read it."""
        dest = os.path.join(self.dir, os.path.basename(path))
        shutil.copyfile(path, dest)
        os.chown(dest, self.uid, self.gid)
        return dest

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def virsh(self, *args: str, timeout: float = 120) -> str:
        r = subprocess.run(
            self._as_user(["virsh", "-c", URI, *args]),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def define(self, xml: str, name: str) -> None:
        path = self.path(f"{name}.xml")
        with open(path, "w") as f:
            f.write(xml)
        os.chown(path, self.uid, self.gid)
        self.virsh("define", path)
        self.defined.append(name)

    def qemu_log(self, name: str) -> str:
        path = os.path.join(self.env["XDG_CACHE_HOME"], "libvirt", "qemu", "log", f"{name}.log")
        try:
            with open(path) as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-3000:]

    def _qemu_pids(self) -> list[int]:
        run = os.path.join(self.env["XDG_RUNTIME_DIR"], "libvirt", "qemu", "run")
        pids = []
        for name in self.defined:
            try:
                with open(os.path.join(run, f"{name}.pid")) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def close(self) -> None:
        leftovers = self._qemu_pids() if self.proc.poll() is None else []
        for name in self.defined:
            for cmd in (("destroy", name), ("undefine", name)):
                try:
                    self.virsh(*cmd, timeout=30)
                except (LibvirtError, subprocess.TimeoutExpired):
                    pass
        for pid in leftovers:  # QEMUs libvirt did not end: ours to end, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SessionLibvirt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialConsole:
    """pyvhost's guest init over a domain's serial console on a Unix socket."""

    def __init__(self, path: str, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        wait_for(lambda: os.path.exists(path), timeout, f"the console socket {path}")
        self.sock.connect(path)
        self.buf = b""

    def _until(self, pattern: bytes, deadline: float) -> re.Match:
        while True:
            m = re.search(pattern, self.buf)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"console: no {pattern!r}; got {self.buf[-500:]!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                raise LibvirtError(f"console closed; got {self.buf[-500:]!r}")
            self.buf += chunk

    def wait_ready(self, timeout: float = 120) -> None:
        """Init answers a command: the guest is up (its boot banner may have gone
        by before anyone connected)."""
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            n += 1
            self.sock.sendall(f"echo alive-{n}\n".encode())
            try:
                answer = rb"alive-%d\r?\nPYVHOST-DONE 0" % n
                self._until(answer, min(deadline, time.monotonic() + 3))
                self.buf = b""
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def run(self, command: str, timeout: float = 60) -> tuple[int, str]:
        self.buf = b""
        self.sock.sendall(command.encode() + b"\n")
        m = self._until(rb"PYVHOST-DONE (\d+)", time.monotonic() + timeout)
        out = self.buf[: m.start()].decode(errors="replace")
        self.buf = self.buf[m.end() :]
        return int(m.group(1)), out

    def close(self) -> None:
        self.sock.close()
