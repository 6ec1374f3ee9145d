from __future__ import annotations

import os

import pytest

from pyvhost.testing.processes import PyvhostProcess


class SwitchProcess:
    """`pyvhost switch` with VM ports a, b, c (and extra arguments)."""

    def __init__(self, tmp_path, *extra: str, ports: tuple[str, ...] = ("a", "b", "c")) -> None:
        self.sockets = {p: str(tmp_path / f"{p}.sock") for p in ports}
        self.control = str(tmp_path / "switch.ctl")
        args = ["switch", "--control", self.control]
        for name, sock in self.sockets.items():
            args += ["--port", f"{name}={sock}"]
        self.proc = PyvhostProcess([*args, *extra], self.control)

    def stop(self) -> str:
        status, out, err = self.proc.stop()
        assert status == 0, err
        for sock in [*self.sockets.values(), self.control]:
            assert not os.path.exists(sock), f"{sock} left behind"
        return out


@pytest.fixture
def switch(tmp_path):
    made = []

    def start(*extra: str, **kw) -> SwitchProcess:
        s = SwitchProcess(tmp_path, *extra, **kw)
        made.append(s)
        return s

    yield start
    for s in made:
        if s.proc.proc.poll() is None:
            s.stop()
