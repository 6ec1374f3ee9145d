"""Network namespaces for the host side of a TAP: created, used, and removed.

Addresses and servers of the host side live in a namespace the test (or
demo) creates, never on this machine's own interfaces. A TAP opened in the
root namespace can be moved in; its open fd keeps working.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import uuid

from pyvhost.errors import PyvhostError

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15


class NamespaceError(PyvhostError):
    """An `ip` command for the host side (namespace, TAP address) failed."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def set_sysctl(name: str, value: str) -> None:
    """Write /proc/sys/`name` in the calling thread's network namespace."""
    with open(f"/proc/sys/{name}", "w") as f:
        f.write(value)


def link_exists(name: str, netns: str | None = None) -> bool:
    args = (["-n", netns] if netns else []) + ["link", "show", "dev", name]
    return ip(*args, check=False).returncode == 0


class NetNamespace:
    def __init__(self, prefix: str = "pyvhost") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        ip("netns", "add", self.name)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()  # made but unusable: not left behind
            raise

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return ip("-n", self.name, *args, check=check)

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], **kwargs)

    def popen(self, *cmd: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kwargs)

    def adopt(
        self,
        ifname: str,
        address: str | None = None,
        mtu: int | None = None,
        mac: str | None = None,
        move: bool = True,
        ipv6: bool = True,
    ) -> None:
        """Move interface `ifname` in here (unless it was born here) and bring it
        up, with the MAC, MTU and address given. Without `ipv6` the kernel sends
        nothing on the link unprompted (no DAD, MLD or router solicitation), so
        a test can count every frame the other side receives."""
        if move:
            ip("link", "set", "dev", ifname, "netns", self.name)
        if not ipv6:
            self.set_sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")
        if mac is not None:
            self.ip("link", "set", "dev", ifname, "address", mac)
        if mtu is not None:
            self.ip("link", "set", "dev", ifname, "mtu", str(mtu))
        if address is not None:
            self.ip("addr", "add", address, "dev", ifname)
        self.ip("link", "set", "dev", ifname, "up")

    def set_sysctl(self, name: str, value: str) -> None:
        """Write /proc/sys/`name` as seen inside the namespace."""
        with self.entered():
            set_sysctl(name, value)

    @contextlib.contextmanager
    def entered(self):
        """Run the calling thread inside the namespace (sockets made here stay in it)."""
        home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.name}")
            try:
                yield
            finally:
                if _libc.setns(home, _CLONE_NEWNET) != 0:  # pragma: no cover
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(home)
            os.close(target)

    def packet_socket(self, ifname: str, vnet_hdr: bool = False) -> socket.socket:
        """A raw AF_PACKET socket on `ifname` inside the namespace."""
        with self.entered():
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        if vnet_hdr:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind((ifname, 0))
        return s

    def delete(self) -> None:
        ip("netns", "del", self.name, check=False)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()
