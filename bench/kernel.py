"""The Python datapath beside the kernel's (vhost=on), in one invocation. Needs root.

    python bench/kernel.py [--repeats 3] [--seconds 5]

This machine's kernel has no vhost-net, so the whole comparison runs inside
a TCG guest whose kernel has it, running this machine's root, Python and
pyvhost (pyvhost.guest.vhost_guest): the script boots that guest and runs
itself there with --inside. Both datapaths run in that same guest, one
after the other within each repeat, so the ratio is the figure to read; the
absolute ones are TCG's.

Measured, each once with the Python datapath and once with vhost=on:
  - packet rate into the TAP, 64 and 1500-byte frames: testpmd's virtio_user
    (txonly) as the guest, frames counted on the TAP;
  - packet rate out of the TAP: testpmd's af_packet (txonly) into the TAP,
    testpmd's virtio_user (rxonly) as the guest, with the generator's offer;
  - 64 KiB TSO frames, front-end -> TAP and TAP -> front-end, the Python
    front-end as the guest;
  - pyvhost's CPU time during each (the kernel datapath runs no Python per
    packet, so its CPU share is the control plane's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATAPATHS = {"python": "", "kernel": ",vhost=on"}


def inside(args) -> dict:
    import run  # bench/run.py: the same measurements the host benchmark makes
    from pyvhost.testing.dpdk import Hugepages

    pages = Hugepages()
    workdir = Path(tempfile.mkdtemp(prefix="pyvhost-kbench-"))
    results: dict = {}

    def add(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    try:
        for r in range(args.repeats):
            for name, netdev in DATAPATHS.items():
                for size in (64, 1500):
                    print(f"  run {r + 1}/{args.repeats}: {name}, {size}-byte frames to the TAP",
                          flush=True)  # fmt: skip
                    mpps, gen, cpu = run.pps_once("pyvhost", size, args.seconds, workdir, netdev)
                    add(f"{name}/tx{size}/mpps", mpps)
                    add(f"{name}/tx{size}/generator_mpps", gen)
                    add(f"{name}/tx{size}/cpu_s_per_gb", cpu)
                    print(f"  run {r + 1}/{args.repeats}: {name}, {size}-byte frames from the TAP",
                          flush=True)  # fmt: skip
                    rx = run.rx_pps_once("pyvhost", size, args.seconds, workdir, netdev)
                    for k, v in rx.items():
                        add(f"{name}/rx{size}/{k}", v)
                print(f"  run {r + 1}/{args.repeats}: {name}, 64 KiB TSO", flush=True)
                one = argparse.Namespace(repeats=1, seconds=args.seconds)
                tso = run.tso_runs(one, workdir, [], netdev)
                for k, v in tso.items():
                    add(f"{name}/tso/{k}", v["median"])
    finally:
        pages.release()
    return {k: run.summary(v) for k, v in results.items()}


def report(results: dict) -> None:
    def med(key: str) -> float:
        return results[key]["median"]

    def line(label: str, metric: str, unit: str, digits: int = 3) -> None:
        py, k = f"python/{metric}", f"kernel/{metric}"
        if py not in results or k not in results:
            return
        ratio = med(k) / med(py) if med(py) else float("nan")
        print(f"  {label:<34} python {med(py):.{digits}f}{unit:<8} kernel {med(k):.{digits}f}"
              f"{unit:<8} kernel/python {ratio:.2f}")  # fmt: skip

    print("\nkernel datapath (vhost=on) beside the Python datapath, in a TCG guest (medians)")
    for size in (64, 1500):
        line(f"into the TAP, {size} B", f"tx{size}/mpps", " Mpps")
        line("  generator's own rate", f"tx{size}/generator_mpps", " Mpps")
        line(f"out of the TAP, {size} B", f"rx{size}/mpps", " Mpps")
        line("  offered at the TAP", f"rx{size}/offered_mpps", " Mpps")
        line("  dropped at the TAP", f"rx{size}/dropped_share", "")
        line("  pyvhost CPU share", f"rx{size}/backend_cpu", "")
    line("64 KiB TSO to the TAP", "tso/to_host_gbits", " Gbit/s", 2)
    line("64 KiB TSO to the front-end", "tso/to_guest_gbits", " Gbit/s", 2)
    line("pyvhost CPU s over both TSO runs", "tso/backend_cpu_seconds", " s", 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", metavar="FILE", help="write the raw figures here")
    args = ap.parse_args()
    if args.inside:
        print("RESULTS " + json.dumps(inside(args)), flush=True)
        return 0

    from pyvhost.guest.vhost_guest import VhostGuest

    t0 = time.monotonic()
    print("booting a TCG guest with vhost-net and this machine's root ...", flush=True)
    guest = VhostGuest().start()
    try:
        _, version = guest.run("uname -r; nproc")
        print(f"guest kernel {version.splitlines()[0]}, {version.splitlines()[-1]} vCPUs",
              flush=True)  # fmt: skip
        status, out = guest.python(
            f"bench/kernel.py --inside --repeats {args.repeats} --seconds {args.seconds}",
            timeout=3600,
            check=False,
            echo=lambda line: line.startswith("RESULTS ") or print(line, flush=True),
        )
    finally:
        guest.stop()
    marker = [line for line in out.splitlines() if line.startswith("RESULTS ")]
    if status != 0 or not marker:
        print(out[-4000:])
        return 1
    results = json.loads(marker[-1].removeprefix("RESULTS "))
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n(took {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
