"""A guest whose kernel has vhost-net, running this machine's own root.

Where the host kernel has no vhost-net (no /dev/vhost-net, no modules), a
TCG guest running Debian's kernel does. It shares the host's root read-only
over virtio-9p, loads vhost, vhost_net, tun and tap, and runs every command
chrooted in that root: the host's Python and pyvhost, with a real
/dev/vhost-net. The kernel datapath's tests and benchmarks run there.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from pyvhost.guest.image import GuestImage, ensure_image
from pyvhost.guest.qemu import Guest, GuestError, NicOptions, VmOptions

MOUNT_TAG = "hostroot"
REPO = Path(__file__).resolve().parents[3]


class VhostGuest(Guest):
    """The host's root in a guest with vhost-net; `run()` runs host commands there."""

    def __init__(
        self,
        image: GuestImage | None = None,
        *,
        mem: str = "2G",
        smp: int = 2,
        log_path: str | None = None,
        taskset: str | None = None,
    ) -> None:
        image = image or ensure_image()
        options = VmOptions(
            NicOptions("", mem=mem),  # no NIC: the tests make TAPs in there
            image,
            smp=smp,
            ip="",
            extra_append=f"pyvhost.modules=vhost pyvhost.hostroot={MOUNT_TAG}",
            taskset=taskset,
            extra_args=[
                # Every instruction TCG can emulate: the host's programs (DPDK's
                # testpmd among them) are built for more than the default qemu64.
                "-cpu",
                "max",
                "-virtfs",
                # multidevs=remap: the host's /proc, /sys, /dev roots share inode numbers
                # across devices; unremapped, the guest mixes up their mount points.
                f"local,path=/,mount_tag={MOUNT_TAG},security_model=none,readonly=on,"
                "multidevs=remap",
            ],
        )
        super().__init__(options, log_path)

    def start(self, timeout: float = 180) -> VhostGuest:
        try:
            self.wait_ready(timeout)
            status, out = self.run("test -c /dev/vhost-net && echo vhost-net", check=False)
            if status != 0:
                raise GuestError(f"the guest has no /dev/vhost-net:\n{self.tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def python(
        self,
        args: str,
        timeout: float = 600,
        check: bool = True,
        echo: Callable[[str], None] | None = None,
    ) -> tuple[int, str]:
        """Run this Python (the same interpreter, venv included) in the guest."""
        return self.run(
            f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} {args}",
            timeout=timeout,
            check=check,
            echo=echo,
        )


def vhost_net_here() -> bool:
    """Does this machine's kernel offer vhost-net?"""
    return os.path.exists("/dev/vhost-net")
