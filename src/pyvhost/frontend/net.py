"""A virtio-net front-end in Python: VMM and guest driver in one object.

It shares memfd RAM with a vhost-user back-end, lays out the rings with the
driver-side queue, and sends and receives Ethernet frames, so a back-end
(pyvhost, DPDK's vhost PMD, anything) can be driven with no VM at all.

    with NetFrontend.connect("/tmp/vhost.sock") as fe:
        fe.post_rx()
        fe.send(frame)
        frames = fe.receive(timeout=1.0)
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field

from pyvhost.devices.net import spec
from pyvhost.errors import PeerError
from pyvhost.frontend.client import VhostUserClient, eventfd
from pyvhost.memory import LOG_PAGE
from pyvhost.memory.iommu import IOTLB_RW
from pyvhost.testing import GuestRam
from pyvhost.testing.memfd import memfd
from pyvhost.vhost_user.codec import MessageReader, encode
from pyvhost.vhost_user.messages import U64, IotlbMsg, MemoryRegionDesc
from pyvhost.vhost_user.protocol import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    ProtocolFeature as PF,
    mask,
)
from pyvhost.virtq import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    DriverQueue,
    ring_footprint,
)
from pyvhost.virtq.layout import VIRTIO_F_ACCESS_PLATFORM
from pyvhost.virtq.packed_driver import PackedDriverQueue, packed_footprint
from pyvhost.virtq.packed_layout import VIRTIO_F_RING_PACKED, vring_base

log = logging.getLogger(__name__)

# A made-up VMM virtual address for guest address 0: frontend addresses are
# deliberately unlike guest ones, so a back-end mixing them up fails loudly.
FRONTEND_BASE = 0x7F00_0000_0000
# With `iommu`: the device sees guest address A at I/O virtual address IOVA_OFFSET + A.
IOVA_OFFSET = 0x10_0000_0000
IOTLB_PAGE = 4096
# virtio device status bits (virtio 1.x section 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8

TX_SLOT = 65536 + 128  # a 64 KiB GSO frame and its header fit in one TX buffer

WANTED_FEATURES = mask(
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    spec.F_MAC,
    spec.F_STATUS,
    spec.F_MRG_RXBUF,
    spec.F_MTU,
    spec.F_CTRL_VQ,
    spec.F_CTRL_RX,
    spec.F_CTRL_MAC_ADDR,
    spec.F_CTRL_GUEST_OFFLOADS,
    spec.F_MQ,
    spec.F_CSUM,
    spec.F_GUEST_CSUM,
    spec.F_HOST_TSO4,
    spec.F_HOST_TSO6,
    spec.F_HOST_ECN,
    spec.F_GUEST_TSO4,
    spec.F_GUEST_TSO6,
    spec.F_GUEST_ECN,
    VHOST_USER_F_PROTOCOL_FEATURES,
)
WANTED_PROTOCOL = mask(
    PF.MQ,
    PF.LOG_SHMFD,
    PF.REPLY_ACK,
    PF.CONFIG,
    PF.CONFIGURE_MEM_SLOTS,
    PF.NET_MTU,
    PF.RESET_DEVICE,
    PF.STATUS,
    PF.RARP,
    PF.BACKEND_REQ,
)


@dataclass
class Ring:
    index: int
    queue: DriverQueue | PackedDriverQueue
    kick: int
    call: int
    err: int
    slots: list[int]  # free buffer addresses
    slot_size: int
    inflight: dict[int, int | None] = field(default_factory=dict)  # head -> TX/RX slot
    completed: int = 0  # chains the back-end has returned, in all


class NetFrontend:
    def __init__(
        self,
        client: VhostUserClient,
        *,
        queue_pairs: int = 1,
        queue_size: int = 256,
        rx_buf_size: int = 2048,
        mem_size: int | None = None,
        features: int | None = None,
        protocol_features: int | None = None,
        use_add_mem_reg: bool = False,
        packed: bool = False,
        iommu: bool = False,
        iotlb_prefill: bool = True,
    ) -> None:
        """`packed`: ask for VIRTIO_F_RING_PACKED and drive packed rings if the
        back-end offers it (`self.packed` says whether it did).

        `iommu`: ask for VIRTIO_F_ACCESS_PLATFORM and play a vIOMMU: the device
        sees every ring and buffer at I/O virtual address IOVA_OFFSET + guest
        address. With `iotlb_prefill` the whole RAM is mapped (read-write) at
        set-up; without, nothing is, and poll_backend_requests() answers each
        IOTLB miss with the page it asked for (`iotlb_misses` records them)."""
        self.client = client
        self.queue_pairs = queue_pairs
        self.queue_size = queue_size
        self.rx_buf_size = rx_buf_size
        if mem_size is None:
            # Every ring's buffers plus the rings; memfds are sparse, so room is cheap.
            per_pair = queue_size * (TX_SLOT + rx_buf_size + 64) + 2 * ring_footprint(queue_size)
            need = queue_pairs * per_pair + queue_size * 4096 * 2 + (8 << 20)
            mem_size = (need + (2 << 20) - 1) & ~((2 << 20) - 1)
        self.ram = GuestRam(mem_size, name="pyvhost-frontend-ram")
        self.extra_regions: list[tuple[MemoryRegionDesc, GuestRam]] = []
        self.rings: dict[int, Ring] = {}
        self._want_features = WANTED_FEATURES if features is None else features
        if packed:
            self._want_features |= 1 << VIRTIO_F_RING_PACKED
        if iommu:
            self._want_features |= 1 << VIRTIO_F_ACCESS_PLATFORM
        self._iotlb_prefill = iotlb_prefill
        self.iotlb_misses: list[IotlbMsg] = []
        self.iotlb_perm = IOTLB_RW  # what answers to misses grant
        self._want_protocol = WANTED_PROTOCOL if protocol_features is None else protocol_features
        self._use_add_mem_reg = use_add_mem_reg
        self.features = 0
        self.hdr_size = spec.HDR_SIZE
        self.backend_channel: socket.socket | None = None  # the back-end's requests
        self.backend_requests: list[int] = []  # what came on it, in order
        self.log_fd: int | None = None  # the dirty log, once logging started
        self.log_size = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0, **kwargs) -> NetFrontend:
        fe = cls(VhostUserClient.connect(path, timeout), **kwargs)
        try:
            fe.setup()
        except BaseException:
            fe.close()
            raise
        return fe

    # --- bring-up, in the order QEMU does it -------------------------------------------

    def setup(self) -> None:
        c = self.client
        offered = c.get_features()
        if offered & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            c.set_protocol_features(c.get_protocol_features() & self._want_protocol)
        c.set_owner()
        if c.protocol_features & (1 << PF.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                c.set_backend_req_fd(theirs.fileno())
            finally:
                theirs.close()
            ours.setblocking(False)
            self.backend_channel = ours
            self._channel_reader = MessageReader()
        pairs = self.queue_pairs
        if c.protocol_features & (1 << PF.MQ):
            pairs = c.get_queue_num()
            if pairs < self.queue_pairs:
                raise PeerError(f"back-end serves {pairs} queue pairs; {self.queue_pairs} wanted")
        self.features = offered & self._want_features
        if self.queue_pairs == 1:
            self.features &= ~(1 << spec.F_MQ)  # one pair: the control queue sits at 2
        self.max_pairs = pairs if self.features & (1 << spec.F_MQ) else 1
        c.set_features(self.features)
        self.hdr_size = spec.header_size(self.features)
        self._set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        self._share_memory()
        for pair in range(self.queue_pairs):
            for index in (spec.rx_queue(pair), spec.tx_queue(pair)):
                self._setup_ring(index)
        if self.features & (1 << spec.F_CTRL_VQ):
            self._setup_ring(self.ctrl_index)
        # Back-ends with STATUS (DPDK's among them) wait for DRIVER_OK to start.
        self._set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    def _set_status(self, status: int) -> None:
        if self.client.protocol_features & (1 << PF.STATUS):
            self.client.set_status(status)

    def _share_memory(self) -> None:
        desc = MemoryRegionDesc(0, self.ram.size, FRONTEND_BASE, 0)
        if self._use_add_mem_reg:
            self.client.add_mem_reg(desc, self.ram.fd)
        else:
            self.client.set_mem_table([desc], [self.ram.fd])
        if self.iommu and self._iotlb_prefill:
            self.client.iotlb_update(IOVA_OFFSET, self.ram.size, FRONTEND_BASE, IOTLB_RW)

    @property
    def iommu(self) -> bool:
        return bool(self.features & (1 << VIRTIO_F_ACCESS_PLATFORM))

    def dma(self, addr: int) -> int:
        """The address the device sees for guest address `addr`."""
        return IOVA_OFFSET + addr if self.iommu else addr

    @property
    def packed(self) -> bool:
        return bool(self.features & (1 << VIRTIO_F_RING_PACKED))

    @property
    def ctrl_index(self) -> int:
        return 2 * self.max_pairs if self.features & (1 << spec.F_MQ) else 2

    def _setup_ring(self, index: int) -> None:
        c, size = self.client, self.queue_size
        event_idx = bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX))
        if self.packed:
            base = self.ram.alloc(packed_footprint(size), align=4096)
            q = PackedDriverQueue.layout(self.ram.memory, base, size, event_idx=event_idx)
        else:
            base = self.ram.alloc(ring_footprint(size), align=4096)
            q = DriverQueue.layout(self.ram.memory, base, size, event_idx=event_idx)
        if index == self.ctrl_index and self.features & (1 << spec.F_CTRL_VQ):
            slot = 4096
        elif index % 2 == 1:
            slot = TX_SLOT
        else:
            slot = self.rx_buf_size
        slots = [self.ram.alloc(slot, align=64) for _ in range(size)]
        ring = Ring(index, q, eventfd(), eventfd(), eventfd(), slots, slot)
        q.kick_fd = ring.kick
        self.rings[index] = ring
        c.set_vring_num(index, size)
        # A packed ring starts at position 0 with both wrap counters 1.
        c.set_vring_base(index, vring_base(0, 1, 0, 1) if self.packed else 0)
        device_view = self.dma if self.iommu else (lambda a: FRONTEND_BASE + a)
        c.set_vring_addr(
            index, device_view(q.desc_addr), device_view(q.used_addr), device_view(q.avail_addr)
        )
        c.set_vring_err(index, ring.err)
        c.set_vring_kick(index, ring.kick)
        c.set_vring_call(index, ring.call)
        if self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            c.set_vring_enable(index, True)

    # --- memory hot-plug ------------------------------------------------------------------

    def add_region(self, guest_addr: int, size: int) -> tuple[MemoryRegionDesc, GuestRam]:
        """Hot-add a memfd DIMM (ADD_MEM_REG); returns its description and RAM."""
        ram = GuestRam(size, guest_addr, "pyvhost-frontend-dimm", memory=self.ram.memory)
        desc = MemoryRegionDesc(guest_addr, size, FRONTEND_BASE + guest_addr, 0)
        try:
            self.client.add_mem_reg(desc, ram.fd)
        except BaseException:
            ram.close()
            raise
        self.extra_regions.append((desc, ram))
        return desc, ram

    def remove_region(self, desc: MemoryRegionDesc) -> None:
        """Hot-remove a DIMM added with add_region (REM_MEM_REG)."""
        self.client.rem_mem_reg(desc)
        for i, (d, ram) in enumerate(self.extra_regions):
            if d == desc:
                ram.close()
                del self.extra_regions[i]
                break

    # --- traffic ----------------------------------------------------------------------------

    def header(self, **fields: int) -> bytes:
        values = dict(
            flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, num_buffers=0
        )
        values.update(fields)
        return spec.HDR.pack(*values.values())[: self.hdr_size]

    def send(
        self,
        frame: bytes,
        pair: int = 0,
        header: bytes | None = None,
        kick: bool = True,
        buffer: int | None = None,
        split_header: bool = False,
    ) -> int:
        """Post one frame (with a virtio-net header) on pair's TX queue. With
        `kick=False` the frame is published but the kick eventfd is not signalled
        (a back-end that polls must find it on its own). `buffer`: a guest address
        to send it from (e.g. in a hot-added region) instead of a TX slot.
        `split_header`: the header and the frame in descriptors of their own, as
        a driver without VIRTIO_F_ANY_LAYOUT posts them."""
        ring = self.rings[spec.tx_queue(pair)]
        self._reclaim(ring)
        data = (self.header() if header is None else header) + frame
        if buffer is None:
            if len(data) > ring.slot_size:
                raise ValueError(f"frame of {len(frame)} bytes does not fit a TX buffer")
            if not ring.slots:
                raise BlockingIOError("TX ring full: the back-end has not returned buffers")
            addr = ring.slots.pop()
        else:
            addr = buffer
        self.ram.memory.write(addr, data)
        if split_header:
            hdr = len(data) - len(frame)
            parts = [(self.dma(addr), hdr), (self.dma(addr + hdr), len(frame))]
        else:
            parts = [(self.dma(addr), len(data))]
        head = ring.queue.add(readable=parts)
        ring.inflight[head] = addr if buffer is None else None
        if kick:
            ring.queue.kick()
        else:
            ring.queue.publish()
        return head

    def kick(self, index: int) -> None:
        self.rings[index].queue.kick()

    def tx_done(self, pair: int = 0) -> int:
        """How many frames sent on `pair` the back-end has returned, in all."""
        ring = self.rings[spec.tx_queue(pair)]
        self._reclaim(ring)
        return ring.completed

    def _reclaim(self, ring: Ring) -> None:
        done = ring.queue.used()
        for head, _ in done:
            slot = ring.inflight.pop(head)
            if slot is not None:  # None: the caller's own buffer
                ring.slots.append(slot)
        ring.completed += len(done)

    def post_rx(self, pair: int = 0, count: int | None = None) -> int:
        """Give the back-end empty RX buffers (all free ones by default)."""
        ring = self.rings[spec.rx_queue(pair)]
        n = len(ring.slots) if count is None else min(count, len(ring.slots))
        for _ in range(n):
            addr = ring.slots.pop()
            head = ring.queue.add(writable=[(self.dma(addr), ring.slot_size)])
            ring.inflight[head] = addr
        if n:
            ring.queue.kick()
        return n

    def receive(
        self, pair: int = 0, timeout: float = 1.0, count: int = 1, with_header: bool = False
    ) -> list[bytes]:
        """Frames received on pair's RX queue: wait until `count` arrived or timeout.

        Merged buffers (MRG_RXBUF) are joined; the header is stripped unless
        `with_header`. Used buffers are posted again.
        """
        ring = self.rings[spec.rx_queue(pair)]
        frames: list[bytes] = []
        pending: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            pending += ring.queue.used()
            while pending:
                frame, used = self._assemble(ring, pending)
                if frame is None:
                    break
                del pending[:used]
                frames.append(frame if with_header else frame[self.hdr_size :])
            if len(frames) >= count:
                break
            if len(ring.slots) >= 32:
                self.post_rx(
                    pair
                )  # hand read buffers back before sleeping: the device may be starved
            if ring.queue.enable_interrupts():
                continue  # buffers came back while we re-armed: no sleep
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wait(ring.call, left)
        self.post_rx(pair)
        return frames

    def discard(self, pair: int = 0, timeout: float = 1.0) -> tuple[int, int]:
        """Take what arrived on pair's RX queue without reading it, as a packet
        sink does (DPDK's rxonly): (buffers, bytes) returned by the back-end,
        headers included. Waits up to `timeout` for the first; every buffer is
        posted again at once, so the back-end is never kept waiting on us."""
        ring = self.rings[spec.rx_queue(pair)]
        deadline = time.monotonic() + timeout
        while True:
            used = self.reclaim_rx(pair)
            if used:
                self.post_rx(pair)
                return len(used), sum(n for _, n in used)
            if ring.queue.enable_interrupts():
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return 0, 0
            self._wait(ring.call, left)

    def reclaim_rx(self, pair: int = 0) -> list[tuple[int, int]]:
        """The buffers the back-end returned on pair's RX queue, (head, length)
        each, taken back unread as free slots (not posted again)."""
        ring = self.rings[spec.rx_queue(pair)]
        used = ring.queue.used()
        for head, _ in used:
            ring.slots.append(ring.inflight.pop(head))
        return used

    def _assemble(self, ring: Ring, used: list[tuple[int, int]]) -> tuple[bytes | None, int]:
        """One frame from the front of `used`, or None if its merged buffers are not all in."""
        nbuf = 1
        if self.features & (1 << spec.F_MRG_RXBUF):
            header = self.ram.memory.read(ring.inflight[used[0][0]], spec.HDR_SIZE)
            nbuf = max(1, spec.HDR.unpack(header)[6])
        if len(used) < nbuf:
            return None, 0
        return b"".join(self._take(ring, h, n) for h, n in used[:nbuf]), nbuf

    def _take(self, ring: Ring, head: int, length: int) -> bytes:
        addr = ring.inflight.pop(head)
        data = self.ram.memory.read(addr, min(length, ring.slot_size))
        ring.slots.append(addr)
        return data

    @staticmethod
    def _wait(fd: int, timeout: float) -> None:
        ready, _, _ = select.select([fd], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def command(self, cls: int, cmd: int, data: bytes = b"", timeout: float = 5.0) -> int:
        """Send a control-queue command; returns the device's ack (0 is OK)."""
        ring = self.rings[self.ctrl_index]
        self._reclaim(ring)
        cmd_addr, ack_addr = ring.slots.pop(), ring.slots.pop()
        self.ram.memory.write(cmd_addr, bytes([cls, cmd]) + data)
        self.ram.memory.write(ack_addr, b"\xff")
        head = ring.queue.add(
            readable=[(self.dma(cmd_addr), 2 + len(data))], writable=[(self.dma(ack_addr), 1)]
        )
        ring.inflight[head] = cmd_addr
        ring.queue.kick()
        deadline = time.monotonic() + timeout
        before = ring.completed
        while True:
            self._reclaim(ring)
            if ring.completed != before:
                break
            if time.monotonic() > deadline:
                raise PeerError(f"no answer to control command {cls}/{cmd} in {timeout} s")
            if not ring.queue.enable_interrupts():
                self._wait(ring.call, 0.05)
        ring.slots.append(ack_addr)
        return self.ram.memory.read(ack_addr, 1)[0]

    def set_queue_pairs(self, n: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, as a multiqueue driver sends it."""
        status = self.command(spec.CTRL_MQ, spec.CTRL_MQ_VQ_PAIRS_SET, n.to_bytes(2, "little"))
        if status != spec.CTRL_OK:
            raise PeerError(f"the device refused {n} queue pairs")

    def poll_backend_requests(self, timeout: float = 0.0, status: int = 0) -> list[int]:
        """Read the back-end's requests (answering each that asks for an ack with
        `status`: 0 is success); returns the request numbers that came now (also
        kept in backend_requests)."""
        ch = self.backend_channel
        if ch is None:
            return []
        got: list[int] = []
        if timeout:
            select.select([ch], [], [], timeout)
        while True:
            try:
                data = ch.recv(4096)
            except BlockingIOError:
                break
            if not data:
                break
            for frame in self._channel_reader.feed(data):
                frame.close_fds()
                got.append(frame.header.request)
                if frame.header.request == BackendRequest.IOTLB_MSG:
                    self._answer_iotlb_miss(IotlbMsg.unpack(frame.body))
                if frame.need_reply:
                    ch.sendall(encode(frame.header.request, U64(status), reply=True))
        self.backend_requests += got
        return got

    def _answer_iotlb_miss(self, miss: IotlbMsg) -> None:
        """As QEMU does: look the page up in "the vIOMMU" (IOVA_OFFSET + guest
        address) and send the update, before acking the miss."""
        self.iotlb_misses.append(miss)
        page = miss.iova & ~(IOTLB_PAGE - 1)
        gpa = page - IOVA_OFFSET
        if 0 <= gpa < self.ram.size:
            self.client.iotlb_update(page, IOTLB_PAGE, FRONTEND_BASE + gpa, self.iotlb_perm)

    def ring_errors(self, index: int) -> int:
        """How often the back-end signalled ring `index`'s error eventfd."""
        try:
            return os.eventfd_read(self.rings[index].err)
        except BlockingIOError:
            return 0

    # --- live migration: dirty logging ----------------------------------------------------

    def start_logging(self) -> None:
        """As QEMU does when a migration starts: share a log (SET_LOG_BASE), ack
        VHOST_F_LOG_ALL, and give each ring its used-ring log address."""
        if self.log_fd is None:
            pages = (self.ram.guest_base + self.ram.size) // LOG_PAGE
            self.log_size = (pages + 63) // 64 * 8
            self.log_fd = memfd(self.log_size, "pyvhost-frontend-log")
        self.client.set_log_base(self.log_fd, self.log_size)
        self.client.set_features(self.features | 1 << VHOST_F_LOG_ALL)
        self._set_ring_addresses(logging=True)

    def stop_logging(self) -> None:
        self.client.set_features(self.features)
        self._set_ring_addresses(logging=False)

    def _set_ring_addresses(self, logging: bool) -> None:
        for index, ring in self.rings.items():
            q = ring.queue
            self.client.set_vring_addr(
                index,
                FRONTEND_BASE + q.desc_addr,
                FRONTEND_BASE + q.used_addr,
                FRONTEND_BASE + q.avail_addr,
                log=q.used_addr if logging else None,
            )

    def dirty_pages(self, clear: bool = True) -> set[int]:
        """Guest pages the back-end logged as written since the last call."""
        data = bytearray(os.pread(self.log_fd, self.log_size, 0))
        if clear:
            os.pwrite(self.log_fd, bytes(self.log_size), 0)  # a test's race-free moment
        return {i * 8 + b for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}

    # --- teardown --------------------------------------------------------------------------

    def stop_rings(self) -> dict[int, int]:
        """GET_VRING_BASE on every ring: the back-end stops it and says where it was."""
        return {i: self.client.get_vring_base(i) for i in self.rings}

    def close(self) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.client.close()
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None
        for ring in self.rings.values():
            for fd in (ring.kick, ring.call, ring.err):
                os.close(fd)
        self.rings.clear()
        for _, ram in self.extra_regions:
            ram.close()
        self.extra_regions.clear()
        self.ram.close()

    def __enter__(self) -> NetFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
