"""The control socket of a running pyvhost: counters, and commands that change it.

One JSON request per line, one JSON answer per request:

    {"cmd": "stats"}                                   -> the counters
    {"cmd": "datapath", "to": "kernel", "pair": 0}      -> move pair 0 (all: no "pair")

A client that sends nothing (socat - UNIX:PATH, or an older `pyvhost stats`)
gets the counters after a short wait and the connection is closed. Every
answer has "ok"; a refused command says why in "error". Nothing a client
sends can end the daemon: a bad request is answered and the connection goes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable

from pyvhost.errors import PyvhostError
from pyvhost.eventloop import EventLoop, Timer

log = logging.getLogger(__name__)

# A client silent this long wants the counters (the pre-command protocol).
SILENT_CLIENT_NS = 200_000_000
MAX_REQUEST = 65536

Handler = Callable[[dict], dict]
# The most a streaming client (a live capture) may lag behind, in bytes; past
# it, what the datapath writes for it is dropped (and counted), never waited on.
STREAM_BUFFER = 8 << 20


class Stream:
    """A connection handed to a command that streams (a capture): bytes out,
    without ever blocking the loop, and a callback when the client goes."""

    def __init__(self, server: ControlServer, client: _Client) -> None:
        self._server = server
        self._client = client
        self.on_close: Callable[[], None] | None = None

    def write(self, data: bytes) -> bool:
        return self._server._stream_write(self._client, data)

    def close(self) -> None:
        self._server._close(self._client)


def streaming(handler: Callable[[dict, Stream], dict]) -> Callable[[dict, Stream], dict]:
    """Mark a command handler as one that takes over its connection."""
    handler.streaming = True  # type: ignore[attr-defined]
    return handler


class ControlServer:
    def __init__(self, path: str, loop: EventLoop, handlers: dict[str, Handler]) -> None:
        if "stats" not in handlers:
            raise ValueError("a control socket always answers stats")
        self.path = path
        self.loop = loop
        self.handlers = handlers
        if os.path.exists(path):
            os.unlink(path)  # ours from a previous run (the vhost-user socket was free)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(path)
            self.sock.listen(8)
        except OSError as e:
            self.sock.close()
            raise PyvhostError(f"--stats-socket {path}: {e.strerror}") from e
        self.sock.setblocking(False)
        self._clients: dict[int, _Client] = {}
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        client = _Client(conn)
        self._clients[conn.fileno()] = client
        self.loop.add_reader(conn.fileno(), lambda: self._on_readable(client))
        client.timer = self.loop.call_at(
            time.monotonic_ns() + SILENT_CLIENT_NS, lambda: self._on_silent(client)
        )

    def _on_silent(self, client: _Client) -> None:
        if client.closed or client.buf or client.answered:
            return
        self._answer(client, {"cmd": "stats"})
        self._close(client)

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF: a client that said nothing wants the counters
            if not client.buf and not client.answered:
                self._answer(client, {"cmd": "stats"})
            self._close(client)
            return
        if client.stream is not None:
            return  # a streaming client has nothing more to ask
        client.buf += data
        if len(client.buf) > MAX_REQUEST:
            self._send(client, {"ok": False, "error": "request too long"})
            self._close(client)
            return
        while b"\n" in client.buf and not client.closed:
            line, client.buf = client.buf.split(b"\n", 1)
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                self._send(client, {"ok": False, "error": f"not a JSON request: {e}"})
                continue
            self._answer(client, request)

    def _answer(self, client: _Client, request: dict) -> None:
        client.answered = True
        cmd = request.get("cmd", "stats")
        handler = self.handlers.get(cmd)
        if handler is None:
            reply = {"ok": False, "error": f"unknown command {cmd!r}; try {sorted(self.handlers)}"}
        elif getattr(handler, "streaming", False):
            stream = Stream(self, client)
            try:
                reply = {"ok": True, **handler(request, stream)}
            except PyvhostError as e:
                reply = {"ok": False, "error": str(e)}
                client.out.clear()
                self.loop.remove_writer(client.conn.fileno())
            else:
                client.stream = stream
                client.buf = b""
            self._send(client, reply)
            return
        else:
            try:
                reply = {"ok": True, **handler(request)}
            except PyvhostError as e:
                reply = {"ok": False, "error": str(e)}
            except Exception as e:  # a bug in a command must not end the daemon
                log.exception("control command %r failed", cmd)
                reply = {"ok": False, "error": f"internal error: {e}"}
        self._send(client, reply)

    def _send(self, client: _Client, reply: dict) -> None:
        data = json.dumps(reply).encode() + b"\n"  # one line: the client reads to the newline
        if client.stream is not None:  # the stream's first line: queued before its bytes
            client.out[:0] = data
            self.loop.add_writer(client.conn.fileno(), lambda: self._flush(client))
            return
        try:
            client.conn.setblocking(True)
            client.conn.settimeout(1.0)
            client.conn.sendall(data)
            client.conn.setblocking(False)
        except OSError as e:
            log.debug("control client went away: %s", e)
            self._close(client)

    def _stream_write(self, client: _Client, data: bytes) -> bool:
        if client.closed or len(client.out) + len(data) > STREAM_BUFFER:
            return False
        if not client.out:
            self.loop.add_writer(client.conn.fileno(), lambda: self._flush(client))
        client.out += data
        return True

    def _flush(self, client: _Client) -> None:
        try:
            sent = client.conn.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        del client.out[:sent]
        if not client.out:
            self.loop.remove_writer(client.conn.fileno())

    def _close(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        if client.timer is not None:
            client.timer.cancel()
        fd = client.conn.fileno()
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        self._clients.pop(fd, None)
        client.conn.close()
        if client.stream is not None and client.stream.on_close is not None:
            client.stream.on_close()

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._close(client)
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Client:
    __slots__ = ("conn", "buf", "timer", "closed", "answered", "stream", "out")

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""
        self.timer: Timer | None = None
        self.closed = False
        self.answered = False
        self.stream: Stream | None = None
        self.out = bytearray()  # what a stream still has to send


def request(path: str, command: dict, timeout: float = 10.0) -> dict:
    """Send one command to a running pyvhost's control socket; its answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(command).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise PyvhostError(
            f"no pyvhost control socket at {path}: {e.strerror or e} "
            "(is pyvhost net running with that --socket?)"
        ) from e
    finally:
        s.close()
    try:
        return json.loads(data)
    except ValueError as e:
        raise PyvhostError(f"{path}: not a pyvhost control socket ({e})") from e
