"""The socket under vhost-user: recvmsg/sendmsg with SCM_RIGHTS, nothing more.

Reads never cross a message boundary (the codec says how much it wants), so
the fds that come with a read belong to the message being read.
"""

from __future__ import annotations

import array
import os
import select
import socket

from pyvhost.errors import TransportError
from pyvhost.vhost_user.codec import Frame, MessageReader
from pyvhost.vhost_user.protocol import MAX_FDS

_FD_SIZE = array.array("i").itemsize
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
SEND_TIMEOUT = 5.0


class Connection:
    """A connected vhost-user socket (either side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.reader = MessageReader()

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[Frame]:
        """Read what is there (without blocking); return the complete frames.

        Raises TransportError when the peer has closed the connection. The
        frames already read in this call are then dropped with their fds
        closed: a peer that sent its set-up and hung up at once must not
        leave its guest RAM and eventfds open here.
        """
        frames: list[Frame] = []
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    self.reader.wanted(), _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return frames
            except OSError as e:
                _drop(frames)
                raise TransportError(f"vhost-user socket failed: {e.strerror}") from e
            fds = _fds_from(ancdata)
            if not data:
                _close(fds)
                _drop(frames)
                raise TransportError("the peer closed the vhost-user socket")
            frames += self.reader.feed(data, fds, bool(flags & socket.MSG_CTRUNC))

    def receive_blocking(self, timeout: float) -> Frame:
        """Wait for one frame (the front-end waiting for a reply)."""
        while True:
            frames = self.receive()
            if frames:
                if len(frames) > 1:
                    raise TransportError(f"{len(frames)} messages arrived where one reply was due")
                return frames[0]
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TransportError(f"no reply within {timeout} s")

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one whole message (fds with its first byte)."""
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.sendmsg([view], anc)
            except (BlockingIOError, InterruptedError):
                _, ready, _ = select.select([], [self.sock], [], SEND_TIMEOUT)
                if not ready:
                    raise TransportError(f"peer did not read for {SEND_TIMEOUT} s") from None
                continue
            except OSError as e:
                raise TransportError(f"vhost-user socket failed: {e.strerror}") from e
            anc = []
            view = view[sent:]

    def close(self) -> None:
        _close(self.reader.pending_fds())
        self.sock.close()


def _fds_from(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def _drop(frames: list[Frame]) -> None:
    for frame in frames:
        frame.close_fds()
    frames.clear()


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
