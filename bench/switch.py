"""pyvhost switch beside a Linux bridge, and what a hook costs. Needs root.

    python bench/switch.py [--repeats 3] [--seconds 5] [--only iperf,pps]

1. Guest to guest: two TCG guests, iperf3 between them, through pyvhost
   switch (vhost-user ports) and through a Linux bridge in a namespace with
   both guests on QEMU's own -netdev tap (vhost=off: this kernel has no
   vhost-net). Guests on core 0, the switch on core 1.
2. 64-byte packet rate from one port to another: testpmd's virtio_user
   (txonly) into pyvhost switch, testpmd's virtio_user (rxonly) out of it;
   with no hook, one and three trivial hooks on the sending port. The
   bridge's row: testpmd's af_packet (txonly) on one TAP of the bridge and
   af_packet (rxonly) on another. Generator and receiver on core 0, the
   switch on core 1; the bridge forwards in the sender's softirq, on core 0.

Anchor and pyvhost alternate within each repeat; medians with min and max.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyvhost.guest.image import ensure_image  # noqa: E402
from pyvhost.guest.lab import PREFIX  # noqa: E402
from pyvhost.guest.qemu import Guest, NicOptions, VmOptions  # noqa: E402
from pyvhost.guest.switch_lab import SwitchLab, guest_ip, guest_mac  # noqa: E402
from pyvhost.testing.dpdk import Hugepages, Testpmd  # noqa: E402
from pyvhost.testing.netns import NetNamespace, ip, link_exists, set_sysctl  # noqa: E402
from pyvhost.testing.processes import PyvhostProcess, wait_for  # noqa: E402
from run import BACKEND_CORE, GUEST_CORE, cpu_seconds, pin, summary  # noqa: E402

HOOK = "examples.passthrough:hook"


def iperf_between(guests, seconds: int) -> float:
    guests[1].run("iperf3 -s -D")
    time.sleep(0.5)
    result = guests[0].iperf3(guest_ip(1), seconds)
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


def iperf_switch(image, seconds: int) -> tuple[float, float]:
    """(Gbit/s, switch CPU share)."""
    with SwitchLab(2, image=image, uplink=False) as lab:
        pin(lab.switch.pid, BACKEND_CORE)
        guests = []
        for i in range(2):
            lab.guests[i] = guests_i = _guest(image, lab.sockets[i], i)
            guests.append(guests_i)
        c0, t0 = cpu_seconds(lab.switch.pid), time.monotonic()
        gbit = iperf_between(guests, seconds)
        return gbit, (cpu_seconds(lab.switch.pid) - c0) / (time.monotonic() - t0)


def _guest(image, socket: str, i: int, extra: list[str] = ()) -> Guest:
    nic = NicOptions(socket, mac=guest_mac(i), msix=False)
    opts = VmOptions(nic, image, ip=f"{guest_ip(i)}/{PREFIX}", taskset=GUEST_CORE,
                     extra_args=list(extra))  # fmt: skip
    g = Guest(opts)
    g.wait_ready()
    return g


def iperf_bridge(image, seconds: int) -> tuple[float, float]:
    """Two guests on QEMU's -netdev tap, both TAPs on a bridge in a namespace."""
    ns = NetNamespace("pyvhost-bench")
    taps = [f"pbt{uuid.uuid4().hex[:6]}" for _ in range(2)]
    guests: list[Guest] = []
    try:
        ns.ip("link", "add", "br0", "type", "bridge")
        ns.ip("link", "set", "br0", "up")
        for i, tap in enumerate(taps):
            netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"
            dev = f"virtio-net-pci,netdev=n0,mac={guest_mac(i)},vectors=0"
            nic = NicOptions("", mem="512M")
            opts = VmOptions(nic, image, ip=f"{guest_ip(i)}/{PREFIX}", taskset=GUEST_CORE,
                             extra_args=["-netdev", netdev, "-device", dev])  # fmt: skip
            g = Guest(opts)
            guests.append(g)
            wait_for(lambda t=tap: link_exists(t), 20, "QEMU's TAP")
            ip("link", "set", "dev", tap, "netns", ns.name)
            ns.ip("link", "set", "dev", tap, "master", "br0")
            ns.ip("link", "set", "dev", tap, "up")
            g.wait_ready()
        return iperf_between(guests, seconds), float("nan")
    finally:
        for g in guests:
            g.stop()
        ns.delete()


def pps_switch(workdir: Path, seconds: int, hooks: int) -> tuple[float, float]:
    """(Mpps delivered to the receiver, switch CPU share)."""
    socks = [str(workdir / f"p{i}-{uuid.uuid4().hex[:6]}.sock") for i in range(2)]
    control = str(workdir / f"ctl-{uuid.uuid4().hex[:6]}")
    args = ["switch", "--control", control]
    for i, s in enumerate(socks):
        args += ["--port", f"p{i}={s}"]
    args += ["--hook", f"p0={HOOK}"] * hooks
    sw = PyvhostProcess(args, control)
    pin(sw.pid, BACKEND_CORE)
    rx = gen = None
    try:
        rx = Testpmd(f"net_virtio_user0,path={socks[1]},queues=1,queue_size=1024",
                     ["--forward-mode=rxonly", "--auto-start", "--rxd=1024"],
                     prefix=f"rx-{uuid.uuid4().hex[:6]}", cores=f"{GUEST_CORE},{BACKEND_CORE}",
                     main_lcore=int(BACKEND_CORE))  # fmt: skip
        rx.wait_started()
        # Broadcast frames: nothing to learn, every one goes to the other port.
        gen = Testpmd(f"net_virtio_user1,path={socks[0]},queues=1,queue_size=1024",
                      ["--forward-mode=txonly", "--txpkts=64", "--auto-start",
                       "--eth-peer=0,ff:ff:ff:ff:ff:ff"],
                      prefix=f"gen-{uuid.uuid4().hex[:6]}", cores=f"{GUEST_CORE},{BACKEND_CORE}",
                      main_lcore=int(BACKEND_CORE))  # fmt: skip
        gen.wait_started()
        c0, t0 = cpu_seconds(sw.pid), time.monotonic()
        time.sleep(seconds)
        gen.stop()
        cpu = (cpu_seconds(sw.pid) - c0) / (time.monotonic() - t0)
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
        got = rx.stop().rx_packets
        return got / elapsed / 1e6, cpu
    finally:
        for t in (gen, rx):
            if t is not None:
                t.kill()
        sw.stop()


def pps_bridge(seconds: int) -> tuple[float, float]:
    """Two veth pairs on a bridge: af_packet sends into one, receives from the other."""
    ns = NetNamespace("pyvhost-bench")
    ends = [(f"pbv{i}{uuid.uuid4().hex[:5]}", f"pbp{i}{uuid.uuid4().hex[:5]}") for i in range(2)]
    rx = gen = None
    try:
        ns.ip("link", "add", "br0", "type", "bridge")
        ns.ip("link", "set", "br0", "up")
        for outer, port in ends:
            ns.ip("link", "add", outer, "type", "veth", "peer", "name", port)
            ns.ip("link", "set", "dev", port, "master", "br0")
            with ns.entered():
                for dev in (outer, port):
                    set_sysctl(f"net/ipv6/conf/{dev}/disable_ipv6", "1")
            for dev in (outer, port):
                ns.ip("link", "set", "dev", dev, "up")
        rx = Testpmd(f"net_af_packet0,iface={ends[1][0]}",
                     ["--forward-mode=rxonly", "--auto-start"],
                     prefix=f"rx-{uuid.uuid4().hex[:6]}", cores=f"{GUEST_CORE},{BACKEND_CORE}",
                     main_lcore=int(BACKEND_CORE), netns=ns.name)  # fmt: skip
        rx.wait_started()
        gen = Testpmd(f"net_af_packet1,iface={ends[0][0]},qdisc_bypass=1",
                      ["--forward-mode=txonly", "--txpkts=64", "--auto-start",
                       "--eth-peer=0,ff:ff:ff:ff:ff:ff"],
                      prefix=f"gen-{uuid.uuid4().hex[:6]}", cores=f"{GUEST_CORE},{BACKEND_CORE}",
                      main_lcore=int(BACKEND_CORE), netns=ns.name)  # fmt: skip
        gen.wait_started()
        t0 = time.monotonic()
        time.sleep(seconds)
        gen.stop()
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
        return rx.stop().rx_packets / elapsed / 1e6, float("nan")
    finally:
        for t in (gen, rx):
            if t is not None:
                t.kill()
        ns.delete()


def fmt(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}, {s['max']:.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--only", default="iperf,pps")
    args = ap.parse_args()
    only = set(args.only.split(","))
    image = ensure_image(print)
    workdir = Path(tempfile.mkdtemp(prefix="pyvhost-swbench-"))
    res: dict[str, dict[str, list[float]]] = {}

    def add(name: str, value: float, cpu: float) -> None:
        d = res.setdefault(name, {"value": [], "cpu": []})
        d["value"].append(value)
        d["cpu"].append(cpu)

    t0 = time.monotonic()
    pages = Hugepages() if "pps" in only else None
    try:
        for r in range(args.repeats):
            if "iperf" in only:
                print(f"  run {r + 1}/{args.repeats}: guest to guest, pyvhost switch", flush=True)
                add("iperf/pyvhost switch", *iperf_switch(image, args.seconds))
                print(f"  run {r + 1}/{args.repeats}: guest to guest, Linux bridge", flush=True)
                add("iperf/linux bridge", *iperf_bridge(image, args.seconds))
            if "pps" in only:
                for hooks in (0, 1, 3):
                    print(f"  run {r + 1}/{args.repeats}: 64 B port to port, {hooks} hooks",
                          flush=True)  # fmt: skip
                    add(f"pps/pyvhost switch, {hooks} hooks", *pps_switch(workdir, args.seconds,
                                                                          hooks))  # fmt: skip
                print(f"  run {r + 1}/{args.repeats}: 64 B port to port, Linux bridge", flush=True)
                add("pps/linux bridge", *pps_bridge(args.seconds))
    finally:
        if pages is not None:
            pages.release()
    print(f"\npyvhost switch beside a Linux bridge ({args.repeats} runs, median (min, max))")
    for name, d in res.items():
        kind, label = name.split("/", 1)
        unit = "Gbit/s" if kind == "iperf" else "Mpps"
        what = "guest to guest iperf3" if kind == "iperf" else "64 B frames port to port"
        cpu = statistics.median(d["cpu"])
        cpu_text = "" if cpu != cpu else f"   switch CPU {cpu:.2f}"
        print(f"  {what:<26} {label:<26} {fmt(summary(d['value']))} {unit}{cpu_text}")
    for kind, anchor in (("iperf", "iperf/linux bridge"), ("pps", "pps/linux bridge")):
        mine = f"{kind}/pyvhost switch" + (", 0 hooks" if kind == "pps" else "")
        if anchor in res and mine in res:
            ratio = statistics.median(res[mine]["value"]) / statistics.median(res[anchor]["value"])
            print(f"  {kind}: pyvhost switch / Linux bridge = {ratio:.2f}")
    if "pps/pyvhost switch, 0 hooks" in res:
        base = statistics.median(res["pps/pyvhost switch, 0 hooks"]["value"])
        for n in (1, 3):
            with_hooks = statistics.median(res[f"pps/pyvhost switch, {n} hooks"]["value"])
            cost_us = (1 / with_hooks - 1 / base) / n  # 1/Mpps is microseconds per frame
            print(f"  {n} hook(s): {with_hooks / base:.2f} of the rate without; "
                  f"{cost_us:.2f} us per hook per frame")  # fmt: skip
    print(f"(took {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
