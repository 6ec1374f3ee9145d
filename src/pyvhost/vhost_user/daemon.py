"""The vhost-user daemon: a socket, one front-end at a time, one event loop.

Server mode listens on a path and serves one front-end; when it leaves, its
session is dropped (rings stopped, memory unmapped, fds closed) and the next
one is accepted, so a QEMU started with reconnect=1 can come back. Client
mode connects to a front-end that listens, retrying until it is there.
An inherited socket (--fd, systemd's socket activation) is served as it
comes: a listening one like server mode's own, except that its path is the
caller's and stays; a connected one is a single front-end, and the daemon
stops when it leaves.

The control socket, every ring's kick eventfd and the device's own fds (the
TAP) share one epoll loop: each ring is served as soon as it is kicked, and
a control message is handled in one short step between datapath events.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import socket
import stat
import time

from pyvhost.device import VirtioDevice
from pyvhost.errors import PyvhostError, TransportError
from pyvhost.eventloop import EventLoop
from pyvhost.vhost_user.backend import Backend
from pyvhost.vhost_user.codec import Frame
from pyvhost.vhost_user.transport import Connection

log = logging.getLogger(__name__)

RECONNECT_INTERVAL = 0.5


class SocketPathError(PyvhostError):
    """The --socket path cannot be used."""


class Daemon:
    def __init__(
        self,
        device: VirtioDevice,
        socket_path: str,
        *,
        client: bool = False,
        loop: EventLoop | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """`sock`: an inherited Unix stream socket, listening or connected, served
        instead of `socket_path` (then only a name for messages)."""
        self.device = device
        self.socket_path = socket_path
        self.client = client
        self._owns_path = sock is None and not client  # ours to create and remove
        self._single = False  # a connected inherited socket: one front-end, then stop
        self.loop = loop or EventLoop()
        self.listener: socket.socket | None = None
        self.conn: Connection | None = None
        self.backend: Backend | None = None
        self.sessions = 0  # front-ends served so far
        # The device's link is down and the front-end cannot be told so: it is
        # kept away (as if pyvhost were gone) until the link is up again.
        self.unplugged = False
        self._next_connect = 0.0
        self._last_collect_ns = 0
        self._collect_timer = None
        device.on_link_change = self._on_link_change
        # Everything this daemon registers (and what its sessions register)
        # is its own: a datapath error ends its session, not another's.
        with self.loop.owned_by(self):
            device.attach(self.loop)
            if sock is not None:
                self._adopt(sock)
            elif not client:
                self._listen()

    # --- sockets --------------------------------------------------------------

    def _listen(self) -> None:
        _remove_stale_socket(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.socket_path)
            sock.listen(1)
        except OSError as e:
            sock.close()
            raise SocketPathError(
                f"--socket {self.socket_path}: cannot listen: {e.strerror}"
            ) from e
        sock.setblocking(False)
        self.listener = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        log.info("listening on %s", self.socket_path)

    def _adopt(self, sock: socket.socket) -> None:
        from pyvhost.activation import is_listening

        sock.setblocking(False)
        if is_listening(sock):
            self.listener = sock
            self.loop.add_reader(sock.fileno(), self._on_accept)
            log.info("listening on an inherited socket (%s)", self.socket_path or "unnamed")
        else:
            sock.setblocking(True)
            self._single = True
            self._start_session(sock)

    def _on_accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.unplugged:  # an inherited listener cannot vanish: refuse at once
            sock.close()
            return
        # One front-end at a time: stop accepting until this one leaves.
        self.loop.remove_reader(self.listener.fileno())
        self._start_session(sock)

    def _try_connect(self) -> None:
        now = time.monotonic()
        if now < self._next_connect:
            return
        self._next_connect = now + RECONNECT_INTERVAL
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.warning("connecting to %s: %s", self.socket_path, e.strerror)
            return
        self._start_session(sock)

    def _start_session(self, sock: socket.socket) -> None:
        self.conn = Connection(sock)
        self.backend = Backend(self.device, self.loop)
        self.backend.on_config_refused = self._on_config_refused
        self.sessions += 1
        self.loop.add_reader(self.conn.fileno(), self._on_control)
        log.info("front-end connected (session %d)", self.sessions)

    def _on_control(self) -> None:
        conn, backend = self.conn, self.backend
        frames: list[Frame] = []
        try:
            frames = conn.receive()
            while frames:
                frame = frames.pop(0)
                try:
                    reply = backend.handle(frame)
                finally:
                    frame.close_fds()  # whatever the handler did not take
                if reply is not None:
                    conn.send(reply)
                if backend.fatal:
                    raise TransportError("a request failed that the session cannot go on after")
        except TransportError as e:
            log.info("front-end gone: %s", e)
            self._end_session()
        except Exception:
            # Nothing a front-end sends may end the daemon: this session goes,
            # the next front-end is served.
            log.exception("session %d: unexpected error; dropping this front-end", self.sessions)
            self._end_session()
        finally:
            for frame in frames:  # not reached: their fds are ours to close
                frame.close_fds()

    def loop_error(self, error: Exception) -> None:
        """A datapath callback (a kick, the TAP) raised: drop the session, serve on."""
        log.error(
            "session %d: unexpected error in the datapath; dropping this front-end",
            self.sessions,
            exc_info=error,
        )
        self._end_session()

    def _end_session(self) -> None:
        conn, backend = self.conn, self.backend
        if conn is None:
            return
        self.conn = self.backend = None
        self.loop.remove_reader(conn.fileno())
        try:
            backend.close()
        except Exception:
            log.exception("releasing the session failed part-way")
        finally:
            conn.close()
            self._collect_soon()
            if self._single:
                log.info("the inherited connection's front-end left; stopping")
                self.loop.stop()
            elif self.listener is not None and not self.unplugged:
                self.loop.add_reader(self.listener.fileno(), self._on_accept)

    # --- the device's link, shown to the guest ------------------------------------------

    def _on_link_change(self, up: bool) -> None:
        backend = self.backend
        if backend is not None and backend.can_push_config():
            backend.send_config_change()  # the driver re-reads the config's status
        elif not up and backend is not None:
            self._unplug("it did not take a config change message")
        elif up and self.unplugged:
            self._replug()

    def _on_config_refused(self) -> None:
        link = getattr(self.device, "link", None)
        if link is not None and not link.up:
            self._unplug("it refused the config change message")

    def _unplug(self, why: str) -> None:
        """Show a down link the only way a front-end like QEMU hears of it: its
        vhost-user back-end goes away (QEMU sets the NIC's link down while it is
        disconnected) and stays away until the link is up again."""
        log.warning(
            "link down: the front-end cannot be told (%s); disconnecting it until "
            "the link is up again, so the guest sees the link down",
            why,
        )
        self.unplugged = True
        self._end_session()
        if self.listener is not None and not self._owns_path:
            # Not ours to remove: connections are accepted and closed at once.
            self.loop.add_reader(self.listener.fileno(), self._on_accept)
        elif self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.socket_path)  # a reconnecting front-end finds nothing
            except FileNotFoundError:
                pass

    def _replug(self) -> None:
        log.info("link up: serving the front-end again")
        self.unplugged = False
        if self._owns_path:
            self._listen()

    # --- running -------------------------------------------------------------------

    def run_once(self, timeout: float | None = None) -> None:
        """One turn of the loop. With nothing to wait for but fds, it sleeps until
        one is ready: an idle daemon has no timer wakeups."""
        if self.client and self.conn is None and not self.unplugged:
            with self.loop.owned_by(self):
                self._try_connect()
            timeout = RECONNECT_INTERVAL if timeout is None else min(timeout, RECONNECT_INTERVAL)
        self.loop.run_once(timeout)

    def run(self) -> None:
        """Serve until loop.stop() (a signal handler calls it)."""
        while not self.loop.stopping:
            self.run_once()

    def connect_if_due(self) -> None:
        """Client mode without a front-end: try again, at most every half second."""
        if self.client and self.conn is None and not self.unplugged:
            with self.loop.owned_by(self):
                self._try_connect()

    def _collect_soon(self) -> None:
        """Anything of an ended session still in a reference cycle (an exception's
        frames holding views of guest memory) is collected within a second, not
        whenever CPython's collector next runs, so its mappings and fds go with
        it. At most once a second: a peer that reconnects in a loop cannot make
        the daemon collect in a loop."""
        if self._collect_timer is not None:
            return
        due = self._last_collect_ns + 1_000_000_000
        if time.monotonic_ns() >= due:
            self._collect()
        else:
            with self.loop.owned_by(self):
                self._collect_timer = self.loop.call_at(due, self._collect)

    def _collect(self) -> None:
        self._collect_timer = None
        self._last_collect_ns = time.monotonic_ns()
        gc.collect()

    def close(self) -> None:
        """End the session, stop listening, remove the socket file."""
        with self.loop.owned_by(self):
            self._end_session()
        if self._collect_timer is not None:
            self._collect_timer.cancel()
            self._collect_timer = None
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if self._owns_path:
                try:
                    os.unlink(self.socket_path)
                except FileNotFoundError:
                    pass
        self.device.detach()


def run_daemons(daemons: list[Daemon], loop: EventLoop) -> None:
    """Serve several daemons on one loop (the switch's ports) until loop.stop().
    The loop wakes on a timer only while a client-mode port has no front-end."""
    clients = [d for d in daemons if d.client]
    while not loop.stopping:
        for d in clients:
            d.connect_if_due()
        waiting = any(d.conn is None and not d.unplugged for d in clients)
        loop.run_once(RECONNECT_INTERVAL if waiting else None)


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a dead process is removed; anything else is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"--socket {path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError as e:
        raise SocketPathError(f"--socket {path}: {e.strerror}") from e
    finally:
        probe.close()
    raise SocketPathError(f"--socket {path} is in use by another process")
