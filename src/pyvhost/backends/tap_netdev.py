"""Open the TAP queues that a `--netdev tap,...` asks for, or fail leaving nothing.

Order matters, so that a refusal leaves nothing behind: every check that
needs no TAP runs first (vhost, the kernel's features); then the queues are
opened; then sndbuf and the up script. Any failure closes what was opened
(a TAP pyvhost created disappears with its last fd) and runs the down
script only if the up script ran.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess

from pyvhost.backends.tap import IFF_MULTI_QUEUE, IFF_VNET_HDR, Tap
from pyvhost.backends.tap_options import TapOptions
from pyvhost.errors import OptionError, PyvhostError, TapError

log = logging.getLogger(__name__)

VHOST_NET = "/dev/vhost-net"
VHOST_NET_RDEV = os.makedev(10, 238)  # misc device minor of vhost-net
SCRIPT_TIMEOUT = 30.0


class VhostUnavailableError(OptionError):
    """vhost=on that cannot be honoured: always an error, never a silent fallback."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"vhost-net requested but could not be initialized: {reason}")


def check_vhost(opts: TapOptions) -> None:
    """Validate vhost=on / vhostfd= and report; the kernel datapath is not pyvhost's yet."""
    if not opts.vhost:
        return
    if opts.vhostfds:
        for fd in opts.vhostfds:
            try:
                st = os.fstat(fd)
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError as e:
                raise VhostUnavailableError(f"vhostfd={fd}: {e.strerror}") from e
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == VHOST_NET_RDEV):
                raise VhostUnavailableError(f"vhostfd={fd} is {target}, not {VHOST_NET}")
    else:
        try:
            fd = os.open(VHOST_NET, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VhostUnavailableError(
                f"{VHOST_NET}: {e.strerror} (load the vhost_net module, or use vhost=off)"
            ) from e
        os.close(fd)
    log.warning(
        "vhost=on: vhost-net is available, but pyvhost's kernel datapath is not "
        "implemented yet; the rings are served by pyvhost's own datapath"
    )


def run_script(script: str, ifname: str, option: str) -> None:
    """Run an up/down script with the interface name, as QEMU does."""
    try:
        r = subprocess.run([script, ifname], timeout=SCRIPT_TIMEOUT, capture_output=True, text=True)
    except FileNotFoundError:
        raise OptionError(f"{option}={script}: no such file") from None
    except PermissionError:
        raise OptionError(f"{option}={script}: not executable (chmod +x it)") from None
    except subprocess.TimeoutExpired:
        raise OptionError(
            f"{option}={script} {ifname}: still running after {SCRIPT_TIMEOUT:.0f} s; killed"
        ) from None
    except OSError as e:
        raise OptionError(f"{option}={script}: cannot run: {e.strerror}") from e
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise OptionError(
            f"{option}={script} {ifname} failed with status {r.returncode}: {detail[0]}"
        )


class TapNetdev:
    """The TAP queues of one --netdev, and what must run when they close."""

    def __init__(self, queues: list[Tap], downscript: str | None, vhostfds: list[int]) -> None:
        self.queues = queues
        self.downscript = downscript
        self._vhostfds = vhostfds

    @property
    def ifname(self) -> str:
        return self.queues[0].name

    @classmethod
    def open(cls, opts: TapOptions) -> TapNetdev:
        check_vhost(opts)
        queues: list[Tap] = []
        script_ran = False
        try:
            if opts.from_fds:
                queues = _adopt(opts)
            else:
                queues = _create(opts)
            if opts.sndbuf is not None:
                for q in queues:
                    # sndbuf=0 means "no limit", as in QEMU.
                    q.set_sndbuf(opts.sndbuf or 2**31 - 1)
            if opts.script:
                run_script(opts.script, queues[0].name, "script")
                script_ran = True
        except BaseException:
            if script_ran and opts.downscript:
                _run_quietly(opts.downscript, queues[0].name)
            for q in queues:
                q.close()
            raise
        return cls(queues, opts.downscript, list(opts.vhostfds))

    def close(self) -> None:
        """Run the down script (interface still there), then close every queue."""
        if self.queues and self.downscript:
            _run_quietly(self.downscript, self.queues[0].name)
        for q in self.queues:
            q.close()
        self.queues = []
        for fd in self._vhostfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._vhostfds = []


def _create(opts: TapOptions) -> list[Tap]:
    features = Tap.kernel_features()
    if opts.vnet_hdr and not features & IFF_VNET_HDR:
        raise OptionError("vnet_hdr=on requested, but the kernel's TAP has no IFF_VNET_HDR")
    if opts.queues > 1 and not features & IFF_MULTI_QUEUE:
        raise OptionError(f"queues={opts.queues}: the kernel's TAP has no IFF_MULTI_QUEUE")
    vnet_hdr = bool(features & IFF_VNET_HDR) if opts.vnet_hdr is None else opts.vnet_hdr
    name = opts.ifname or "tap%d"
    queues: list[Tap] = []
    try:
        for _ in range(opts.queues):
            q = Tap.open(name, vnet_hdr=vnet_hdr, multi_queue=opts.queues > 1)
            name = q.name  # "tap%d" becomes a real name; later queues join it
            queues.append(q)
    except BaseException:
        for q in queues:
            q.close()
        raise
    return queues


def _adopt(opts: TapOptions) -> list[Tap]:
    option = "fds" if "fds" in opts.given else "fd"
    queues: list[Tap] = []
    try:
        for fd in opts.fds:
            queues.append(Tap.from_fd(fd, option))
    except BaseException:
        for q in queues:  # adopted fds are ours to close, like any other
            q.close()
        raise
    names = {q.name for q in queues}
    if len(names) > 1:
        for q in queues:
            q.close()
        raise TapError(f"{option}= names queues of different interfaces: {sorted(names)}")
    vnet = {q.has_vnet_hdr for q in queues}
    if len(vnet) > 1:
        for q in queues:
            q.close()
        raise TapError(f"{option}=: some queues have IFF_VNET_HDR and some do not")
    return queues


def _run_quietly(script: str, ifname: str) -> None:
    try:
        run_script(script, ifname, "downscript")
    except PyvhostError as e:
        log.error("%s", e)
