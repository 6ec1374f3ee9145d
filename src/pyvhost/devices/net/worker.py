"""The worker engine: a queue pair served by its own process (worker_process.py).

The control process keeps the vhost-user session, the device and the memory
map; `WorkerPair` is the pair's engine (engine.py) and a proxy: each engine
call becomes a message to the worker, with the eventfds, the regions' fds or
the TAP queue's fd attached. Like the kernel engine it is a MemoryListener:
each committed map change (and the dirty log coming or going) is sent whole,
and answered before the vhost-user request that caused it is, so the worker
never reads a region the front-end has already taken back. GET_VRING_BASE
(`stop_ring`) is a request too: the worker completes what it took and says
where it stopped, so no frame is lost at a change of map, engine or owner.

The worker starts with the first ring and lives until the device closes;
between front-ends it holds no memory and no front-end fd. If it dies, the
session it served ends (as a crash of the whole back-end would end it), and
the next ring starts a new worker.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict

from pyvhost.device import RingConfig
from pyvhost.devices.net.engine import DatapathError
from pyvhost.devices.net.metrics import QueueCounters
from pyvhost.devices.net.worker_process import RING_FIELDS, receive, send
from pyvhost.eventloop import EventLoop
from pyvhost.memory import GuestMemory, MemoryRegion

log = logging.getLogger(__name__)

REPLY_TIMEOUT = 10.0  # a worker that does not answer a request in this long is hung


class WorkerError(DatapathError):
    """The worker process failed, hung or exited."""


class WorkerPair:
    """RX 2N and TX 2N+1 served by a worker process, on TAP queue N."""

    kind = "worker"

    def __init__(
        self,
        pair: int,
        host,
        loop: EventLoop,
        *,
        settings: dict[str, int] | None = None,
        log_level: str = "warning",
    ) -> None:
        self.pair = pair
        self.host = host
        self.loop = loop
        self._settings = dict(settings or {})  # QueuePair's keyword arguments
        self._log_level = log_level
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._features = 0
        self._configs: dict[bool, RingConfig] = {}
        self._memory: GuestMemory | None = None
        self._log_sent: object = None  # the DirtyLog the worker marks now

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # --- the engine interface ----------------------------------------------------------

    def configure(self, features: int) -> None:
        self._features = features
        if self._sock is not None:
            self._request("configure", features)

    def start_ring(self, rx: bool, config: RingConfig) -> None:
        if not isinstance(config.memory, GuestMemory):
            raise WorkerError(
                f"ring {config.index}: a worker serves guest memory directly; a device "
                "behind a vIOMMU (ACCESS_PLATFORM) is served in the control process"
            )
        self._ensure_started()
        self._begin(config.memory)
        fields = {name: getattr(config, name) for name in RING_FIELDS}
        which, fds = self._ring_fds(config)
        self._request("start", rx, fields, which, fds=fds)
        self._configs[rx] = config

    def stop_ring(self, rx: bool) -> int:
        config = self._configs.pop(rx, None)
        if config is None:
            raise ValueError(f"{'rx' if rx else 'tx'}{self.pair} is not started")
        if self._sock is None:  # the worker died: the ring stopped where it was
            return config.base
        base = self._request("stop", rx)
        if not self._configs:
            self._end()  # no ring left: the worker lets go of the guest's memory
        return base

    def set_ring_enabled(self, rx: bool, enabled: bool) -> None:
        if rx in self._configs and self._sock is not None:
            self._request("enable", rx, enabled)

    def ring_fds_changed(self, rx: bool) -> None:
        config = self._configs.get(rx)
        if config is not None and self._sock is not None:
            which, fds = self._ring_fds(config)
            self._request("fds", rx, which, fds=fds)

    def holds_frames(self) -> bool:
        return self._sock is not None and bool(self._request("holds"))

    def host_io(self) -> dict[str, str]:
        if self._sock is not None:
            try:
                return self._request("host_io")
            except WorkerError as e:
                log.warning("pair %d: no host I/O report from the worker: %s", self.pair, e)
        return {}

    # --- counters ----------------------------------------------------------------------

    def counters(self) -> tuple[QueueCounters, QueueCounters]:
        """(rx, tx) as the worker counts them (zeros without a worker: a worker
        that died took its counts with it)."""
        if self._sock is not None:
            try:
                rx, tx = self._request("counters")
                return QueueCounters(**rx), QueueCounters(**tx)
            except WorkerError as e:
                log.warning("pair %d: no counters from the worker: %s", self.pair, e)
        return QueueCounters(), QueueCounters()

    # --- memory: the same map as the control process's -----------------------------------

    def _begin(self, memory: GuestMemory) -> None:
        if self._memory is memory:
            return
        self._end()
        # The worker's events belong to the session now running (EventLoop
        # owners): if the worker dies, this session ends, not an earlier one.
        self.loop.remove_reader(self._sock.fileno())
        self.loop.add_reader(self._sock.fileno(), self._on_readable)
        self._memory = memory
        memory.add_listener(self)
        self.map_committed()
        self.log_changed()

    def _end(self) -> None:
        if self._memory is None:
            return
        try:
            self._memory.remove_listener(self)
        except ValueError:
            pass
        self._memory = None
        if self._sock is not None:
            self._request("memory", [])
            if self._log_sent is not None:
                self._request("log", None, 0, False)
        self._log_sent = None

    def region_added(self, region: MemoryRegion) -> None:
        pass  # the whole table goes over when the change is committed

    def region_removed(self, region: MemoryRegion) -> None:
        pass

    def map_committed(self) -> None:
        if self._memory is None or self._sock is None:
            return
        regions = self._memory.regions
        specs = [asdict(r.spec) for r in regions]
        fds = [r.share_fd() for r in regions]
        try:
            self._request("memory", specs, fds=fds)
        finally:
            for fd in fds:
                os.close(fd)

    def log_changed(self) -> None:
        if self._memory is None or self._sock is None:
            return
        dirty = self._memory.log
        if dirty is self._log_sent:
            return
        if dirty is None:
            self._request("log", None, 0, False)
        else:
            fds = [dirty.share_fd()]
            if dirty.notify_fd is not None:
                fds.append(os.dup(dirty.notify_fd))
            try:
                self._request("log", dirty.size, dirty.offset, len(fds) > 1, fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)
        self._log_sent = dirty
        log.info("pair %d: worker dirty logging %s", self.pair, "on" if dirty else "off")

    # --- the process -------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._sock is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyvhost.devices.net.worker_process",
                 str(theirs.fileno()), self._log_level],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError as e:
            ours.close()
            raise WorkerError(f"pair {self.pair}: cannot start a worker process: {e}") from e
        finally:
            theirs.close()
        self._sock = ours
        tap_fd = os.dup(self.host.fileno())
        try:
            io_uring = getattr(self.host, "io_uring", "off")  # the TAP's --io-uring
            self._request("setup", self.pair, self._settings, io_uring, fds=[tap_fd])
            self._request("configure", self._features)
        except WorkerError:
            self._reap()
            raise
        finally:
            os.close(tap_fd)
        self.loop.add_reader(ours.fileno(), self._on_readable)
        log.info("pair %d: served by worker process %d", self.pair, self.proc.pid)

    def _request(self, op: str, *args, fds: list[int] = ()):
        """Send one request and wait for its answer (events that come first are handled)."""
        sock = self._sock
        if sock is None:
            raise WorkerError(f"pair {self.pair}: no worker process")
        try:
            send(sock, (op, *args), fds)
            deadline = time.monotonic() + REPLY_TIMEOUT
            while True:
                sock.settimeout(max(0.0, deadline - time.monotonic()))
                got = receive(sock)
                if got is None:
                    status = self._reap()
                    raise WorkerError(
                        f"pair {self.pair}: the worker exited ({status}) during {op!r}"
                    )
                message = self._take(*got)
                if message is None:
                    continue  # an event that came before the answer
                if message[0] == "error":
                    raise WorkerError(f"pair {self.pair}: worker: {op}: {message[1]}")
                return message[1]
        except (OSError, TimeoutError) as e:
            reason = "did not answer" if isinstance(e, TimeoutError) else e
            self._reap()
            raise WorkerError(f"pair {self.pair}: worker: {op}: {reason}") from e
        finally:
            if self._sock is not None:
                self._sock.settimeout(None)

    def _take(self, message: tuple, fds: list[int]) -> tuple | None:
        """A message from the worker: an event (a broken ring) is applied here and
        gives None; an answer is returned. The worker sends no fds; any are closed."""
        for fd in fds:
            os.close(fd)
        if message[0] != "broken":
            return message
        _, index, reason = message
        for config in self._configs.values():
            if config.index == index:
                config.errors.append(reason)
        return None

    def _on_readable(self) -> None:
        """An event from the worker between requests: a broken ring, or its exit."""
        try:
            got = receive(self._sock)
        except OSError:
            got = None
        if got is None:
            status = self._reap()
            raise WorkerError(
                f"pair {self.pair}: the worker process exited ({status}); its session ends"
            )
        self._take(*got)  # between requests only events come

    def _reap(self) -> str:
        """The worker is gone or must go: close the channel (a live worker exits
        at its end), wait for it, and say how it ended."""
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                self.loop.remove_reader(sock.fileno())
            except (KeyError, ValueError):
                pass
            sock.close()
        proc, self.proc = self.proc, None
        if self._memory is not None:
            try:
                self._memory.remove_listener(self)
            except ValueError:
                pass
            self._memory = None
        self._log_sent = None
        if proc is None:
            return "not started"
        try:
            code = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        return f"status {code}" if code >= 0 else f"signal {-code}"

    def close(self) -> None:
        """End the worker (the device is closing): its rings are stopped first."""
        for rx in list(self._configs):
            try:
                self.stop_ring(rx)
            except WorkerError:
                pass
        self._configs.clear()
        if self._sock is not None:
            try:
                self._end()
            except WorkerError:
                pass
        self._reap()

    @staticmethod
    def _ring_fds(config: RingConfig) -> tuple[tuple[bool, bool, bool], list[int]]:
        """Which of kick, call and err the ring has, and those fds (the channel
        sends copies; the control process keeps its own)."""
        present = (config.kick_fd, config.call_fd, config.err_fd)
        return tuple(fd is not None for fd in present), [fd for fd in present if fd is not None]
