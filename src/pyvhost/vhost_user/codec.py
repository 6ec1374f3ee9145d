"""Sans-IO vhost-user codec: bytes and fds in, messages out, and back.

No socket here. `MessageReader` is fed whatever the transport received and
says how many bytes it wants next, never more than up to the end of the
current message: the transport reads exactly that much, so the file
descriptors that arrive with a read always belong to the message being read.

`REQUESTS` is the one table of what each request carries: payload shape,
which fds, what reply, and which protocol feature gates it. A request not
in it is refused.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from pyvhost.errors import (
    MalformedMessageError,
    ProtocolError,
    UnexpectedFdsError,
    UnknownRequestError,
)
from pyvhost.vhost_user.messages import (
    U64,
    ConfigSpace,
    Empty,
    Header,
    IotlbMsg,
    LogBase,
    MemoryTable,
    Payload,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    VERSION_MASK,
    ProtocolFeature as PF,
    Request as R,
)


class Fds(enum.Enum):
    NONE = "none"
    ONE = "one"
    PER_REGION = "one per region"
    VRING = "one unless the no-fd flag is set"
    AT_MOST_ONE = "at most one (closed unused)"


@dataclass(frozen=True)
class RequestSpec:
    payload: type
    reply: type | None = None  # an explicit reply body, else REPLY_ACK rules apply
    fds: Fds = Fds.NONE
    gate: PF | None = None  # protocol feature that must be negotiated first


REQUESTS: dict[R, RequestSpec] = {
    R.GET_FEATURES: RequestSpec(Empty, reply=U64),
    R.SET_FEATURES: RequestSpec(U64),
    R.SET_OWNER: RequestSpec(Empty),
    R.RESET_OWNER: RequestSpec(Empty),
    R.SET_MEM_TABLE: RequestSpec(MemoryTable, fds=Fds.PER_REGION),
    R.SET_VRING_NUM: RequestSpec(VringState),
    R.SET_VRING_ADDR: RequestSpec(VringAddr),
    R.SET_VRING_BASE: RequestSpec(VringState),
    R.GET_VRING_BASE: RequestSpec(VringState, reply=VringState),
    R.SET_VRING_KICK: RequestSpec(VringFd, fds=Fds.VRING),
    R.SET_VRING_CALL: RequestSpec(VringFd, fds=Fds.VRING),
    R.SET_VRING_ERR: RequestSpec(VringFd, fds=Fds.VRING),
    R.GET_PROTOCOL_FEATURES: RequestSpec(Empty, reply=U64),
    R.SET_PROTOCOL_FEATURES: RequestSpec(U64),
    R.GET_QUEUE_NUM: RequestSpec(Empty, reply=U64, gate=PF.MQ),
    R.SET_VRING_ENABLE: RequestSpec(VringState),
    R.SEND_RARP: RequestSpec(U64, gate=PF.RARP),
    R.NET_SET_MTU: RequestSpec(U64, gate=PF.NET_MTU),
    R.GET_CONFIG: RequestSpec(ConfigSpace, reply=ConfigSpace, gate=PF.CONFIG),
    R.SET_CONFIG: RequestSpec(ConfigSpace, gate=PF.CONFIG),
    R.RESET_DEVICE: RequestSpec(Empty, gate=PF.RESET_DEVICE),
    R.GET_MAX_MEM_SLOTS: RequestSpec(Empty, reply=U64, gate=PF.CONFIGURE_MEM_SLOTS),
    R.ADD_MEM_REG: RequestSpec(SingleRegion, fds=Fds.ONE, gate=PF.CONFIGURE_MEM_SLOTS),
    R.REM_MEM_REG: RequestSpec(SingleRegion, fds=Fds.AT_MOST_ONE, gate=PF.CONFIGURE_MEM_SLOTS),
    R.SET_STATUS: RequestSpec(U64, gate=PF.STATUS),
    R.SET_BACKEND_REQ_FD: RequestSpec(Empty, fds=Fds.ONE, gate=PF.BACKEND_REQ),
    # With ACCESS_PLATFORM: the vIOMMU's translations (updates, invalidations).
    R.IOTLB_MSG: RequestSpec(IotlbMsg),
    # With LOG_SHMFD the front-end waits for an answer once the log is mapped.
    R.SET_LOG_BASE: RequestSpec(LogBase, reply=U64, fds=Fds.ONE, gate=PF.LOG_SHMFD),
    R.SET_LOG_FD: RequestSpec(Empty, fds=Fds.ONE),
    R.GET_STATUS: RequestSpec(Empty, reply=U64, gate=PF.STATUS),
}


def request_name(request: int) -> str:
    try:
        return R(request).name
    except ValueError:
        return f"request {request}"


@dataclass
class Frame:
    """One message as it came off the wire: not yet decoded, fds still raw."""

    header: Header
    body: bytes | None  # None: the body was too big and was discarded
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False  # more fds were sent than fit; the kernel dropped them

    @property
    def need_reply(self) -> bool:
        return bool(self.header.flags & FLAG_NEED_REPLY)

    def close_fds(self) -> None:
        """Close the fds nobody took. A handler that keeps an fd removes it from
        `fds` first, so whoever drops a frame (handled or not) calls this."""
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class Message:
    """A decoded, validated request (or reply)."""

    request: R
    payload: Payload
    fds: list[int] = field(default_factory=list)
    need_reply: bool = False

    @property
    def name(self) -> str:
        return self.request.name


class MessageReader:
    """Reassembles frames from a byte stream with fds beside it."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: Header | None = None
        self._fds: list[int] = []
        self._discard = 0  # bytes of an oversized body still to skip
        self._truncated = False

    def wanted(self) -> int:
        """How many bytes to read next (never past the current message's end)."""
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        if self._discard:
            return min(self._discard, 65536)
        return self._header.size - len(self._buf)

    def pending_fds(self) -> list[int]:
        """fds received for a message not yet complete (to close on disconnect)."""
        return list(self._fds)

    def feed(
        self, data: bytes, fds: list[int] | None = None, fds_truncated: bool = False
    ) -> list[Frame]:
        """Take bytes (and fds) off the wire; return every frame now complete."""
        if fds:
            self._fds.extend(fds)
        self._truncated |= fds_truncated
        frames: list[Frame] = []
        view = memoryview(data)
        while True:
            if self._header is None:
                take = min(HEADER_SIZE - len(self._buf), len(view))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < HEADER_SIZE:
                    return frames
                self._header = Header.unpack(bytes(self._buf))
                self._buf.clear()
                if self._header.size > MAX_PAYLOAD_SIZE:
                    self._discard = self._header.size
            if self._discard:
                take = min(self._discard, len(view))
                self._discard -= take
                view = view[take:]
                if self._discard:
                    return frames
                frames.append(Frame(self._header, None, *self._take_fds()))
                self._header = None
                continue
            need = self._header.size - len(self._buf)
            take = min(need, len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < self._header.size:
                return frames
            frames.append(Frame(self._header, bytes(self._buf), *self._take_fds()))
            self._buf.clear()
            self._header = None
            if not view:
                return frames

    def _take_fds(self) -> tuple[list[int], bool]:
        fds, self._fds = self._fds, []
        truncated, self._truncated = self._truncated, False
        return fds, truncated


def decode_request(frame: Frame) -> Message:
    """Validate a frame as a front-end request. Raises ProtocolError subclasses.

    fds stay the caller's to close on error (the codec owns nothing).
    """
    h = frame.header
    name = request_name(h.request)
    if h.flags & VERSION_MASK != VERSION:
        raise MalformedMessageError(
            f"{name}: protocol version {h.flags & VERSION_MASK}, expected {VERSION}", h.request
        )
    if h.flags & FLAG_REPLY:
        raise MalformedMessageError(f"{name}: a request with the reply flag set", h.request)
    try:
        request = R(h.request)
        spec = REQUESTS[request]
    except (ValueError, KeyError):
        raise UnknownRequestError(f"{name} is not supported by pyvhost", h.request) from None
    if frame.body is None:
        raise MalformedMessageError(
            f"{name}: payload of {h.size} bytes is larger than any request's "
            f"({MAX_PAYLOAD_SIZE}); discarded",
            h.request,
        )
    try:
        payload = spec.payload.unpack(frame.body)
    except MalformedMessageError as e:
        raise MalformedMessageError(f"{name}: {e}", h.request) from None
    if frame.fds_truncated:
        raise UnexpectedFdsError(f"{name} carried more fds than any request takes", h.request)
    _check_fds(request, spec, payload, len(frame.fds))
    return Message(request, payload, frame.fds, frame.need_reply)


def _check_fds(request: R, spec: RequestSpec, payload: Payload, n: int) -> None:
    if spec.fds is Fds.NONE:
        want: tuple[int, ...] = (0,)
    elif spec.fds is Fds.ONE:
        want = (1,)
    elif spec.fds is Fds.AT_MOST_ONE:
        want = (0, 1)
    elif spec.fds is Fds.PER_REGION:
        assert isinstance(payload, MemoryTable)
        want = (len(payload.regions),)
    else:
        assert isinstance(payload, VringFd)
        want = (0,) if payload.no_fd else (1,)
    if n not in want:
        raise UnexpectedFdsError(
            f"{request.name} carries {n} fds; it takes {' or '.join(map(str, want))}",
            int(request),
        )


def encode(
    request: int, payload: Payload, *, reply: bool = False, need_reply: bool = False
) -> bytes:
    """Header + payload bytes for a request or a reply."""
    body = payload.pack()
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return Header(int(request), flags, len(body)).pack() + body


def decode_reply(frame: Frame, request: R, reply_type: type) -> Payload:
    """Validate a back-end's reply to `request` (front-end side)."""
    h = frame.header
    if h.request != request:
        raise ProtocolError(
            f"expected a reply to {request.name}, got {request_name(h.request)}", h.request
        )
    if not h.flags & FLAG_REPLY:
        raise ProtocolError(f"reply to {request.name} lacks the reply flag", h.request)
    if frame.body is None:
        raise MalformedMessageError(f"reply to {request.name} is oversized", h.request)
    return reply_type.unpack(frame.body)
