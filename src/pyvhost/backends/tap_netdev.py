"""Open the TAP queues that a `--netdev tap,...` asks for, or fail leaving nothing.

Order matters, so that a refusal leaves nothing behind: every check that
needs no TAP runs first (vhost-net opened and owned, the kernel's features);
then the queues are opened; then sndbuf and the up script. Any failure closes what was opened
(a TAP pyvhost created disappears with its last fd) and runs the down
script only if the up script ran.
"""

from __future__ import annotations

import logging
import subprocess

from pyvhost.backends.tap import IFF_MULTI_QUEUE, IFF_VNET_HDR, Tap
from pyvhost.backends.tap_options import TapOptions
from pyvhost.backends.vhost_net import VhostNet, VhostNetError, VhostUnavailableError
from pyvhost.errors import OptionError, PyvhostError, TapError

log = logging.getLogger(__name__)

SCRIPT_TIMEOUT = 30.0


def open_vhost(opts: TapOptions) -> list[VhostNet]:
    """One vhost-net instance per queue (inherited with vhostfd=/vhostfds=, or
    opened), each owned and set up (VHOST_SET_OWNER). vhost=on that cannot be
    had is an error with QEMU's wording, never a silent fallback."""
    if not opts.vhost:
        return []
    option = "vhostfds" if "vhostfds" in opts.given else "vhostfd"
    instances: list[VhostNet] = []
    try:
        if opts.vhostfds:
            for fd in opts.vhostfds:
                instances.append(VhostNet.from_fd(fd, option))
        else:
            for _ in range(opts.queues):
                instances.append(VhostNet.open())
        for v in instances:
            try:
                v.set_owner()
            except VhostNetError as e:
                raise VhostUnavailableError(str(e)) from e
    except BaseException:
        for v in instances:
            v.close()
        raise
    return instances


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

    def __init__(self, queues: list[Tap], downscript: str | None, vhosts: list[VhostNet]) -> None:
        self.queues = queues
        self.downscript = downscript
        self.vhosts = vhosts  # one vhost-net instance per queue with vhost=on

    @property
    def ifname(self) -> str:
        return self.queues[0].name

    @classmethod
    def open(cls, opts: TapOptions) -> TapNetdev:
        vhosts = open_vhost(opts)
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
            for v in vhosts:
                v.close()
            raise
        return cls(queues, opts.downscript, vhosts)

    def close(self) -> None:
        """Run the down script (interface still there), then close every queue."""
        if self.queues and self.downscript:
            _run_quietly(self.downscript, self.queues[0].name)
        for q in self.queues:
            q.close()
        self.queues = []
        for v in self.vhosts:
            v.close()
        self.vhosts = []


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
