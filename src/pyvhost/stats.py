"""Counters, readable while the daemon runs: a Unix socket that answers with JSON.

Each connection to the stats socket gets one JSON document and is closed;
`pyvhost stats --socket PATH` (or `socat - UNIX:PATH.stats`) reads it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable

from pyvhost.errors import PyvhostError
from pyvhost.eventloop import EventLoop

log = logging.getLogger(__name__)


def stats_path(socket_path: str) -> str:
    return socket_path + ".stats"


class StatsServer:
    def __init__(self, path: str, loop: EventLoop, snapshot: Callable[[], dict]) -> None:
        self.path = path
        self.loop = loop
        self.snapshot = snapshot
        if os.path.exists(path):
            os.unlink(path)  # ours from a previous run (the vhost-user socket was free)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(path)
            self.sock.listen(4)
        except OSError as e:
            self.sock.close()
            raise PyvhostError(f"--stats-socket {path}: {e.strerror}") from e
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        try:
            conn.settimeout(1.0)
            conn.sendall(json.dumps(self.snapshot(), indent=1).encode() + b"\n")
        except OSError as e:
            log.debug("stats reader went away: %s", e)
        finally:
            conn.close()

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def fetch(path: str, timeout: float = 5.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    except OSError as e:
        raise PyvhostError(
            f"no pyvhost stats at {path}: {e.strerror or e} "
            "(is pyvhost net running with that --socket?)"
        ) from e
    finally:
        s.close()
    return json.loads(data)


def format_table(snapshot: dict) -> str:
    cols = ["packets", "bytes", "drops", "errors", "notifications_sent", "notifications_suppressed"]
    heads = ["queue", "packets", "bytes", "drops", "errors", "notify", "suppressed"]
    rows = [heads] + [
        [name] + [str(counters[c]) for c in cols] for name, counters in snapshot["queues"].items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    lines = [f"{snapshot.get('device', '')} on {snapshot.get('interface', '')}"]
    for r in rows:
        lines.append(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)
