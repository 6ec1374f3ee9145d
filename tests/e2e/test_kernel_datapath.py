"""vhost=on for real: tests/net/test_kernel_datapath.py, run where vhost-net exists.

This machine's kernel has no vhost-net. A TCG guest running Debian's kernel
does: it shares this machine's root read-only over virtio-9p and runs this
checkout's own Python and pyvhost chrooted in it, with a real /dev/vhost-net
(pyvhost.guest.vhost_guest). The kernel datapath's tests run there, whole.
"""

from __future__ import annotations

import re

from pyvhost.guest.vhost_guest import VhostGuest

INNER = "tests/net/test_kernel_datapath.py"


def test_the_kernel_datapath_suite_passes_in_a_guest_with_vhost_net(guest_image, tmp_path):
    guest = VhostGuest(guest_image, log_path=str(tmp_path / "vhost-guest.log")).start()
    try:
        status, out = guest.python(
            f"-m pytest {INNER} -p no:cacheprovider --color=no -q -rA", timeout=1200, check=False
        )
    finally:
        guest.stop()
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert status == 0, out[-8000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 7, summary
    assert "skipped" not in summary and "failed" not in summary, summary
