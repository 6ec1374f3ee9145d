"""Guest throughput with MSI-X and with INTx, QEMU 7.2 beside QEMU 10.0, in one invocation.

    python bench/msix.py --qemu10-root DIR [--repeats 3] [--seconds 5]

Debian 12's QEMU 7.2 crashes with vhost-user and MSI-X under TCG, so there
only INTx (vectors=0) runs; Debian 13's QEMU 10.0 runs both. DIR is a
Debian 13 tree with qemu-system-x86 installed (e.g. from
`bash scripts/chroot.sh trixie keep DIR`); its QEMU runs chrooted there,
while pyvhost, the guest image and iperf3's server are this machine's, so
only QEMU and its interrupt mode differ between the runs. The three
configurations alternate within each repeat; medians with min and max.
Needs root.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyvhost.guest.image import ensure_image  # noqa: E402
from pyvhost.guest.lab import GUEST_IP, HOST_IP, HOST_MAC, PREFIX  # noqa: E402
from pyvhost.guest.qemu import QEMU, Guest, NicOptions, VmOptions, qemu_version  # noqa: E402
from pyvhost.testing.netns import NetNamespace  # noqa: E402
from pyvhost.testing.processes import PyvhostProcess  # noqa: E402
from run import BACKEND_CORE, GUEST_CORE, pin, summary  # noqa: E402


class Mounts:
    """/dev and /proc of this machine inside the QEMU 10 tree, for its QEMU."""

    def __init__(self, root: str) -> None:
        self.done: list[str] = []
        for d in ("dev", "proc", "sys"):
            target = f"{root}/{d}"
            subprocess.run(["mount", "--rbind", f"/{d}", target], check=True)
            subprocess.run(["mount", "--make-rslave", target], check=True)
            self.done.append(target)

    def close(self) -> None:
        for target in reversed(self.done):
            subprocess.run(["umount", "-R", "-l", target], capture_output=True)


def run_config(name, image, work: Path, root: str | None, version, msix: bool, seconds: int):
    """Boot the guest on pyvhost, iperf3 both ways; (Gbit/s to host, to guest)."""
    netns = NetNamespace("pyvhost-bench")
    ifname = f"pb{uuid.uuid4().hex[:8]}"
    sock = work / f"{uuid.uuid4().hex[:8]}.sock"
    guest_sock = f"/tmp/{work.name}/{sock.name}" if root else str(sock)
    backend = guest = server = None
    try:
        backend = PyvhostProcess(["net", "--socket", str(sock), "--netdev", f"tap,ifname={ifname}"],
                                 str(sock))  # fmt: skip
        pin(backend.pid, BACKEND_CORE)
        netns.adopt(ifname, address=f"{HOST_IP}/{PREFIX}", mac=HOST_MAC)
        server = netns.popen("iperf3", "-s", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
        kernel, initrd = image.kernel, image.initrd
        if root:  # QEMU in the tree sees the image there
            kernel, initrd = (f"/tmp/{work.name}/{p.name}" for p in (image.kernel, image.initrd))
        img = type(image)(Path(kernel), Path(initrd), image.version)
        nic = NicOptions(guest_sock, msix=msix, qemu_version=version)
        opts = VmOptions(nic, img, ip=f"{GUEST_IP}/{PREFIX}", taskset=GUEST_CORE,
                         wrapper=["chroot", root] if root else [])  # fmt: skip
        guest = Guest(opts)
        guest.wait_ready()
        guest.run(f"ping -c 2 -W 2 {HOST_IP}", timeout=30, check=False)
        out = []
        for reverse in (False, True):
            result = guest.iperf3(HOST_IP, seconds, reverse=reverse)
            out.append(result["end"]["sum_received"]["bits_per_second"] / 1e9)
        return tuple(out)
    finally:
        if guest is not None:
            guest.stop()
        if server is not None:
            server.terminate()
            server.wait()
        if backend is not None:
            backend.stop()
        netns.delete()


def fmt(s: dict) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}, {s['max']:.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qemu10-root", required=True, metavar="DIR")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    root = str(Path(args.qemu10_root).resolve())
    image = ensure_image(print)
    host_v = qemu_version()
    mounts = Mounts(root)
    try:
        v10 = qemu_version(QEMU, ("chroot", root))
        work = Path(tempfile.mkdtemp(prefix="pyvhost-msix-", dir=f"{root}/tmp"))
        for p in (image.kernel, image.initrd):
            shutil.copy(p, work / p.name)
        configs = [
            (f"QEMU {'.'.join(map(str, host_v))} INTx", None, host_v, False),
            (f"QEMU {'.'.join(map(str, v10))} INTx", root, v10, False),
            (f"QEMU {'.'.join(map(str, v10))} MSI-X", root, v10, True),
        ]
        res = {name: {"to_host": [], "to_guest": []} for name, *_ in configs}
        t0 = time.monotonic()
        for r in range(args.repeats):
            for name, qroot, version, msix in configs:
                print(f"  run {r + 1}/{args.repeats}: {name}", flush=True)
                up, down = run_config(name, image, work, qroot, version, msix, args.seconds)
                res[name]["to_host"].append(up)
                res[name]["to_guest"].append(down)
        shutil.rmtree(work)
    finally:
        mounts.close()
    print(f"\nguest iperf3 through pyvhost, TCG, {args.repeats} runs each (Gbit/s, median "
          "(min, max)); guest on core 0, pyvhost on core 1")  # fmt: skip
    for name, d in res.items():
        up, down = summary(d["to_host"]), summary(d["to_guest"])
        print(f"  {name:<22} to host {fmt(up)}   to guest {fmt(down)}")
    names = list(res)
    base = statistics.median(res[names[1]]["to_host"])
    print(
        f"  MSI-X / INTx on QEMU 10, to host: "
        f"{statistics.median(res[names[2]]['to_host']) / base:.2f}"
    )
    print(f"(took {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
