"""What systemd does for pyvhost-net@.socket and .service, done by hand.

systemd is not PID 1 on the machines the tests run on, so this plays its part
from the unit files themselves: it binds and listens on the socket unit's
ListenStream= with its SocketMode=, reads the service's Environment= and
ExecStart=, expands the specifiers and variables the way systemd does (%i, %t,
${VAR} as one word, $VAR split on whitespace), and starts the command with the
socket as fd 3, LISTEN_PID/LISTEN_FDS set for it, a NOTIFY_SOCKET to hear
READY=1 on, and the service's user and ambient capabilities (setpriv stands in
for DynamicUser=).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def specifiers(text: str, instance: str, runtime_dir: str) -> str:
    table = {"i": instance, "I": instance, "t": runtime_dir, "%": "%"}
    return re.sub(r"%(.)", lambda m: table[m.group(1)], text)


def environment(lines: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in lines:
        for assignment in shlex.split(line):
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


def exec_argv(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart= to argv: ${VAR} is one word (or part of one), $VAR splits."""
    argv: list[str] = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            argv += env.get(word[1:], "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return argv


@dataclass
class ActivatedService:
    """The socket unit's socket, and the service started on it as systemd would."""

    socket_unit: str
    service_unit: str
    instance: str
    runtime_dir: str
    environment: dict[str, str] = field(default_factory=dict)  # a drop-in's Environment=
    run_as: tuple[int, int] | None = (65534, 65534)  # DynamicUser=: some unprivileged uid
    listener: socket.socket | None = None
    proc: subprocess.Popen | None = None
    notify: socket.socket | None = None

    def __post_init__(self) -> None:
        self.sock_cfg = parse_unit(self.socket_unit)["Socket"]
        self.svc_cfg = parse_unit(self.service_unit)["Service"]

    def _expand(self, text: str) -> str:
        return specifiers(text, self.instance, self.runtime_dir)

    @property
    def socket_path(self) -> str:
        return self._expand(values(self.sock_cfg, "ListenStream")[0])

    def runtime_directory(self) -> str:
        name = values(self.svc_cfg, "RuntimeDirectory")[0]
        return os.path.join(self.runtime_dir, self._expand(name))

    def listen(self) -> str:
        """What the socket unit does when enabled: the socket exists, nobody serves it."""
        path = self.socket_path
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        os.chmod(path, int(values(self.sock_cfg, "SocketMode")[0], 8))
        return path

    def argv(self) -> list[str]:
        env = environment([self._expand(v) for v in values(self.svc_cfg, "Environment")])
        env.update(self.environment)
        return exec_argv(self._expand(values(self.svc_cfg, "ExecStart")[0]), env)

    def start(self) -> subprocess.Popen:
        """What the first connection makes systemd do: start the service."""
        rundir = self.runtime_directory()
        os.makedirs(rundir, exist_ok=True)
        notify_path = os.path.join(self.runtime_dir, f"notify-{self.instance}")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        wrapper: list[str] = []
        if self.run_as is not None:
            uid, gid = self.run_as
            os.chown(rundir, uid, gid)
            os.chmod(notify_path, 0o777)
            caps = [
                c.lower().removeprefix("cap_")
                for v in values(self.svc_cfg, "AmbientCapabilities")
                for c in v.split()
            ]
            capset = ",".join(f"+{c}" for c in caps)
            wrapper = [
                "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                f"--inh-caps=-all,{capset}", f"--ambient-caps=-all,{capset}",
                f"--bounding-set=-all,{capset}",
            ]  # fmt: skip
        fd = self.listener.fileno()
        argv = self.argv()
        # LISTEN_PID must be the service's own PID: the shell exports its $$ and
        # execs (setpriv execs too), so the PID stays the same.
        script = 'export LISTEN_PID=$$; exec "$@"'
        env = {**os.environ, "LISTEN_FDS": "1", "NOTIFY_SOCKET": notify_path}
        env.pop("LISTEN_PID", None)
        self.proc = subprocess.Popen(
            ["sh", "-c", script, "sh", *wrapper, *argv],
            # fd 3 must be the socket: dup2 in the child, whose other fds are
            # all close-on-exec (Python's default), so nothing else leaks in.
            close_fds=False,
            preexec_fn=lambda: os.dup2(fd, 3),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        return self.proc

    def wait_ready(self, timeout: float = 20) -> str:
        """The service's READY=1 (Type=notify)."""
        self.notify.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                raise TimeoutError(f"no READY=1 in {timeout} s: {self.stop()}") from None
            if "READY=1" in msg.split("\n"):
                return msg
            if time.monotonic() > deadline:
                raise TimeoutError(f"no READY=1 in {timeout} s")

    def stop(self, timeout: float = 10) -> tuple[int, str, str]:
        """SIGTERM, as systemctl stop; the socket stays (the socket unit's)."""
        if self.proc is None:
            return 0, "", ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        status, self.proc = self.proc.returncode, None
        return status, out, err

    def close(self) -> None:
        """Stop the service, then what RemoveOnStop= does with the socket."""
        self.stop()
        if self.notify is not None:
            path = self.notify.getsockname()
            self.notify.close()
            self.notify = None
            os.unlink(path)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            os.unlink(self.socket_path)
