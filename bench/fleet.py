"""Many VMs on one host: N `pyvhost net` processes, one per VM NIC, idle. Needs root.

    python bench/fleet.py [--count 20] [--seconds 10] [--connected/--no-connected]

A fleet is one pyvhost per NIC, as QEMU's own back-ends run: each on its own
TAP (all in one network namespace, IPv6 off, so the kernel sends nothing on
the links unprompted), each with a front-end connected (pyvhost's Python
front-end, in this process, standing in for the VMs: rings set up, RX buffers
posted, then nothing sent). After a settling second the fleet is left alone
for --seconds, and each process's own /proc figures are read:

- memory: PSS (smaps_rollup; shared pages split between their users, so the
  sum is the fleet's real footprint) and USS (private pages only);
- idle CPU: utime + stime over the window;
- wakeups: voluntary + involuntary context switches over the window, per
  second (each time the process ran, it was woken);

The anchor, in the same invocation: as many bare CPython processes (the same
interpreter, `signal.pause()`), the floor any Python daemon starts from.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine  # noqa: E402
from pyvhost.frontend.net import NetFrontend  # noqa: E402
from pyvhost.testing.netns import NetNamespace  # noqa: E402
from pyvhost.testing.processes import PyvhostProcess, end_all  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def pss_uss_kib(pid: int) -> tuple[int, int]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)


def observe(pids: list[int], seconds: float) -> dict:
    c0 = {p: cpu_ticks(p) for p in pids}
    s0 = {p: switches(p) for p in pids}
    time.sleep(seconds)
    cpu = sum(cpu_ticks(p) - c0[p] for p in pids) / CLK_TCK
    wakeups = sum(switches(p) - s0[p] for p in pids)
    mem = [pss_uss_kib(p) for p in pids]
    return {
        "pss_mib": sum(m[0] for m in mem) / 1024,
        "uss_mib": sum(m[1] for m in mem) / 1024,
        "cpu_s": cpu,
        "wakeups_per_s": wakeups / seconds,
        "busiest_wakeups_per_s": max(switches(p) - s0[p] for p in pids) / seconds,
    }


def row(name: str, n: int, seconds: float, r: dict) -> str:
    return (
        f"  {name:<22} PSS {r['pss_mib']:7.1f} MiB ({r['pss_mib'] / n:5.2f}/process)  "
        f"USS {r['uss_mib']:7.1f} MiB  CPU {r['cpu_s']:.2f} s in {seconds:.0f} s "
        f"({100 * r['cpu_s'] / seconds:.2f}% of a core)  wakeups {r['wakeups_per_s']:.1f}/s "
        f"(busiest process {r['busiest_wakeups_per_s']:.1f}/s)"
    )


def fleet(n: int, seconds: float, connected: bool) -> dict:
    procs: list[PyvhostProcess] = []
    fronts: list[NetFrontend] = []
    with tempfile.TemporaryDirectory(prefix="pyvhost-fleet-") as d, NetNamespace("fleet") as ns:
        try:
            for i in range(n):
                ifname = f"pvf{uuid.uuid4().hex[:6]}{i:02d}"
                sock = os.path.join(d, f"vm{i}.sock")
                args = ["net", "--socket-path", sock, "--netdev", f"tap,ifname={ifname}"]
                procs.append(PyvhostProcess(args, sock))
                ns.adopt(ifname, ipv6=False)
                if connected:
                    fronts.append(NetFrontend.connect(sock))
                print(f"\r  started {i + 1}/{n}", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            time.sleep(1.0)  # set-up done, collections run
            return observe([p.pid for p in procs], seconds)
        finally:
            for fe in fronts:
                fe.close()
            end_all([p.proc for p in procs], grace=5.0)
            for p in procs:
                p.stop()


def bare_pythons(n: int, seconds: float) -> dict:
    procs = [
        subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"]) for _ in range(n)
    ]
    try:
        time.sleep(1.0)
        return observe([p.pid for p in procs], seconds)
    finally:
        end_all(procs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--connected", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    n = args.count
    fronts = ", a front-end connected to each" if args.connected else ""
    print(f"a fleet of {n} idle pyvhost net processes, each on its own TAP{fronts}; "
          f"{args.seconds:.0f} s")  # fmt: skip
    print(f"machine: {machine()}, kernel {os.uname().release}")
    anchor = bare_pythons(n, args.seconds)
    ours = fleet(n, args.seconds, args.connected)
    print(row(f"{n} x bare CPython", n, args.seconds, anchor))
    print(row(f"{n} x pyvhost net", n, args.seconds, ours))
    own = (ours["pss_mib"] - anchor["pss_mib"]) / n
    print(f"  ratio PSS pyvhost/bare: {ours['pss_mib'] / anchor['pss_mib']:.2f}x; "
          f"pyvhost's own per process: {own:.2f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
