"""A libvirt domain whose NIC is pyvhost: the README's "Running under libvirt".

Real libvirtd (Debian's, in the foreground, session mode as `nobody` so it
keeps its state in a directory of its own), real QEMU under it, the test
guest's kernel and initramfs booted directly. The domain XML is what
`pyvhost libvirt-xml` prints.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pyvhost.guest.lab import GUEST_IP, HOST_IP, HOST_MAC, PREFIX
from pyvhost.stats import fetch
from pyvhost.testing.libvirt import SerialConsole, SessionLibvirt
from pyvhost.testing.netns import NetNamespace, link_exists
from pyvhost.testing.processes import PyvhostProcess, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("libvirtd") is None, reason="libvirt not installed (scripts/test.sh does)"
    ),
]

BIN = Path(sys.executable).parent


@pytest.fixture
def libvirt():
    with SessionLibvirt() as lv:
        yield lv


def test_a_libvirt_domain_pings_through_pyvhost_and_comes_back_after_destroy_and_start(
    libvirt, guest_image, tmp_path
):
    sock = libvirt.path("vm1.sock")  # QEMU listens (mode='server'); pyvhost connects
    ifname = f"pv{uuid.uuid4().hex[:8]}"
    with NetNamespace("pyvhost-libvirt") as ns:
        pyvhost = PyvhostProcess(
            [
                "net",
                "--socket-path",
                sock,
                "--client",
                "--netdev",
                f"tap,ifname={ifname}",
                "--stats-socket",
                libvirt.path("vm1.stats"),
                "--log-level",
                "info",
            ],  # fmt: skip
            stderr_path=str(tmp_path / "pyvhost.log"),  # its log, kept for a failure's message
        )
        try:
            wait_for(lambda: link_exists(ifname), 10, "pyvhost's TAP")
            ns.adopt(ifname, address=f"{HOST_IP}/{PREFIX}", mac=HOST_MAC)
            xml = subprocess.run(
                [str(BIN / "pyvhost"), "libvirt-xml", "--socket", sock, "--client",
                 "--domain", "pyvhost-e2e", "--memory", "256",
                 "--kernel", libvirt.give(str(guest_image.kernel)),
                 "--initrd", libvirt.give(str(guest_image.initrd)),
                 "--cmdline", f"console=ttyS0 quiet panic=-1 pyvhost.ip={GUEST_IP}/{PREFIX}",
                 "--console", libvirt.path("console.sock")],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert '<source type="memfd"' in xml and '<access mode="shared"' in xml
            libvirt.define(xml, "pyvhost-e2e")

            for boot in (1, 2):
                libvirt.virsh("start", "pyvhost-e2e")
                console = SerialConsole(libvirt.path("console.sock"))
                try:
                    console.wait_ready()
                    status, out = console.run(f"ping -c 3 -W 2 {HOST_IP}", timeout=30)
                    assert status == 0, f"boot {boot}: {out}\n{libvirt.qemu_log('pyvhost-e2e')}"
                    assert " 0% packet loss" in out
                finally:
                    console.close()
                # One session per boot that negotiated. A destroyed QEMU closes
                # its vhost-user connection before its listening socket, so a
                # retry may reach the dying QEMU once and be closed unused: a
                # session, but not one that negotiated features.
                log = (tmp_path / "pyvhost.log").read_text()
                sessions = fetch(libvirt.path("vm1.stats"))["sessions"]
                assert sessions >= boot and log.count("features acked") == boot, log
                libvirt.virsh("destroy", "pyvhost-e2e")
                # pyvhost stays, its TAP too, waiting for the domain to come back.
                wait_for(lambda: pyvhost.proc.poll() is None and link_exists(ifname, ns.name))
        finally:
            status, out, err = pyvhost.stop()
        assert status == 0, err
        assert not link_exists(ifname, ns.name)
