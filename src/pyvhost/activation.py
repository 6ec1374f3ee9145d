"""How a service manager hands pyvhost its socket and hears that it is ready.

systemd's socket activation (sd_listen_fds(3)): the manager binds and listens
on the socket itself, so a VM can connect before pyvhost runs; it then starts
pyvhost with the socket as fd 3 and LISTEN_PID/LISTEN_FDS saying so. QEMU's
back-end program conventions name the same fd with --fd. sd_notify(3):
READY=1 on the datagram socket in NOTIFY_SOCKET once pyvhost serves.

Both protocols are a few lines over the environment and a socket, so they are
spoken here directly rather than through libsystemd.
"""

from __future__ import annotations

import os
import socket
import stat

from pyvhost.errors import OptionError

SD_LISTEN_FDS_START = 3


def listen_fds(environ: dict[str, str] | None = None) -> list[int]:
    """The fds systemd passed to this process (empty if none, or not for us).

    The variables are removed once read, as sd_listen_fds(unset=1) does, so a
    child (an ifup script=) does not take the fds for its own.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for the process that started us
        n = int(count)
    except ValueError:
        raise OptionError(
            f"LISTEN_PID={pid} LISTEN_FDS={count}: not numbers; the service manager "
            "that started pyvhost is not speaking sd_listen_fds(3)"
        ) from None
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            raise OptionError(
                f"LISTEN_FDS={n}: fd {fd} is not open; the service manager passed no socket"
            ) from None
    return fds


def inherited_socket(fd: int, option: str = "--fd") -> socket.socket:
    """A Unix stream socket from an inherited fd: listening (socket activation,
    QEMU's --fd convention) or already connected to a front-end (what libvirt and
    QEMU's own back-end launchers pass)."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise OptionError(f"{option}={fd}: not an open file descriptor ({e.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise OptionError(f"{option}={fd}: not a socket; pass a Unix stream socket's fd")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()  # not ours to close: the caller's fd, refused
        raise OptionError(f"{option}={fd}: not a Unix stream socket (vhost-user needs one)")
    os.set_inheritable(fd, False)
    return sock


def is_listening(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Tell the service manager `state` (e.g. READY=1); False when none listens."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), path)
        except OSError:
            return False
    return True
