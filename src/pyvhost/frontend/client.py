"""A vhost-user front-end client: the VMM's side of the protocol, in Python.

Blocking and simple: each method sends one request and, where one is due,
waits for the reply. With REPLY_ACK negotiated every request asks for an
ack, so a refusal surfaces as PeerError right where it happened.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from pyvhost.errors import PeerError, TransportError
from pyvhost.vhost_user.codec import decode_reply, encode
from pyvhost.vhost_user.messages import (
    IOTLB_INVALIDATE,
    IOTLB_UPDATE,
    U64,
    ConfigSpace,
    Empty,
    IotlbMsg,
    LogBase,
    MemoryRegionDesc,
    MemoryTable,
    Payload,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
)
from pyvhost.vhost_user.protocol import ProtocolFeature as PF, Request as R
from pyvhost.vhost_user.transport import Connection

REPLY_TIMEOUT = 10.0
EMPTY = Empty()


class VhostUserClient:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.protocol_features = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> VhostUserClient:
        """Connect to a back-end listening on `path`, waiting up to `timeout` for it."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(Connection(sock))
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise TransportError(f"no vhost-user back-end at {path}: {e.strerror}") from e
                time.sleep(0.05)

    @classmethod
    def accept(cls, listener: socket.socket, timeout: float = 10.0) -> VhostUserClient:
        """Wait for a back-end in client mode to connect to us."""
        listener.settimeout(timeout)
        sock, _ = listener.accept()
        return cls(Connection(sock))

    def close(self) -> None:
        self.conn.close()

    # --- one request --------------------------------------------------------------

    @property
    def acks(self) -> bool:
        return bool(self.protocol_features & (1 << PF.REPLY_ACK))

    def request(
        self,
        request: R,
        payload: Payload = EMPTY,
        fds: list[int] | tuple[int, ...] = (),
        reply_type: type | None = None,
    ) -> Payload | None:
        need_ack = reply_type is None and self.acks
        self.conn.send(encode(request, payload, need_reply=need_ack), fds)
        if reply_type is not None:
            frame = self.conn.receive_blocking(REPLY_TIMEOUT)
            if frame.header.size == 0:
                raise PeerError(f"back-end refused {request.name} (empty reply)")
            return decode_reply(frame, request, reply_type)
        if need_ack:
            frame = self.conn.receive_blocking(REPLY_TIMEOUT)
            code = decode_reply(frame, request, U64).value
            if code != 0:
                raise PeerError(f"back-end refused {request.name} (status {code})")
        return None

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send bytes verbatim (for testing how a back-end takes malformed input)."""
        self.conn.send(data, fds)

    # --- the requests ------------------------------------------------------------

    def get_features(self) -> int:
        return self.request(R.GET_FEATURES, reply_type=U64).value

    def set_features(self, features: int) -> None:
        self.request(R.SET_FEATURES, U64(features))

    def get_protocol_features(self) -> int:
        return self.request(R.GET_PROTOCOL_FEATURES, reply_type=U64).value

    def set_protocol_features(self, features: int) -> None:
        self.request(R.SET_PROTOCOL_FEATURES, U64(features))
        self.protocol_features = features

    def set_owner(self) -> None:
        self.request(R.SET_OWNER)

    def reset_device(self) -> None:
        self.request(R.RESET_DEVICE)

    def get_queue_num(self) -> int:
        return self.request(R.GET_QUEUE_NUM, reply_type=U64).value

    def get_max_mem_slots(self) -> int:
        return self.request(R.GET_MAX_MEM_SLOTS, reply_type=U64).value

    def set_mem_table(self, regions: list[MemoryRegionDesc], fds: list[int]) -> None:
        self.request(R.SET_MEM_TABLE, MemoryTable(tuple(regions)), fds)

    def add_mem_reg(self, region: MemoryRegionDesc, fd: int) -> None:
        self.request(R.ADD_MEM_REG, SingleRegion(region), [fd])

    def rem_mem_reg(self, region: MemoryRegionDesc) -> None:
        self.request(R.REM_MEM_REG, SingleRegion(region))

    def iotlb_update(self, iova: int, size: int, uaddr: int, perm: int = 3) -> None:
        """IOTLB_MSG update: [iova, iova+size) maps to front-end address `uaddr`."""
        self.request(R.IOTLB_MSG, IotlbMsg(iova, size, uaddr, perm, IOTLB_UPDATE))

    def iotlb_invalidate(self, iova: int, size: int) -> None:
        self.request(R.IOTLB_MSG, IotlbMsg(iova, size, 0, 0, IOTLB_INVALIDATE))

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(R.SET_VRING_NUM, VringState(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(R.SET_VRING_BASE, VringState(index, base))

    def get_vring_base(self, index: int) -> int:
        return self.request(R.GET_VRING_BASE, VringState(index, 0), reply_type=VringState).num

    def set_vring_addr(
        self, index: int, desc: int, used: int, avail: int, log: int | None = None
    ) -> None:
        """`log`: with dirty logging, the guest address to log used-ring writes at."""
        flags = 0 if log is None else 1  # VHOST_VRING_F_LOG
        self.request(R.SET_VRING_ADDR, VringAddr(index, flags, desc, used, avail, log or 0))

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """Share the dirty log (LOG_SHMFD): the back-end answers once it is mapped."""
        self.request(R.SET_LOG_BASE, LogBase(size, offset), (fd,), reply_type=U64)

    def set_log_fd(self, fd: int) -> None:
        self.request(R.SET_LOG_FD, EMPTY, (fd,))

    def _vring_fd(self, request: R, index: int, fd: int | None) -> None:
        self.request(request, VringFd(index, fd is None), () if fd is None else (fd,))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(R.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(R.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_fd(R.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(R.SET_VRING_ENABLE, VringState(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        reply = self.request(
            R.GET_CONFIG, ConfigSpace(offset, size, 0, bytes(size)), reply_type=ConfigSpace
        )
        return reply.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(R.SET_CONFIG, ConfigSpace(offset, len(data), flags, data))

    def net_set_mtu(self, mtu: int) -> None:
        self.request(R.NET_SET_MTU, U64(mtu))

    def send_rarp(self, mac: bytes) -> None:
        self.request(R.SEND_RARP, U64(int.from_bytes(mac.ljust(8, b"\0"), sys.byteorder)))

    def set_backend_req_fd(self, fd: int) -> None:
        self.request(R.SET_BACKEND_REQ_FD, EMPTY, (fd,))

    def set_status(self, status: int) -> None:
        self.request(R.SET_STATUS, U64(status))

    def get_status(self) -> int:
        return self.request(R.GET_STATUS, reply_type=U64).value


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
