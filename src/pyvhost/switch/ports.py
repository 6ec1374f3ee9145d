"""The switch's ports: VMs (vhost-user virtio-net) and uplinks (TAPs).

A VM port is pyvhost's virtio-net device on its own vhost-user socket, with
the switch as its host side (`SwitchSide`, a HostQueue): what the guest
transmits goes into the switch from inside its TX drain; what the switch
delivers is read straight into the guest's RX chain from the sender's views
(one copy, ring to ring). Only when the guest has posted no RX buffers is a
frame copied aside, into a bounded backlog that its next RX kick drains.

An uplink is a TAP queue opened with the `--netdev tap,...` grammar.
"""

from __future__ import annotations

import collections
import logging
import os

from pyvhost.backends.tap import Tap
from pyvhost.backends.tap_netdev import TapNetdev
from pyvhost.backends.tap_options import TapOptions
from pyvhost.devices.net.device import VirtioNet
from pyvhost.errors import OptionError
from pyvhost.eventloop import EventLoop
from pyvhost.switch.fabric import Port, PortConfig, Switch
from pyvhost.switch.frame import ALL_OFFLOADS, Frame, VnetHeader
from pyvhost.vhost_user.daemon import Daemon
from pyvhost.virtq.iov import copy_views, skip

log = logging.getLogger(__name__)

# Frames kept for a guest that has no RX buffers posted (a switch's egress
# queue; a TAP's default is 1000).
BACKLOG = 1024
UPLINK_BUDGET = 64
MAX_FRAME = 65536 + 256


class SwitchSide:
    """The host side of a VM port's virtio-net device: the switch."""

    has_vnet_hdr = True

    def __init__(self, port: VmPort) -> None:
        self.port = port
        self.name = port.name
        self.hdr_size = 12
        self._current: Frame | None = None
        self.backlog: collections.deque[Frame] = collections.deque()

    # --- what the device asks of a host queue --------------------------------------

    def fileno(self) -> None:
        return None  # frames are pushed (deliver), not polled

    def has_frames(self) -> bool:
        return self._current is not None or bool(self.backlog)

    def set_vnet_hdr_size(self, size: int) -> None:
        self.hdr_size = size

    def offload_supported(self, flags: int) -> bool:
        return True  # what a guest sends is segmented or checksummed where needed

    def set_offload(self, flags: int) -> None:
        self.port.offloads = flags  # what the guest takes: the switch adapts to it

    def set_queue_attached(self, attached: bool) -> None:
        pass

    def link_up(self) -> bool:
        return True

    def set_mtu(self, mtu: int) -> None:
        pass  # the port's MTU is the switch's configuration

    # --- frames ------------------------------------------------------------------------

    def write_iovec(self, buffers: list) -> int:
        """The guest transmitted a chain (header first): into the switch."""
        total = sum(len(b) for b in buffers)
        head = buffers[0]
        if len(head) < 10:
            head = b"".join(bytes(b) for b in buffers)[:10]
        frame = Frame(VnetHeader.unpack(head), skip(buffers, self.hdr_size))
        self.port.switch.ingress(self.port, frame)
        return total

    def read_iovec(self, buffers: list) -> int:
        """The next frame for the guest, into its RX buffers (header first)."""
        frame = self._current
        if frame is not None:
            self._current = None
        elif self.backlog:
            frame = self.backlog.popleft()
        else:
            raise BlockingIOError
        return copy_views([frame.header.pack(self.hdr_size), *frame.views], buffers)

    def deliver(self, frame: Frame) -> bool:
        """The switch hands the guest a frame: into its ring now (one copy), or
        into the backlog if it has no RX buffers; False if that is full too."""
        pair = self.port.device.pairs[0] if self.port.device.pairs else None
        if pair is None or pair.rxq is None or not pair.rx_enabled:
            return False
        if not self.backlog:
            self._current = frame
            try:
                pair.process_tap_rx_event()
            except Exception as e:  # this VM's trouble, not the sender's
                self._current = None
                self.port.daemon.loop_error(e)
                return False
            if self._current is None:
                return True  # taken straight from the sender's memory
            self._current = None
        if len(self.backlog) >= BACKLOG:
            return False
        # The sender's buffers go back to it after this call: keep a copy.
        self.backlog.append(Frame(frame.header, [frame.tobytes()], frame.vlan))
        pair._wake()  # read when the loop comes round, if the guest has buffers
        return True

    def drop_backlog(self) -> None:
        self.backlog.clear()


class VmPort(Port):
    """A VM's virtio-net, on its own vhost-user socket (server or client mode)."""

    kind = "vm"

    def __init__(
        self,
        config: PortConfig,
        socket_path: str,
        loop: EventLoop,
        *,
        client: bool = False,
        tx_usecs: int = 1000,
        rx_usecs: int = 1000,
    ) -> None:
        super().__init__(config)
        self.socket_path = socket_path
        self.side = SwitchSide(self)
        mac = config.mac or _local_mac(config.name)
        self.device = VirtioNet(
            [self.side], mac=mac, mtu=config.mtu, tx_usecs=tx_usecs, rx_usecs=rx_usecs
        )
        self.device.on_reset = self._on_reset
        self.daemon = Daemon(self.device, socket_path, client=client, loop=loop)

    @property
    def up(self) -> bool:
        pairs = self.device.pairs
        return bool(pairs) and pairs[0].rxq is not None and pairs[0].rx_enabled

    def transmit(self, frame: Frame) -> bool:
        return self.side.deliver(frame)

    def _on_reset(self) -> None:
        """The VM went away (or reset its device): its frames and MACs go too."""
        self.side.drop_backlog()
        if self.switch is not None:
            self.switch.forget(self)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "socket": self.socket_path,
            "connected": self.daemon.conn is not None,
            "sessions": self.daemon.sessions,
            "backlog": len(self.side.backlog),
            "host_io": self.device.host_io()[0],  # {"rx": "switch", ...} while a VM is served
        }

    def close(self) -> None:
        self.daemon.close()


class UplinkPort(Port):
    """A TAP, in the `--netdev tap,...` grammar: the switch's way to the host."""

    kind = "uplink"

    def __init__(self, config: PortConfig, options: TapOptions, loop: EventLoop) -> None:
        super().__init__(config)
        if options.vhost:
            raise OptionError(
                f"uplink {config.name}: vhost=on hands the TAP to the kernel, which cannot "
                "switch frames; use vhost=off (the default) for an uplink"
            )
        if options.queues != 1:
            raise OptionError(f"uplink {config.name}: one queue (queues=1) per uplink")
        self.loop = loop
        self.netdev = TapNetdev.open(options)
        self.tap: Tap = self.netdev.queues[0]
        self.hdr_size = 0
        if self.tap.has_vnet_hdr:
            self.hdr_size = 12
            self.tap.set_vnet_hdr_size(self.hdr_size)
            if self.tap.offload_supported(ALL_OFFLOADS):
                self.tap.set_offload(ALL_OFFLOADS)  # the kernel hands us GSO frames
                self.offloads = ALL_OFFLOADS  # and takes them: it segments for the wire
            else:
                self.tap.set_offload(0)
        self._buf = bytearray(MAX_FRAME)
        self._view = memoryview(self._buf)
        with loop.owned_by(self):
            loop.add_reader(self.tap.fileno(), self._on_readable)

    @property
    def ifname(self) -> str:
        return self.tap.name

    def _on_readable(self) -> None:
        view, h = self._view, self.hdr_size
        for _ in range(UPLINK_BUDGET):
            try:
                n = os.readv(self.tap.fileno(), [view])
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("uplink %s: reading the TAP failed: %s", self.name, e.strerror)
                return
            header = VnetHeader.unpack(view) if h else VnetHeader()
            # The buffer is reused for the next read: ports copy (or keep a copy).
            self.switch.ingress(self, Frame(header, [view[h:n]]))

    def transmit(self, frame: Frame) -> bool:
        head = [frame.header.pack(self.hdr_size)] if self.hdr_size else []
        try:
            os.writev(self.tap.fileno(), head + list(frame.views))
        except BlockingIOError:
            return False
        except OSError as e:
            log.debug("uplink %s: the TAP refused a frame: %s", self.name, e.strerror)
            return False
        return True

    def loop_error(self, error: Exception) -> None:
        log.error("uplink %s: unexpected error; the frame is lost", self.name, exc_info=error)

    def describe(self) -> dict:
        return {**super().describe(), "interface": self.tap.name}

    def close(self) -> None:
        self.loop.remove_reader(self.tap.fileno())
        self.netdev.close()


def _local_mac(name: str) -> bytes:
    """A stable, locally administered MAC for a port that names none."""
    import hashlib

    digest = hashlib.sha256(name.encode()).digest()
    return bytes([0x52, 0x54, 0x00]) + digest[:3]


__all__ = ["Switch", "UplinkPort", "VmPort"]
