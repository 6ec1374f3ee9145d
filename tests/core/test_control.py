"""The control socket: counters for a silent client, commands, and hostile requests."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from pyvhost.control import ControlServer, request
from pyvhost.errors import OptionError
from pyvhost.eventloop import EventLoop


@pytest.fixture
def served(tmp_path):
    loop = EventLoop()
    calls = []

    def datapath(req):
        if req.get("to") == "nowhere":
            raise OptionError("datapath 'nowhere': use kernel or python")
        if req.get("to") == "bug":
            raise RuntimeError("a bug in a command")
        calls.append(req)
        return {"datapaths": [req["to"]]}

    path = str(tmp_path / "ctl.sock")
    server = ControlServer(path, loop, {"stats": lambda req: {"n": 42}, "datapath": datapath})
    stop = threading.Event()
    thread = threading.Thread(target=lambda: loop.run(until=stop.is_set, timeout=0.05))
    thread.start()
    yield path, calls
    stop.set()
    thread.join(5)
    server.close()
    loop.close()


def test_a_silent_client_gets_the_counters(served):
    path, _ = served
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    assert json.loads(data) == {"ok": True, "n": 42}


def test_a_command_is_answered(served):
    path, calls = served
    assert request(path, {"cmd": "datapath", "to": "python"}) == {
        "ok": True,
        "datapaths": ["python"],
    }
    assert calls == [{"cmd": "datapath", "to": "python"}]


@pytest.mark.parametrize(
    "line, error",
    [
        (b"not json\n", "not a JSON request"),
        (b"[1, 2]\n", "not a JSON object"),
        (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
        (b'{"cmd": "datapath", "to": "nowhere"}\n', "use kernel or python"),
        (b'{"cmd": "datapath", "to": "bug"}\n', "internal error: a bug in a command"),
    ],
)
def test_a_bad_request_is_answered_with_the_reason_and_the_server_goes_on(served, line, error):
    path, _ = served
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(line)
    reply = json.loads(s.makefile().readline())
    s.close()
    assert reply["ok"] is False and error in reply["error"]
    assert request(path, {"cmd": "stats"})["n"] == 42
