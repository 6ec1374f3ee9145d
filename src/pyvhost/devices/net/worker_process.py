"""A worker process: one queue pair's Python datapath on its own core.

The control process (worker.py, `WorkerPair`) starts this module with one
end of a SOCK_SEQPACKET socketpair and then drives it with the engine calls
of engine.py, each a message: what the ring is (RingConfig's plain fields)
with its eventfds, the guest memory table with the regions' fds, the dirty
log with its fd, the TAP queue's fd. This process maps the memory itself,
serves the rings with a `QueuePair` in its own event loop, and signals the
front-end's call eventfds directly: per packet, nothing crosses the
socketpair.

The channel carries pickles: both ends are this package, started by the
control process; nothing the guest or the front-end sends reaches it
unvalidated (the control process parsed and checked every vhost-user
message before turning it into a call here).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass

from pyvhost.backends.tap import Tap
from pyvhost.device import RingConfig
from pyvhost.devices.net.datapath import QueuePair
from pyvhost.eventloop import EventLoop
from pyvhost.memory import GuestMemory, RegionSpec
from pyvhost.memory.dirty_log import DirtyLog

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
MAX_FDS = 253  # SCM_MAX_FD


def send(sock: socket.socket, message: tuple, fds: list[int] = ()) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket) -> tuple[tuple, list[int]] | None:
    """One message and its fds (the caller owns them); None at EOF."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return pickle.loads(data), fds


# RingConfig's plain fields, as the control process sends them.
RING_FIELDS = (
    "index", "size", "desc", "avail", "used", "base", "packed", "event_idx",
    "indirect", "polled", "name", "log_used",
)  # fmt: skip


@dataclass
class _WorkerRing(RingConfig):
    """A ring as this process serves it: a broken ring is also told to the
    control process, which keeps the ring's errors for `pyvhost stats`."""

    report: object = None

    def signal_error(self, error: Exception) -> None:
        super().signal_error(error)
        if self.report is not None:
            self.report(self.index, str(error))


class Worker:
    """The worker's end of the channel: requests in, replies and events out."""

    def __init__(self, sock: socket.socket, loop: EventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.memory = GuestMemory()
        self.pair: QueuePair | None = None
        self.host: Tap | None = None
        self.rings: dict[bool, _WorkerRing] = {}
        self.done = False

    # --- the channel ---------------------------------------------------------------------

    def on_message(self) -> None:
        got = receive(self.sock)
        if got is None:
            self.done = True  # the control process has gone: so do we
            return
        (op, *args), fds = got
        try:
            result = getattr(self, "op_" + op)(*args, fds=fds)
        except Exception as e:  # noqa: BLE001 - the reason goes back to the caller
            log.debug("worker: %s failed", op, exc_info=True)
            send(self.sock, ("error", f"{type(e).__name__}: {e}"))
            return
        send(self.sock, ("ok", result))

    def report_broken(self, index: int, reason: str) -> None:
        send(self.sock, ("broken", index, reason))

    # --- requests ----------------------------------------------------------------------

    def op_setup(self, pair: int, settings: dict[str, int], io_uring: str, *, fds):
        (tap_fd,) = fds
        self.host = Tap.from_fd(tap_fd, option="worker tap")
        self.host.io_uring = io_uring  # its io_uring ring is made here, in this process
        self.pair = QueuePair(pair, self.host, self.loop, **settings)
        return os.getpid()

    def op_memory(self, specs: list[dict], *, fds):
        """Replace the memory map: the control process sends it whole at each change."""
        self.memory.set_regions((RegionSpec(**s), fd) for s, fd in zip(specs, fds, strict=True))

    def op_log(self, size: int | None, offset: int, has_notify: bool, *, fds):
        dirty = None
        if size is not None:
            dirty = DirtyLog(fds[0], size, offset)
            if has_notify:
                dirty.notify_fd = fds[1]
        old = self.memory.log
        self.memory.set_log(dirty)
        if old is not None:
            old.close()

    def op_configure(self, features: int, *, fds):
        self.pair.configure(features)

    def op_start(self, rx: bool, fields: dict, which: tuple[bool, bool, bool], *, fds):
        config = _WorkerRing(memory=self.memory, report=self.report_broken, **fields)
        self._take_fds(config, which, fds)
        self.rings[rx] = config
        self.pair.start_ring(rx, config)

    def op_stop(self, rx: bool, *, fds):
        base = self.pair.stop_ring(rx)
        self._close_fds(self.rings.pop(rx))
        return base

    def op_enable(self, rx: bool, enabled: bool, *, fds):
        self.pair.set_ring_enabled(rx, enabled)

    def op_fds(self, rx: bool, which: tuple[bool, bool, bool], *, fds):
        config = self.rings[rx]
        old = [config.kick_fd, config.call_fd, config.err_fd]
        self._take_fds(config, which, fds)
        self.pair.ring_fds_changed(rx)
        for fd in old:
            if fd is not None:
                os.close(fd)

    def op_holds(self, *, fds):
        return self.pair.holds_frames()

    def op_counters(self, *, fds):
        return self.pair.rx_counters.as_dict(), self.pair.tx_counters.as_dict()

    def op_host_io(self, *, fds):
        return self.pair.host_io()

    # --- fds ---------------------------------------------------------------------------

    @staticmethod
    def _take_fds(config: RingConfig, which: tuple[bool, bool, bool], fds: list[int]) -> None:
        it = iter(fds)
        config.kick_fd, config.call_fd, config.err_fd = (next(it) if w else None for w in which)

    @staticmethod
    def _close_fds(config: RingConfig) -> None:
        for fd in (config.kick_fd, config.call_fd, config.err_fd):
            if fd is not None:
                os.close(fd)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: if the control process is killed outright, so is this one."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    fd, level = int(argv[0]), argv[1] if len(argv) > 1 else "warning"
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the control process's to handle
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format=f"pyvhost worker {os.getpid()}: %(levelname)s %(message)s",
    )
    sock = socket.socket(fileno=fd)
    loop = EventLoop()
    worker = Worker(sock, loop)
    loop.add_reader(sock.fileno(), worker.on_message)
    try:
        while not worker.done:
            loop.run_once(None)
    finally:
        if worker.pair is not None:
            worker.pair.close()
        for config in worker.rings.values():
            worker._close_fds(config)
        worker.memory.clear()
        if worker.memory.log is not None:
            worker.memory.log.close()
        if worker.host is not None:
            worker.host.close()
        loop.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
