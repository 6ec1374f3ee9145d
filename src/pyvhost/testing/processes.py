"""Starting and stopping pyvhost processes in tests and tools, by PID, cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable


def listening(path: str) -> bool:
    """Is a Unix socket listening at `path`? (/proc/net/unix; connects to nothing)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def end_all(procs: list[subprocess.Popen], grace: float = 1.0) -> None:
    """SIGTERM every one at once, then SIGKILL whatever is left after `grace`
    seconds: how an interrupted run gets back to its user promptly."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class PyvhostProcess:
    """`python -m pyvhost ARGS` as a child; stop() sends SIGTERM and reaps it."""

    def __init__(
        self,
        args: list[str],
        socket_path: str | None = None,
        wait: bool = True,
        pass_fds: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
        stderr_path: str | None = None,
    ):
        """`env`: variables added to this process's environment for the child.
        `stderr_path`: its log goes to this file, not a pipe (a pipe nobody reads
        until the end blocks a daemon that logs much, e.g. under fuzzing)."""
        self.args = args
        self.socket_path = socket_path
        self.stderr_path = stderr_path
        self._stderr_file = open(stderr_path, "w") if stderr_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvhost", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr_file or subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
            env={**os.environ, **env} if env else None,
            start_new_session=True,  # a Ctrl-C meant for the caller is the caller's to handle
        )
        if wait and socket_path is not None:
            try:
                # Not mere existence: a killed predecessor leaves its socket file.
                # 30 s: a TCG guest (the kernel-datapath tests) starts Python slowly.
                wait_for(
                    lambda: listening(socket_path) or self.proc.poll() is not None,
                    30,
                    f"pyvhost to listen on {socket_path}",
                )
            except BaseException:
                self.kill()
                raise
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise RuntimeError(f"pyvhost exited with {self.proc.returncode}: {err}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> set[int]:
        return {int(x) for x in os.listdir(f"/proc/{self.pid}/fd")}

    def settled_fds(self, timeout: float = 10.0) -> set[int]:
        """The fds once they stop changing (a leak check's baseline: a session
        that just ended may still be closing its socket after its memory went)."""
        deadline = time.monotonic() + timeout
        last = self.fds()
        while True:
            time.sleep(0.3)
            now = self.fds()
            if now == last or time.monotonic() > deadline:
                return now
            last = now

    def maps(self, name: str) -> list[str]:
        with open(f"/proc/{self.pid}/maps") as f:
            return [line for line in f if name in line]

    def stop(self, timeout: float = 10.0) -> tuple[int, str, str]:
        """SIGTERM, wait, and return (exit status, stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
        return self.proc.returncode, out, self._file_log(err)

    def _file_log(self, err: str | None) -> str:
        if self._stderr_file is None:
            return err
        self._stderr_file.close()
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def wait(self, timeout: float = 10.0) -> tuple[int, str, str]:
        """Wait for the process to exit on its own; (exit status, stdout, stderr)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.proc.returncode, out, self._file_log(err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
