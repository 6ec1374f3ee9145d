"""`pyvhost capture`: ask a control socket for a live capture and write it out."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

from pyvhost.errors import PyvhostError

_EPB = 6


def capture(
    path: str,
    ports: list[str] | None,
    out: str,
    count: int | None = None,
    seconds: float | None = None,
) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        raise PyvhostError(f"no pyvhost control socket at {path}: {e.strerror}") from e
    request = {"cmd": "capture"}
    if ports:
        request["ports"] = ports
    s.sendall(json.dumps(request).encode() + b"\n")
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    line, _, buf = buf.partition(b"\n")
    reply = json.loads(line or b"{}")
    if not reply.get("ok"):
        raise PyvhostError(reply.get("error", "the capture was refused"))
    print(f"pyvhost: capturing {', '.join(reply['ports'])} (pcapng)", file=sys.stderr)
    sink = sys.stdout.buffer if out == "-" else open(out, "wb")  # noqa: SIM115
    frames = 0
    deadline = None if seconds is None else time.monotonic() + seconds
    s.settimeout(0.2)
    try:
        while (count is None or frames < count) and (
            deadline is None or time.monotonic() < deadline
        ):
            if len(buf) < 8 or len(buf) < struct.unpack_from("<II", buf)[1]:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                buf += chunk
            # Write whole blocks only, counting packets, so -c N stops at N.
            while len(buf) >= 8:
                kind, length = struct.unpack_from("<II", buf)
                if len(buf) < length:
                    break
                sink.write(buf[:length])
                buf = buf[length:]
                if kind == _EPB:
                    frames += 1
                    if count is not None and frames >= count:
                        break
            sink.flush()
    except KeyboardInterrupt:
        pass
    finally:
        s.close()
        if sink is not sys.stdout.buffer:
            sink.close()
    print(f"pyvhost: {frames} frames captured", file=sys.stderr)
    return 0
