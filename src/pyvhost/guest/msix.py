"""Does this QEMU give a vhost-user virtio-net device MSI-X under TCG?

Debian 12's QEMU 7.2 crashes (SIGSEGV in vhost_net_start) when a vhost-user
virtio-net-pci device has MSI-X vectors and the guest runs under TCG; Debian
13's QEMU 10.0 does not, and MSI-X is then the faster choice (one vector per
queue instead of a shared INTx line). Known versions are decided by a table;
any other is probed once, by booting the demo's guest with MSI-X on a
loopback back-end, and the answer is cached beside the guest image.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from pyvhost.guest.image import GuestImage, cache_dir
from pyvhost.guest.qemu import Guest, GuestError, NicOptions, VmOptions, qemu_version

Version = tuple[int, int, int]

# (first version, first version after) -> MSI-X works under TCG.
KNOWN = (
    ((0, 0, 0), (8, 0, 0), False),  # 7.2 crashes; older ones are not worth trying
    ((10, 0, 0), (999, 0, 0), True),  # 10.0 is known good
)


def known_msix(version: Version) -> bool | None:
    """What the table says of `version`, or None if it does not know."""
    for first, after, works in KNOWN:
        if first <= version < after:
            return works
    return None


def _cache_file(version: Version) -> Path:
    return cache_dir() / f"msix-qemu-{'.'.join(map(str, version))}.json"


def cached_msix(version: Version) -> bool | None:
    """The table's answer, else a probe's cached answer, else None."""
    known = known_msix(version)
    if known is not None:
        return known
    try:
        return bool(json.loads(_cache_file(version).read_text())["msix"])
    except (OSError, ValueError, KeyError):
        return None


def msix_works(image: GuestImage, progress: Callable[[str], None] = lambda m: None) -> bool:
    """Decide MSI-X for the QEMU on PATH: table, cache, or a probe (then cached)."""
    version = qemu_version()
    answer = cached_msix(version)
    if answer is None:
        progress(f"QEMU {'.'.join(map(str, version))}: probing MSI-X under TCG (once)")
        answer = probe(image)
        path = _cache_file(version)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"qemu": list(version), "msix": answer}))
    return answer


def probe(image: GuestImage) -> bool:
    """Boot the guest with MSI-X on a loopback back-end: does its NIC come up?"""
    from pyvhost.testing.processes import PyvhostProcess

    with tempfile.TemporaryDirectory(prefix="pyvhost-msix-") as tmp:
        sock = str(Path(tmp) / "probe.sock")
        backend = PyvhostProcess(["loopback", "--socket", sock], sock)
        try:
            guest = Guest(VmOptions(NicOptions(sock, msix=True), image))
            try:
                guest.wait_ready(timeout=60)
                status, _ = guest.run("ip link show eth0", timeout=30, check=False)
                return status == 0 and guest.proc.poll() is None
            except GuestError:
                return False
            finally:
                guest.stop()
        finally:
            backend.stop()
