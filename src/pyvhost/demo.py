"""`pyvhost demo`: a Linux guest on pyvhost, pinging and running iperf3, in one command.

It installs nothing: it says what is missing and how to get it. Everything it
starts (pyvhost, QEMU, iperf3, a network namespace, the TAP) is gone when it
ends, also after Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

from pyvhost.errors import PyvhostError
from pyvhost.guest.image import ensure_image, missing_tools
from pyvhost.guest.lab import GUEST_IP, HOST_IP, Lab


class Progress:
    def __init__(self, steps: int, out=sys.stdout) -> None:
        self.steps = steps
        self.step = 0
        self.out = out
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"      {message}", file=self.out, flush=True)

    def next(self, message: str) -> None:
        self.step += 1
        elapsed = time.monotonic() - self.t0
        print(f"[{self.step}/{self.steps}] {message}  ({elapsed:.0f} s)", file=self.out, flush=True)


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise PyvhostError(
            "the demo creates a TAP device and a network namespace: run it as root (sudo)"
        )
    missing = missing_tools()
    if missing:
        pkgs = " ".join(sorted({p for _, p in missing}))
        raise PyvhostError(
            f"missing {', '.join(w for w, _ in missing)}; install with: apt-get install {pkgs}"
        )


def parse_ping(output: str) -> tuple[int, float | None]:
    loss = int(re.search(r"(\d+)% packet loss", output).group(1))
    m = re.search(r"= [\d.]+/([\d.]+)/[\d.]+ ms", output)
    return loss, float(m.group(1)) if m else None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _patience(signum, frame) -> None:
    print("still cleaning up (a second or two)", file=sys.stderr)


def _shut_down(lab, interrupted: bool, old: dict) -> None:
    """Interrupted: end every child at once and return within about a second;
    a second Ctrl-C meanwhile does not cut the cleanup short."""
    try:
        if lab is not None:
            if interrupted:
                for s in old:
                    signal.signal(s, _patience)
                lab.abort()
            else:
                lab.close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(
    accel: str = "tcg", msix: bool | None = None, seconds: int = 5, queues: int = 1, vms: int = 1
) -> int:
    check_prerequisites()
    if vms > 1:
        return run_switch(vms, msix, seconds)
    progress = Progress(6)
    lab = None
    interrupted = False
    # Ctrl-C or a SIGTERM, whatever the caller's signal dispositions: clean up, then stop.
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        progress.next("guest image (kernel + initramfs from Debian's packages, cached)")
        image = ensure_image(progress)
        progress.next("pyvhost net on a TAP; host side 10.0.2.1 in a private namespace")
        lab = Lab(image=image, accel=accel, msix=msix, queues=queues, progress=progress).start()
        lab.iperf_server()
        progress.next(f"booting the guest in QEMU ({accel}); its NIC is served by pyvhost")
        guest = lab.boot()
        progress(f"booted in {guest.boot_seconds:.1f} s; guest {GUEST_IP}")
        progress.next(f"ping {HOST_IP} from the guest (10 packets)")
        _, out = guest.run(f"ping -c 10 -i 0.2 -W 2 {HOST_IP}", timeout=60, check=False)
        loss, rtt = parse_ping(out)
        progress.next(f"iperf3 guest -> host ({seconds} s)")
        to_host = lab.iperf(seconds=seconds)
        progress.next(f"iperf3 host -> guest ({seconds} s)")
        to_guest = lab.iperf(reverse=True, seconds=seconds)
        stats = lab.stats()["queues"]
        lab_msix = lab.msix
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        interrupted = True
        return 130
    finally:
        _shut_down(lab, interrupted, old)
    drops = sum(q["drops"] + q["errors"] for q in stats.values())
    rows = [
        ("boot time", f"{guest.boot_seconds:.1f} s ({accel})"),
        ("interrupts", "MSI-X" if lab_msix else "INTx (vectors=0)"),
        ("ping loss", f"{loss} %"),
        ("ping rtt (avg)", f"{rtt:.2f} ms" if rtt is not None else "-"),
        ("guest -> host", f"{to_host:.2f} Gbit/s"),
        ("host -> guest", f"{to_guest:.2f} Gbit/s"),
        ("pyvhost drops + errors", str(drops)),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print("pyvhost demo: a Linux guest's virtio-net on pyvhost, bridged to a TAP")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    return 0 if loss < 100 else 1


def run_switch(vms: int, msix: bool | None, seconds: int) -> int:
    """`pyvhost demo --vms N`: N guests on one pyvhost switch, and the host behind
    its uplink TAP."""

    from pyvhost.guest.switch_lab import SwitchLab, guest_ip

    progress = Progress(5)
    lab = None
    interrupted = False
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        progress.next("guest image (kernel + initramfs from Debian's packages, cached)")
        image = ensure_image(progress)
        progress.next(f"pyvhost switch: {vms} VM ports and an uplink TAP to 10.0.2.1")
        lab = SwitchLab(vms, image=image, msix=msix, progress=progress).start()
        lab.host_iperf_server()
        progress.next(f"booting {vms} guests in QEMU (tcg), one after the other")
        guests = lab.boot_all()
        progress.next("ping between guests and to the host")
        pings = []
        for i in range(vms):
            target = guest_ip((i + 1) % vms)
            _, out = guests[i].run(f"ping -c 5 -i 0.2 -W 2 {target}", timeout=60, check=False)
            pings.append((f"vm{i} -> vm{(i + 1) % vms}", parse_ping(out)))
        _, out = guests[0].run(f"ping -c 5 -i 0.2 -W 2 {HOST_IP}", timeout=60, check=False)
        pings.append(("vm0 -> host", parse_ping(out)))
        progress.next(f"iperf3 vm0 -> vm1 and vm0 -> host ({seconds} s each)")
        lab.iperf_server(1)
        rates = []
        for name, ip in (("vm0 -> vm1", guest_ip(1)), ("vm0 -> host", HOST_IP)):
            result = guests[0].iperf3(ip, seconds)
            rates.append((name, result["end"]["sum_received"]["bits_per_second"] / 1e9))
        ports = lab.stats()["ports"]
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        interrupted = True
        return 130
    finally:
        _shut_down(lab, interrupted, old)
    drops = sum(sum(p["drops"].values()) for p in ports.values())
    rows = [(f"ping {name}", f"{loss} % loss, {rtt:.2f} ms" if rtt else f"{loss} % loss")
            for name, (loss, rtt) in pings]  # fmt: skip
    rows += [(f"iperf3 {name}", f"{rate:.2f} Gbit/s") for name, rate in rates]
    rows.append(("switch drops", str(drops)))
    width = max(len(k) for k, _ in rows)
    print()
    print(f"pyvhost demo: {vms} Linux guests on pyvhost switch, the host behind its uplink")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    return 0 if all(loss < 100 for _, (loss, _) in pings) else 1
