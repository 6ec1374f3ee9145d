"""The QMP client's handshake, against a scripted monitor: the order of a
real QEMU's first lines depends on a race it cannot be made to lose on
demand (an -incoming QEMU's MIGRATION event before its greeting)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from pyvhost.guest.qemu import GuestError
from pyvhost.guest.qmp import Qmp

GREETING = {"QMP": {"version": {}, "capabilities": []}}
SETUP = {"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {}}


def scripted_monitor(path: str, first_lines: list[dict]) -> threading.Thread:
    """Listen at `path`; to one client, send `first_lines`, then answer each
    command with an empty return."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        with server, server.accept()[0] as conn, conn.makefile("rwb") as f:
            for line in first_lines:
                f.write(json.dumps(line).encode() + b"\n")
            f.flush()
            for _ in f:
                f.write(b'{"return": {}}\n')
                f.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_an_event_before_the_greeting_is_kept_and_the_handshake_completes(tmp_path):
    path = str(tmp_path / "qmp")
    thread = scripted_monitor(path, [SETUP, GREETING])
    qmp = Qmp(path, timeout=5)
    try:
        assert qmp.events == [SETUP]
        assert qmp.execute("query-status") == {}
    finally:
        qmp.close()
    thread.join(5)


def test_a_first_line_that_is_neither_greeting_nor_event_is_refused(tmp_path):
    path = str(tmp_path / "qmp")
    thread = scripted_monitor(path, [{"return": {}}])
    with pytest.raises(GuestError, match="not a QMP greeting"):
        Qmp(path, timeout=5)
    thread.join(5)
