"""Counters, readable while the daemon runs, through its control socket.

`pyvhost stats --socket PATH` (or `socat - UNIX:PATH.stats`) reads them;
pyvhost.control serves them.
"""

from __future__ import annotations

import logging

from pyvhost.control import request
from pyvhost.errors import PyvhostError

log = logging.getLogger(__name__)


def stats_path(socket_path: str) -> str:
    return socket_path + ".stats"


def fetch(path: str, timeout: float = 5.0) -> dict:
    """The counters of a running pyvhost, from its control socket."""
    reply = request(path, {"cmd": "stats"}, timeout)
    if not reply.get("ok"):
        raise PyvhostError(f"{path}: {reply.get('error')}")
    return reply


def format_table(snapshot: dict) -> str:
    cols = ["packets", "bytes", "drops", "errors", "notifications_sent", "notifications_suppressed"]
    heads = ["queue", "packets", "bytes", "drops", "errors", "notify", "suppressed"]
    rows = [heads] + [
        [name] + [str(counters[c]) for c in cols] for name, counters in snapshot["queues"].items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    lines = [f"{snapshot.get('device', '')} on {snapshot.get('interface', '')}"]
    if snapshot.get("datapaths"):
        io = snapshot.get("host_io") or [{}] * len(snapshot["datapaths"])
        kinds = ", ".join(
            f"pair {i} {k}" + _io_note(how)
            for i, (k, how) in enumerate(zip(snapshot["datapaths"], io, strict=False))
        )
        lines.append(f"datapaths: {kinds}")
    for r in rows:
        lines.append(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def _io_note(how: dict[str, str]) -> str:
    """The note after a pair's datapath, e.g. ' (rx io_uring, tx writev)':
    whether its started rings batch their TAP I/O (a failed batch falls back
    to frame by frame, so the flag alone does not say)."""
    started = [f"{ring} {how[ring]}" for ring in ("rx", "tx") if ring in how]
    return f" ({', '.join(started)})" if started else ""
