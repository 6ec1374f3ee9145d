"""A small QMP client: QEMU's JSON monitor, for what the tests and the
demo ask of a running QEMU (migrate, query-migrate, status, quit)."""

from __future__ import annotations

import json
import socket
import time

from pyvhost.guest.qemu import GuestError


class QmpError(GuestError):
    """QEMU answered a command with an error: its class and description."""


class Qmp:
    """One QMP connection (QEMU's `-qmp unix:PATH,server=on,wait=off`)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # QEMU creates the socket as it starts
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"QMP socket {path}: {e.strerror}") from None
                time.sleep(0.05)
        sock.settimeout(timeout)
        self._sock = sock
        self._file = sock.makefile("rb")
        self.events: list[dict] = []
        greeting = self._read()
        # An event can come before the greeting: a QEMU started with -incoming
        # emits MIGRATION "setup" as it starts, and one that accepts us early
        # enough sends it first (seen once in CI). Keep it, as later ones are.
        while "event" in greeting:
            self.events.append(greeting)
            greeting = self._read()
        if "QMP" not in greeting:
            self.close()
            raise GuestError(f"QMP socket {path}: not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise GuestError("QEMU closed its QMP socket")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        """Run one command; its "return" value, or QmpError."""
        msg: dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QEMU refused {command}: {err.get('desc', err)}")
            return reply.get("return")

    def wait_migration(self, timeout: float = 120.0, progress=lambda msg: None) -> dict:
        """Poll query-migrate until the migration completes (its final report)
        or fails (QmpError with QEMU's reason)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QmpError(f"migration {status}: {info.get('error-desc', info)}")
            ram = info.get("ram", {})
            if ram:
                progress(f"migration {status}: {ram.get('transferred', 0) >> 20} MiB sent, "
                         f"{ram.get('remaining', 0) >> 20} MiB left")  # fmt: skip
            if time.monotonic() > deadline:
                raise QmpError(f"migration still {status} after {timeout:.0f} s")
            time.sleep(0.2)

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
