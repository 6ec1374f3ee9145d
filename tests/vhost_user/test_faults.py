"""An unexpected exception drops one session, never the daemon.

The daemon runs in this process (in a thread) so that a fault can be put
into its device: a bug in a request handler, and a bug in the datapath. The
socket, protocol layer and front-end are the real ones.
"""

from __future__ import annotations

import os
import threading

import pytest

from pyvhost.devices.loopback import LoopbackNet
from pyvhost.errors import PeerError, TransportError
from pyvhost.frontend.net import NetFrontend
from pyvhost.testing.memfd import mappings_named, open_fds
from pyvhost.testing.processes import wait_for
from pyvhost.vhost_user.daemon import Daemon

FRAME = bytes.fromhex("ffffffffffff525400000001") + b"\x88\xb5" + b"fault"


class FaultyLoopback(LoopbackNet):
    """A loopback device with a bug on demand: in a handler or in the datapath."""

    def __init__(self) -> None:
        super().__init__()
        self.fault: str | None = None

    def queue_started(self, index, queue, notifier) -> None:
        if self.fault == "handler":
            raise RuntimeError("injected fault in a request handler")
        super().queue_started(index, queue, notifier)

    def queue_kicked(self, index) -> None:
        if self.fault == "datapath" and index % 2 == 1:
            raise RuntimeError("injected fault in the datapath")
        super().queue_kicked(index)


@pytest.fixture
def served(tmp_path):
    device = FaultyLoopback()
    daemon = Daemon(device, str(tmp_path / "vhost.sock"))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    yield device, daemon
    daemon.loop.stop()
    thread.join(5)
    daemon.close()


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def _session_gone(daemon: Daemon) -> bool:
    return daemon.conn is None and not mappings_named("pyvhost-frontend-ram")


@pytest.mark.parametrize("where", ["handler", "datapath"])
def test_an_unexpected_exception_drops_the_session_and_the_next_frontend_is_served(
    served, where, caplog
):
    device, daemon = served
    path = daemon.socket_path
    with NetFrontend.connect(path) as warm:  # the daemon's own fds settle first
        warm.post_rx()
    wait_for(lambda: _session_gone(daemon), 5, "the warm-up session to end")
    baseline = open_fds()

    if where == "handler":
        device.fault = where
        with pytest.raises((PeerError, TransportError)):
            NetFrontend.connect(path)
    else:
        fe = NetFrontend.connect(path)
        fe.post_rx()
        device.fault = where
        fe.send(FRAME)  # the TX kick reaches the faulty datapath
        wait_for(lambda: daemon.conn is None, 5, "the session to be dropped")
        fe.close()
    wait_for(lambda: _session_gone(daemon), 5, "the session's memory to be unmapped")
    try:
        # Only new fds count: this process also runs pytest, whose own fds may go.
        wait_for(lambda: not open_fds() - baseline, 5, "the session's fds to be closed")
    except TimeoutError:
        left = {fd: _target(fd) for fd in open_fds() - baseline}
        raise AssertionError(f"fds left open after the session was dropped: {left}") from None
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)
    assert "injected fault" in caplog.text

    device.fault = None
    with NetFrontend.connect(path) as fe:
        fe.post_rx()
        fe.send(FRAME)
        assert fe.receive(timeout=5) == [FRAME]
