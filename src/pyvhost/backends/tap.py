"""A Linux TAP queue: open it, configure it, read and write frames (linux/if_tun.h).

A Tap is one queue of a TAP interface (one fd). It exposes only what a
network device needs: readv/writev of whole frames, the virtio-net header
size, offloads, MTU and link state. No device logic lives here.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct

from pyvhost.backends.uring import SpanReader, SpanWriter
from pyvhost.errors import TapError, UringUnavailableError

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"

# ioctls, from linux/if_tun.h (_IOW/_IOR('T', nr, int)).
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNGETSNDBUF = 0x800454D3
TUNSETSNDBUF = 0x400454D4
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNGETDEVNETNS = 0x54E3
TUNSETQUEUE = 0x400454D9

IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

# From linux/sockios.h and linux/if.h.
SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
IFF_RUNNING = 0x40
SIOCGIFINDEX = 0x8933
RTMGRP_LINK = 1
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # name, flags (or an int), padding to 40 bytes
_IFREQ_INT = struct.Struct("16si20x")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ifreq(name: str, flags: int = 0) -> bytes:
    return _IFREQ.pack(name.encode(), flags)


class Tap:
    """One queue (fd) of a TAP interface. Owns its fd."""

    def __init__(self, fd: int, name: str, flags: int) -> None:
        self.fd = fd
        self.name = name
        self.flags = flags
        self.vnet_hdr_size = 0
        # Batched I/O through io_uring (--io-uring): "auto" uses it where the
        # kernel allows, "on" was checked at start-up, "off" never. The rings
        # are the datapath's, opened per attached ring and closed with it.
        self.io_uring = "auto"
        self._uring_refused: set[type] = set()  # ring kinds that failed here once

    # --- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, name: str, *, vnet_hdr: bool, multi_queue: bool) -> Tap:
        """Create (or attach to) TAP interface `name`: one more queue of it."""
        if len(name.encode()) >= IFNAMSIZ:
            raise TapError(f"ifname={name}: longer than {IFNAMSIZ - 1} bytes")
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise TapError(
                f"cannot open {TUN_DEVICE}: {e.strerror} (is the tun module loaded?)"
            ) from e
        flags = IFF_TAP | IFF_NO_PI
        if vnet_hdr:
            flags |= IFF_VNET_HDR
        if multi_queue:
            flags |= IFF_MULTI_QUEUE
        try:
            reply = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
        except OSError as e:
            os.close(fd)
            hint = (
                " (needs CAP_NET_ADMIN: run as root, then drop with --user)"
                if e.errno
                in (
                    errno.EPERM,
                    errno.EACCES,
                )
                else ""
            )
            raise TapError(f"ifname={name}: cannot create the TAP: {e.strerror}{hint}") from e
        real_name = reply[:IFNAMSIZ].rstrip(b"\0").decode()
        return cls(fd, real_name, flags)

    @classmethod
    def from_fd(cls, fd: int, option: str = "fd") -> Tap:
        """Adopt an already opened TAP fd (from a management process). Takes ownership."""
        try:
            reply = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
        except OSError as e:
            raise TapError(f"{option}={fd}: not a TAP fd ({e.strerror})") from e
        name_b, flags = _IFREQ.unpack(reply)
        if not flags & IFF_TAP:
            raise TapError(f"{option}={fd}: a TUN (layer 3) device, not a TAP")
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return cls(fd, name_b.rstrip(b"\0").decode(), flags)

    @staticmethod
    def kernel_features() -> int:
        """The IFF_* flags the kernel's tun driver supports (TUNGETFEATURES)."""
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            return struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
        finally:
            os.close(fd)

    # --- configuration -------------------------------------------------------------

    @property
    def has_vnet_hdr(self) -> bool:
        return bool(self.flags & IFF_VNET_HDR)

    def set_vnet_hdr_size(self, size: int) -> None:
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", size))
        self.vnet_hdr_size = size

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: which GSO/checksum-offloaded frames we accept from the kernel."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(f"{self.name}: TUNSETOFFLOAD 0x{flags:x}: {e.strerror}") from e

    def offload_supported(self, flags: int) -> bool:
        """Probe TUNSETOFFLOAD (then turn offloads off again)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError:
            return False
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)
        return True

    def set_queue_attached(self, attached: bool) -> None:
        """TUNSETQUEUE: let the kernel steer frames to this queue, or not (multiqueue only)."""
        if not self.flags & IFF_MULTI_QUEUE:
            return
        flag = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(self.fd, TUNSETQUEUE, _ifreq("", flag))
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: already in that state
                raise TapError(f"{self.name}: TUNSETQUEUE: {e.strerror}") from e

    def set_sndbuf(self, size: int) -> None:
        try:
            fcntl.ioctl(self.fd, TUNSETSNDBUF, struct.pack("i", size))
        except OSError as e:
            raise TapError(f"sndbuf={size}: TUNSETSNDBUF failed: {e.strerror}") from e

    def _in_device_netns(self, fn, make=None):
        """Run fn(sock) with a socket made in the namespace the TAP lives in
        (`make()`, by default an AF_INET datagram socket).

        The interface may have been moved into another network namespace
        since it was opened (its fd keeps working); name-based ioctls must
        then be made from there, and a socket is in the namespace it was made in.
        """
        if make is None:
            make = lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # noqa: E731
        try:
            ns_fd = fcntl.ioctl(self.fd, TUNGETDEVNETNS)
        except OSError:
            ns_fd = -1
        if ns_fd < 0 or os.fstat(ns_fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
            if ns_fd >= 0:
                os.close(ns_fd)
            with make() as s:
                return fn(s)
        home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(ns_fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the TAP's network namespace")
            try:
                s = make()
            finally:
                if _libc.setns(home, _CLONE_NEWNET) != 0:  # pragma: no cover
                    raise OSError(ctypes.get_errno(), "setns back")
            with s:
                return fn(s)
        finally:
            os.close(home)
            os.close(ns_fd)

    def link_up(self) -> bool:
        """Is the interface up: administratively (IFF_UP) and running (IFF_RUNNING,
        which a TAP loses with its carrier)?"""

        def flags(s: socket.socket) -> int:
            return _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(self.name)))[1]

        f = self._in_device_netns(flags)
        return bool(f & IFF_UP and f & IFF_RUNNING)

    def ifindex(self) -> int:
        def get(s: socket.socket) -> int:
            return _IFREQ_INT.unpack(fcntl.ioctl(s, SIOCGIFINDEX, _ifreq(self.name)))[1]

        return self._in_device_netns(get)

    def link_events(self) -> socket.socket:
        """A netlink socket, in the namespace the TAP is in now, that hears every
        link change there (RTMGRP_LINK): how a carrier or admin change is seen."""

        def netlink() -> socket.socket:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)

        nl = self._in_device_netns(lambda s: s.dup(), netlink)  # `with` closes the original
        nl.bind((0, RTMGRP_LINK))
        nl.setblocking(False)
        return nl

    def mtu(self) -> int:
        def get(s: socket.socket) -> int:
            return _IFREQ_INT.unpack(fcntl.ioctl(s, SIOCGIFMTU, _ifreq(self.name)))[1]

        return self._in_device_netns(get)

    def set_mtu(self, mtu: int) -> None:
        def put(s: socket.socket) -> None:
            fcntl.ioctl(s, SIOCSIFMTU, _IFREQ_INT.pack(self.name.encode(), mtu))

        try:
            self._in_device_netns(put)
        except OSError as e:
            raise TapError(f"{self.name}: cannot set MTU {mtu}: {e.strerror}") from e

    # --- frames ------------------------------------------------------------------------

    def fileno(self) -> int:
        return self.fd

    def read_iovec(self, buffers: list) -> int:
        """One frame into `buffers` (readv). Raises BlockingIOError when none is queued."""
        return os.readv(self.fd, buffers)

    def write_iovec(self, buffers: list) -> int:
        """One frame from `buffers` (writev)."""
        return os.writev(self.fd, buffers)

    def open_span_writer(self) -> SpanWriter | None:
        """A ring for batched writes to this queue (io_uring), for the caller to
        use in this process and close. None when --io-uring=off, when io_uring
        is unavailable here (said once), or when sndbuf= is finite: the kernel
        may then refuse one frame of a batch and take the next, and frames must
        not be reordered, so each goes by its own writev and waits for room."""
        if not self._may_use(SpanWriter) or self.sndbuf() != 2**31 - 1:
            return None
        return self._make_ring(SpanWriter, "TX frames go one writev each")

    def open_span_reader(self) -> SpanReader | None:
        """A ring for batched reads from this queue (io_uring), for the caller to
        use in this process and close; None when --io-uring=off or io_uring is
        unavailable here (said once)."""
        if not self._may_use(SpanReader):
            return None
        return self._make_ring(SpanReader, "RX frames are read one readv each")

    def _may_use(self, kind: type) -> bool:
        return self.io_uring != "off" and kind not in self._uring_refused

    def _make_ring(self, kind, instead: str):
        try:
            return kind(self.fd)
        except UringUnavailableError as e:
            self._uring_refused.add(kind)
            say = log.warning if self.io_uring == "on" else log.info
            say("%s: %s; %s (--io-uring)", self.name, e, instead)
            return None

    def sndbuf(self) -> int:
        """The queue's send buffer limit (INT_MAX: none, the default)."""
        return struct.unpack("i", fcntl.ioctl(self.fd, TUNGETSNDBUF, bytes(4)))[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Tap({self.name}, fd={self.fd}, vnet_hdr={self.has_vnet_hdr})"
