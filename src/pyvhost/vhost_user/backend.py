"""The vhost-user back-end: one front-end's session, as a state machine.

`handle(frame)` takes one frame off the wire and returns the reply bytes (or
None). Request handling is a fixed pipeline:

    decode (size, payload, fds per request)  ->  gate (protocol feature)
      ->  dispatch  ->  close fds the handler did not take  ->  reply

No socket is touched here; the daemon owns the socket. Kick eventfds are
registered with the event loop so that each ring is served the moment it is
kicked.

Ring states (spec, "Ring states"): a ring is stopped until SET_VRING_KICK
starts it and GET_VRING_BASE stops it. With VHOST_USER_F_PROTOCOL_FEATURES
negotiated it starts disabled until SET_VRING_ENABLE; without, enabled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvhost.device import RingConfig, VirtioDevice
from pyvhost.errors import (
    FeatureNotNegotiatedError,
    GuestMemoryError,
    InvalidRequestError,
    InvalidRingIndexError,
    PyvhostError,
)
from pyvhost.eventloop import EventLoop
from pyvhost.memory import (
    DEFAULT_MAX_REGIONS,
    DirtyLog,
    FrontendAddress,
    GuestAddress,
    GuestMemory,
    RegionSpec,
    logging_supported,
)
from pyvhost.memory.iommu import IommuAddressSpace
from pyvhost.vhost_user.channel import BackendChannel, channel_from
from pyvhost.vhost_user.codec import REQUESTS, Frame, Message, decode_request, encode, request_name
from pyvhost.vhost_user.messages import (
    IOTLB_BATCH_BEGIN,
    IOTLB_BATCH_END,
    IOTLB_INVALIDATE,
    IOTLB_MISS,
    IOTLB_UPDATE,
    U64,
    ConfigSpace,
    Header,
    IotlbMsg,
    MemoryRegionDesc,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.vhost_user.protocol import (
    FLAG_REPLY,
    VERSION,
    VERSION_MASK,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_VRING_F_LOG,
    BackendRequest,
    ProtocolFeature as PF,
    Request as R,
    mask,
)
from pyvhost.virtq.layout import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    is_valid_queue_size,
)
from pyvhost.virtq.packed_layout import VIRTIO_F_RING_PACKED

log = logging.getLogger(__name__)

_REFUSALS_LOGGED = 20  # per session, then sampled
_REFUSALS_SAMPLED = 1000

# What pyvhost offers of the protocol extensions.
OFFERED_PROTOCOL_FEATURES = mask(
    PF.MQ,
    PF.LOG_SHMFD,
    PF.REPLY_ACK,
    PF.NET_MTU,
    PF.CONFIG,
    PF.RESET_DEVICE,
    PF.CONFIGURE_MEM_SLOTS,
    PF.STATUS,
    PF.RARP,
    PF.BACKEND_REQ,
)


@dataclass(eq=False)
class Vring:
    """What the front-end told us of one ring; `config` while it is started."""

    index: int
    size: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    polled: bool = False  # started with the no-fd flag: poll instead of waiting for kicks
    enabled: bool = False
    config: RingConfig | None = None  # handed to the device while the ring runs
    errors: list[str] = field(default_factory=list)  # why the ring broke, across restarts

    @property
    def started(self) -> bool:
        return self.config is not None


class Backend:
    """One front-end session with one device."""

    def __init__(self, device: VirtioDevice, loop: EventLoop) -> None:
        self.device = device
        self.loop = loop
        limit = device.max_memory_regions()  # e.g. what the kernel's vhost takes
        self.memory = GuestMemory(min(limit or DEFAULT_MAX_REGIONS, DEFAULT_MAX_REGIONS))
        self.offered_features = device.features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.offered_protocol_features = OFFERED_PROTOCOL_FEATURES
        # Live migration: dirty logging, where the device allows it and libatomic
        # is there to set bits in a log others write too.
        why_not = device.dirty_logging_unavailable() or logging_supported()
        if why_not is None:
            self.offered_features |= 1 << VHOST_F_LOG_ALL
        else:
            self.offered_protocol_features &= ~(1 << PF.LOG_SHMFD)
        self.log: DirtyLog | None = None  # SET_LOG_BASE's log, mapped
        self.fatal = False  # a refusal the session cannot go on after
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.protocol_features_set = False  # SET_PROTOCOL_FEATURES was received
        self.owner = False
        self.status = 0
        self.vrings = [Vring(i) for i in range(device.num_queues())]
        self.errors = 0  # requests refused, for tests and stats
        self.channel: BackendChannel | None = None  # SET_BACKEND_REQ_FD's socket
        # With ACCESS_PLATFORM the rings and buffers are I/O virtual addresses,
        # translated by this IOTLB; a miss is asked for on the back-end channel.
        self.iommu = IommuAddressSpace(self.memory)
        self.iommu.on_miss = self._iotlb_miss
        self.config_refused = False  # the front-end answered a config change with an error
        self.on_config_refused: Callable[[], None] | None = None
        # ADD_MEM_REG references per region: QEMU 7.2 sends the same region once
        # per queue pair (each pair is its own vhost_dev), and removes it as often.
        self._region_refs: dict[MemoryRegionDesc, tuple[tuple[int, int], int]] = {}

    # --- the pipeline ---------------------------------------------------------

    def handle(self, frame: Frame) -> bytes | None:
        """Process one frame; return reply bytes, or None when no reply is due."""
        spec = REQUESTS.get(_as_request(frame.header.request))
        try:
            msg = decode_request(frame)
            if spec.gate is not None and not self._has_protocol(spec.gate):
                raise FeatureNotNegotiatedError(
                    f"{msg.name} needs protocol feature {spec.gate.name}, not negotiated",
                    int(msg.request),
                )
            log.debug("%s %s fds=%s", msg.name, msg.payload, msg.fds)
            reply = getattr(self, f"_on_{msg.name.lower()}")(msg)
        except PyvhostError as e:
            # Refused: a protocol violation, bad memory, or a device that could
            # not do what was asked (an ioctl the kernel refused). The session
            # goes on; the front-end hears of it if it asked for an ack.
            _close_all(frame.fds)
            frame.fds.clear()
            self.errors += 1
            if self.errors <= _REFUSALS_LOGGED or self.errors % _REFUSALS_SAMPLED == 0:
                # A hostile peer must not be able to flood the log: past the first
                # few, one refusal in so many is logged, with the count.
                more = ""
                if self.errors >= _REFUSALS_LOGGED:
                    more = (f" ({self.errors} refused in this session; from here 1 in "
                            f"{_REFUSALS_SAMPLED} is logged)")  # fmt: skip
                log.error("refused %s: %s%s", request_name(frame.header.request), e, more)
            return self._failure_reply(frame, spec)
        _close_all(msg.fds)  # whatever the handler did not take
        if spec.reply is not None:
            return encode(msg.request, reply, reply=True)
        if msg.need_reply and self._has_protocol(PF.REPLY_ACK):
            return encode(msg.request, U64(0), reply=True)
        return None

    def _failure_reply(self, frame: Frame, spec) -> bytes | None:
        request = frame.header.request
        if frame.header.flags & VERSION_MASK != VERSION or frame.header.flags & FLAG_REPLY:
            return None  # not a request we understand: answering could desynchronise the peer
        if spec is not None and spec.reply is not None:
            # No failure code exists for these; an empty payload is the
            # spec's error signal for GET_CONFIG, and a size the front-end
            # will reject for the others.
            return _empty_reply(request)
        if frame.need_reply and self._has_protocol(PF.REPLY_ACK):
            return encode(request, U64(1), reply=True)
        return None

    def close(self) -> None:
        """The front-end is gone: stop every ring, close every fd, unmap memory.

        Every step runs even if an earlier one raised (a device bug must not
        keep guest RAM mapped or eventfds open); the first error is re-raised.
        """
        errors: list[Exception] = []
        for vring in self.vrings:
            for step in (self._stop, self._close_vring_fds):
                try:
                    step(vring)
                except Exception as e:
                    errors.append(e)
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.memory.set_log(None)
        if self.log is not None:
            self.log.close()
            self.log = None
        for step in (self.device.reset, self.iommu.close, self.memory.clear):
            try:
                step()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    # --- features and ownership ------------------------------------------------------

    def _has_protocol(self, feature: PF) -> bool:
        # SET_PROTOCOL_FEATURES needs no SET_FEATURES ack of bit 30 first (spec).
        return bool(self.acked_protocol_features & (1 << feature))

    @property
    def protocol_features_negotiated(self) -> bool:
        """Bit 30 acked, or protocol features set (which needs no ack, and which
        QEMU 7.2 follows with SET_VRING_ENABLE long before its SET_FEATURES)."""
        return self.protocol_features_set or bool(
            self.acked_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        )

    def _on_get_features(self, msg: Message) -> U64:
        return U64(self.offered_features)

    def _on_set_features(self, msg: Message) -> None:
        features = msg.payload.value
        extra = features & ~self.offered_features
        if extra:
            raise InvalidRequestError(
                f"SET_FEATURES acks {self.device.describe_features(extra)}, which was never "
                "offered",
                int(msg.request),
            )
        self.acked_features = features
        self.device.set_features(features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES))
        self._update_logging()
        log.info("features acked: %s", self.device.describe_features(features))

    def _on_get_protocol_features(self, msg: Message) -> U64:
        return U64(self.offered_protocol_features)

    def _on_set_protocol_features(self, msg: Message) -> None:
        features = msg.payload.value
        extra = features & ~self.offered_protocol_features
        if extra:
            raise InvalidRequestError(
                f"SET_PROTOCOL_FEATURES acks 0x{extra:x}, which was never offered",
                int(msg.request),
            )
        self.acked_protocol_features = features
        self.protocol_features_set = True

    def _on_set_owner(self, msg: Message) -> None:
        self.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings".
        for vring in self.vrings:
            self._set_enabled(vring, False)

    def _on_reset_device(self, msg: Message) -> None:
        for vring in self.vrings:
            self._stop(vring)
            self._close_vring_fds(vring)
        self.vrings = [Vring(i) for i in range(len(self.vrings))]
        self.acked_features = 0
        self.status = 0
        self.device.reset()

    def _on_get_queue_num(self, msg: Message) -> U64:
        return U64(self.device.max_queue_num())

    def _on_set_status(self, msg: Message) -> None:
        if msg.payload.value > 0xFF:
            raise InvalidRequestError(f"device status 0x{msg.payload.value:x} is not a u8")
        self.status = msg.payload.value

    def _on_get_status(self, msg: Message) -> U64:
        return U64(self.status)

    # --- memory ------------------------------------------------------------------------

    def _on_set_mem_table(self, msg: Message) -> None:
        specs = [_region_spec(r) for r in msg.payload.regions]
        fds = list(msg.fds)
        msg.fds.clear()  # owned by the memory layer from here, closed by it on failure
        self.memory.set_regions(zip(specs, fds, strict=True))
        self._region_refs.clear()
        self._retranslate_rings()

    def _on_get_max_mem_slots(self, msg: Message) -> U64:
        return U64(self.memory.max_regions)

    def _on_add_mem_reg(self, msg: Message) -> None:
        desc = msg.payload.region
        fd = msg.fds.pop()
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        known = self._region_refs.get(desc)
        if known is not None and known[0] == identity:
            os.close(fd)  # the same region, from the same file, again: one more reference
            self._region_refs[desc] = (identity, known[1] + 1)
            return
        self.memory.add_region(_region_spec(desc), fd)
        self._region_refs[desc] = (identity, 1)
        self._retranslate_rings()

    def _on_rem_mem_reg(self, msg: Message) -> None:
        # Identified by guest address, user address and size; mmap offset ignored.
        # An fd sent along (older QEMUs do) is closed unused by the pipeline.
        r = msg.payload.region
        for desc, (identity, refs) in self._region_refs.items():
            if (desc.guest_addr, desc.size, desc.user_addr) == (r.guest_addr, r.size, r.user_addr):
                if refs > 1:
                    self._region_refs[desc] = (identity, refs - 1)
                    return
                del self._region_refs[desc]
                break
        region = next(
            (
                m
                for m in self.memory.regions
                if m.start == r.guest_addr
                and m.size == r.size
                and int(m.frontend_addr) == r.user_addr
            ),
            None,
        )
        if region is None:
            raise InvalidRequestError(
                f"REM_MEM_REG: no region at guest 0x{r.guest_addr:x} size 0x{r.size:x} "
                f"user 0x{r.user_addr:x}"
            )
        self.memory.remove_region(r.guest_addr, r.size)

    # --- rings ------------------------------------------------------------------------------

    @property
    def _access_platform(self) -> bool:
        return bool(self.acked_features & (1 << VIRTIO_F_ACCESS_PLATFORM))

    @property
    def _packed(self) -> bool:
        return bool(self.acked_features & (1 << VIRTIO_F_RING_PACKED))

    def _vring(self, index: int, msg: Message) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise InvalidRingIndexError(
                f"{msg.name}: ring {index} does not exist; the device has {len(self.vrings)}",
                int(msg.request),
            )
        return self.vrings[index]

    def _on_set_vring_num(self, msg: Message) -> None:
        vring = self._vring(msg.payload.index, msg)
        size = msg.payload.num
        if self._packed and 0 < size <= MAX_QUEUE_SIZE:
            pass  # a packed ring may have any size up to 32768
        elif not is_valid_queue_size(size):
            raise InvalidRequestError(
                f"SET_VRING_NUM: ring {vring.index} size {size} is not a power of two "
                f"<= {MAX_QUEUE_SIZE}"
            )
        if vring.started:
            raise InvalidRequestError(f"SET_VRING_NUM: ring {vring.index} is running")
        vring.size = size

    def _on_set_vring_addr(self, msg: Message) -> None:
        vring = self._vring(msg.payload.index, msg)
        vring.addr = msg.payload
        if vring.started:
            self._restart(vring)

    def _on_set_vring_base(self, msg: Message) -> None:
        vring = self._vring(msg.payload.index, msg)
        packed = self._packed
        if msg.payload.num > (0xFFFF_FFFF if packed else 0xFFFF):
            raise InvalidRequestError(
                f"SET_VRING_BASE: ring {vring.index} base {msg.payload.num} is not a "
                f"{'u32 (packed ring)' if packed else 'u16'}"
            )
        if vring.started:
            raise InvalidRequestError(f"SET_VRING_BASE: ring {vring.index} is running")
        vring.base = msg.payload.num

    def _on_get_vring_base(self, msg: Message) -> VringState:
        # "stop ring upon receiving VHOST_USER_GET_VRING_BASE"; the fds go with it.
        vring = self._vring(msg.payload.index, msg)
        self._stop(vring)
        self._close_vring_fds(vring)
        return VringState(vring.index, vring.base)

    def _on_set_vring_kick(self, msg: Message) -> None:
        vring = self._vring(msg.payload.index, msg)
        fd = self._take_eventfd(msg)
        old, vring.kick_fd = vring.kick_fd, fd
        vring.polled = fd is None
        try:
            if vring.started:
                self._update_fds(vring)  # the engine lets go of the old fd
            else:
                self._start(vring)
        finally:
            if old is not None:
                os.close(old)

    def _on_set_vring_call(self, msg: Message) -> None:
        vring = self._vring(msg.payload.index, msg)
        fd = self._take_eventfd(msg)
        old, vring.call_fd = vring.call_fd, fd
        if vring.started:
            self._update_fds(vring)
            # The ring runs: a signal may have gone to the old fd after the
            # front-end stopped watching it (QEMU 10 with MSI-X checks its
            # masked notifier before a reconnected back-end has even started
            # the ring). A spurious interrupt is harmless; a lost one stalls
            # the driver for good under EVENT_IDX. libvhost-user does the same.
            if fd is not None:
                try:
                    os.eventfd_write(fd, 1)
                except BlockingIOError:
                    pass
        if old is not None:
            os.close(old)

    def _on_set_vring_err(self, msg: Message) -> None:
        vring = self._vring(msg.payload.index, msg)
        fd = self._take_eventfd(msg)
        old, vring.err_fd = vring.err_fd, fd
        if vring.started:
            self._update_fds(vring)
        if old is not None:
            os.close(old)

    def _update_fds(self, vring: Vring) -> None:
        """A started ring's fds changed: the engine serving it takes the new ones."""
        c = vring.config
        c.kick_fd, c.call_fd, c.err_fd, c.polled = (
            vring.kick_fd,
            vring.call_fd,
            vring.err_fd,
            vring.polled,
        )
        self.device.ring_fds_changed(vring.index)

    def _on_set_vring_enable(self, msg: Message) -> None:
        if not self.protocol_features_negotiated:
            raise FeatureNotNegotiatedError(
                "SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES, not negotiated",
                int(msg.request),
            )
        vring = self._vring(msg.payload.index, msg)
        if msg.payload.num not in (0, 1):
            raise InvalidRequestError(
                f"SET_VRING_ENABLE: ring {vring.index} state {msg.payload.num} is not 0 or 1"
            )
        self._set_enabled(vring, bool(msg.payload.num))

    def _take_eventfd(self, msg: Message) -> int | None:
        payload: VringFd = msg.payload
        if payload.no_fd:
            return None
        fd = msg.fds.pop()
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = "?"
        if target != "anon_inode:[eventfd]":
            os.close(fd)
            raise InvalidRequestError(
                f"{msg.name}: ring {payload.index} fd is {target}, not an eventfd"
            )
        os.set_blocking(fd, False)
        return fd

    # --- starting and stopping -----------------------------------------------------

    def _start(self, vring: Vring) -> None:
        if vring.addr is None or vring.size == 0:
            raise InvalidRequestError(
                f"ring {vring.index} kicked before SET_VRING_NUM and SET_VRING_ADDR"
            )
        if self._access_platform and self.channel is None:
            raise InvalidRequestError(
                f"ring {vring.index}: VIRTIO_F_ACCESS_PLATFORM was negotiated, but without "
                "the back-end channel (PROTOCOL_F_BACKEND_REQ) pyvhost cannot ask for the "
                "IOTLB entries it misses"
            )
        desc, avail, used = self._ring_guest_addresses(vring)
        config = RingConfig(
            vring.index,
            vring.size,
            desc,
            avail,
            used,
            vring.base,
            self.iommu if self._access_platform else self.memory,
            packed=self._packed,
            event_idx=bool(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX)),
            indirect=bool(self.acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC)),
            kick_fd=vring.kick_fd,
            call_fd=vring.call_fd,
            err_fd=vring.err_fd,
            polled=vring.polled,
            name=f"{self.device.name} ring {vring.index}",
            errors=vring.errors,
            # Where used-ring writes are logged: log_guest_addr, or (a front-end
            # that gave none) the used ring's own guest address.
            log_used=vring.addr.log if vring.addr.flags & VHOST_VRING_F_LOG else used,
        )
        # Raises to refuse (e.g. a ring the negotiated features do not have).
        self.device.ring_started(config)
        vring.config = config
        vring.enabled = vring.enabled or not self.protocol_features_negotiated
        if vring.enabled:
            self.device.ring_enabled(vring.index, True)

    def _stop(self, vring: Vring) -> None:
        if vring.config is None:
            return
        vring.config = None
        vring.base = self.device.ring_stopped(vring.index)
        # The enable state outlives a stop (QEMU does not repeat SET_VRING_ENABLE).

    def _restart(self, vring: Vring) -> None:
        self._stop(vring)
        self._start(vring)

    def _retranslate_rings(self) -> None:
        """The map changed: a running ring whose frontend addresses now land elsewhere moves."""
        for vring in self.vrings:
            if vring.config is None:
                continue
            try:
                addrs = self._ring_guest_addresses(vring)
            except InvalidRequestError as e:
                log.warning("ring %d: %s; it idles until its memory returns", vring.index, e)
                continue
            c = vring.config
            if addrs != (c.desc, c.avail, c.used):
                self._restart(vring)

    def _ring_guest_addresses(self, vring: Vring) -> tuple[GuestAddress, ...]:
        a = vring.addr
        assert a is not None
        if self._access_platform:
            # I/O virtual addresses: translated (or missed, and asked for) by the
            # IOTLB when the ring maps them.
            return (GuestAddress(a.desc), GuestAddress(a.avail), GuestAddress(a.used))
        if self._packed:  # the descriptor ring, the driver and device event areas
            sizes = (16 * vring.size, 4, 4)
        else:
            sizes = (16 * vring.size, 6 + 2 * vring.size, 6 + 8 * vring.size)
        out = []
        for what, addr, size in zip(
            ("descriptor", "avail", "used"), (a.desc, a.avail, a.used), sizes, strict=True
        ):
            try:
                out.append(self.memory.frontend_to_guest(addr, size))
            except GuestMemoryError as e:
                raise InvalidRequestError(
                    f"ring {vring.index} {what} address 0x{addr:x} is not in shared memory: {e}"
                ) from e
        return tuple(out)

    def _set_enabled(self, vring: Vring, enabled: bool) -> None:
        if vring.enabled == enabled:
            return
        vring.enabled = enabled
        if vring.started:
            self.device.ring_enabled(vring.index, enabled)

    def _close_vring_fds(self, vring: Vring) -> None:
        """Close a stopped ring's fds (no engine uses them any more)."""
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(vring, name)
            if fd is not None:
                os.close(fd)
                setattr(vring, name, None)
        vring.polled = False

    # --- device-specific requests ---------------------------------------------------

    def _on_get_config(self, msg: Message) -> ConfigSpace:
        c: ConfigSpace = msg.payload
        space = self.device.config()
        if c.offset + c.size > len(space):
            raise InvalidRequestError(
                f"GET_CONFIG of {c.size} bytes at {c.offset} runs past the "
                f"{len(space)}-byte config space"
            )
        return ConfigSpace(c.offset, c.size, c.flags, space[c.offset : c.offset + c.size])

    def _on_set_config(self, msg: Message) -> None:
        c: ConfigSpace = msg.payload
        self.device.write_config(c.offset, c.data, c.flags)

    def _on_net_set_mtu(self, msg: Message) -> None:
        self.device.set_mtu(msg.payload.value)

    def _on_send_rarp(self, msg: Message) -> None:
        self.device.send_rarp(msg.payload.pack()[:6])

    # --- dirty logging (live migration) ---------------------------------------------

    def _on_set_log_base(self, msg: Message) -> U64:
        fd = msg.fds.pop()
        try:
            log_ = DirtyLog(fd, msg.payload.mmap_size, msg.payload.mmap_offset)  # owns fd
        except PyvhostError:
            # No failure code exists for this answer, and a migration that goes on
            # without the log would silently lose the pages written meanwhile:
            # the session ends once the (empty) answer is sent.
            self.fatal = True
            raise
        if self.log is not None:
            old = self.log
            self.memory.set_log(None)
            log_.notify_fd, old.notify_fd = old.notify_fd, None
            old.close()
        self.log = log_
        self._update_logging()
        return U64(0)

    def _on_set_log_fd(self, msg: Message) -> None:
        fd = msg.fds.pop()
        if self.log is None:
            os.close(fd)
            raise InvalidRequestError("SET_LOG_FD before SET_LOG_BASE: no log to signal for")
        if self.log.notify_fd is not None:
            os.close(self.log.notify_fd)
        self.log.notify_fd = fd

    def _update_logging(self) -> None:
        """Writes are logged while VHOST_F_LOG_ALL is acked and a log is mapped."""
        on = self.log is not None and bool(self.acked_features & (1 << VHOST_F_LOG_ALL))
        if on != (self.memory.log is not None):
            self.memory.set_log(self.log if on else None)
            log.info("dirty logging %s", "on: live migration" if on else "off")

    # --- the vIOMMU's IOTLB (ACCESS_PLATFORM) -------------------------------------------

    def _on_iotlb_msg(self, msg: Message) -> None:
        m = msg.payload
        if not self._access_platform:
            raise InvalidRequestError(
                "IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM negotiated: there is no IOTLB"
            )
        if m.type == IOTLB_UPDATE:
            self.iommu.update(m.iova, m.size, m.uaddr, m.perm)
        elif m.type == IOTLB_INVALIDATE:
            self.iommu.invalidate(m.iova, m.size)
        elif m.type in (IOTLB_BATCH_BEGIN, IOTLB_BATCH_END):
            pass  # each update is applied as it comes
        else:
            raise InvalidRequestError(f"IOTLB_MSG type {m.type}: not an update or invalidation")

    def _iotlb_miss(self, iova: int, perm: int) -> None:
        if self.channel is not None:
            self.channel.send(BackendRequest.IOTLB_MSG, IotlbMsg(iova, 0, 0, perm, IOTLB_MISS))

    # --- the back-end's channel ------------------------------------------------------

    def _on_set_backend_req_fd(self, msg: Message) -> None:
        fd = msg.fds.pop()
        if self.channel is not None:
            self.channel.close()
        self.channel = channel_from(fd, self.loop, self._has_protocol(PF.REPLY_ACK))
        self.channel.on_ack = self._on_channel_ack

    def can_push_config(self) -> bool:
        """Can a config change reach the driver through the back-end channel?"""
        return self.channel is not None and not self.channel.closed and not self.config_refused

    def send_config_change(self) -> None:
        """The device's config space changed (the link went down or up): tell the
        front-end, which re-reads it and interrupts the driver."""
        if self.channel is not None:
            self.channel.send(BackendRequest.CONFIG_CHANGE_MSG)

    def _on_channel_ack(self, request: BackendRequest, status: int) -> None:
        if request is BackendRequest.CONFIG_CHANGE_MSG and status:
            # QEMU's virtio-net has no config notifier for vhost-user (-ENOSYS).
            self.config_refused = True
            if self.on_config_refused is not None:
                self.on_config_refused()


def _as_request(number: int):
    try:
        return R(number)
    except ValueError:
        return None


def _region_spec(r: MemoryRegionDesc) -> RegionSpec:
    return RegionSpec(
        GuestAddress(r.guest_addr), r.size, FrontendAddress(r.user_addr), r.mmap_offset
    )


def _empty_reply(request: int) -> bytes:
    return Header(request, VERSION | FLAG_REPLY, 0).pack()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
