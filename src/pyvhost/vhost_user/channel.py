"""The back-end's own channel to the front-end (PROTOCOL_F_BACKEND_REQ).

The front-end gives the back-end one end of a socket with
SET_BACKEND_REQ_FD; the back-end sends requests on it (a config change, an
IOTLB miss) and, with REPLY_ACK negotiated, asks for an ack. Sending never
blocks the event loop: a request that does not fit the socket's buffer is
queued, acks are read when they come, and a front-end that closes its end
closes the channel, not the session.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable

from pyvhost.errors import InvalidRequestError
from pyvhost.eventloop import EventLoop
from pyvhost.vhost_user.codec import MessageReader, encode
from pyvhost.vhost_user.messages import U64, Empty, Payload
from pyvhost.vhost_user.protocol import FLAG_REPLY, BackendRequest

log = logging.getLogger(__name__)

EMPTY = Empty()
MAX_QUEUED = 64  # requests waiting for room in the socket; past it the channel is dropped


class BackendChannel:
    def __init__(self, fd: int, loop: EventLoop, need_reply: bool) -> None:
        """Takes ownership of `fd` (a connected stream socket)."""
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.loop = loop
        self.need_reply = need_reply
        self.reader = MessageReader()
        self.sent: dict[BackendRequest, int] = {}
        self.acks = 0
        self.refusals = 0
        self.closed = False
        self.on_ack: Callable[[BackendRequest, int], None] | None = None
        self._queue: list[bytes] = []
        self._awaiting: list[BackendRequest] = []
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def send(self, request: BackendRequest, payload: Payload = EMPTY) -> None:
        """Queue one request to the front-end (an ack is asked for if negotiated)."""
        if self.closed:
            return
        data = encode(int(request), payload, need_reply=self.need_reply)
        if self.need_reply:
            self._awaiting.append(request)
        self.sent[request] = self.sent.get(request, 0) + 1
        self._queue.append(data)
        if len(self._queue) > MAX_QUEUED:
            log.warning("the front-end does not read its back-end channel; closing it")
            self.close()
            return
        self._flush()

    def _flush(self) -> None:
        while self._queue:
            data = self._queue[0]
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
                return
            except OSError as e:
                log.info("back-end channel closed by the front-end: %s", e.strerror)
                self.close()
                return
            if sent < len(data):
                self._queue[0] = data[sent:]
                continue
            self._queue.pop(0)
        self.loop.remove_writer(self.sock.fileno())

    def _on_writable(self) -> None:
        self._flush()

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            frames = self.reader.feed(data)
        except Exception as e:  # a front-end that answers garbage loses its channel
            log.warning("back-end channel: unreadable reply (%s); closing it", e)
            self.close()
            return
        for frame in frames:
            frame.close_fds()
            request = self._awaiting.pop(0) if self._awaiting else None
            ok = (
                request is not None
                and frame.header.request == request
                and frame.header.flags & FLAG_REPLY
                and frame.body is not None
                and len(frame.body) == 8
            )
            if not ok:
                log.warning("back-end channel: an answer that matches no request; closing it")
                self.close()
                return
            status = U64.unpack(frame.body).value
            self.acks += 1
            if status:
                self.refusals += 1
                log.warning("the front-end refused %s (status %d)", request.name, status)
            if self.on_ack is not None:
                self.on_ack(request, status)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        fd = self.sock.fileno()
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        self.sock.close()


def channel_from(fd: int, loop: EventLoop, need_reply: bool) -> BackendChannel:
    """Check the fd is a stream socket before taking it (closed if not)."""
    try:
        # socket(fileno=) raises for a non-socket and leaves the fd open: look first.
        is_stream = stat.S_ISSOCK(os.fstat(fd).st_mode)
        if is_stream:
            probe = socket.socket(fileno=os.dup(fd))
            is_stream = probe.type == socket.SOCK_STREAM and probe.family == socket.AF_UNIX
            probe.close()
    except OSError:
        is_stream = False
    if not is_stream:
        os.close(fd)
        raise InvalidRequestError("SET_BACKEND_REQ_FD: the fd is not a Unix stream socket")
    return BackendChannel(fd, loop, need_reply)
