"""A Linux guest's throughput through pyvhost: split vs packed rings, without and
with a vIOMMU, in one run. Needs root.

    python bench/guest_rings.py [--repeats 2] [--seconds 5]

Four configurations of the same q35 TCG guest on `pyvhost net` (the demo's
lab: a TAP whose host side and iperf3 server live in a namespace):

    split              the default ring
    packed             -device virtio-net-pci,...,packed=on
    split + vIOMMU     intel-iommu (device-iotlb), iommu_platform=on, ats=on,
                       the guest with intel_iommu=on iommu.strict=1
    packed + vIOMMU    both

Each is booted once per repeat, iperf3 runs guest -> host and host -> guest,
and the configurations alternate within each repeat. The anchor is the split
ring without an IOMMU: the other rows print their ratio to it. The IOTLB
counters of the vIOMMU runs are printed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine  # noqa: E402
from pyvhost.guest.image import ensure_image  # noqa: E402
from pyvhost.guest.lab import Lab  # noqa: E402
from pyvhost.guest.qemu import qemu_version  # noqa: E402

IOMMU_ARGS = ["-device", "intel-iommu,intremap=off,device-iotlb=on"]
CONFIGS = {
    "split": ("disable-legacy=on", False),
    "packed": ("disable-legacy=on,packed=on", False),
    "split + vIOMMU": ("disable-legacy=on,iommu_platform=on,ats=on", True),
    "packed + vIOMMU": ("disable-legacy=on,iommu_platform=on,ats=on,packed=on", True),
}


def run(image, name: str, seconds: int) -> tuple[float, float, dict | None]:
    props, iommu = CONFIGS[name]
    qemu_args = ["-machine", "q35", *(IOMMU_ARGS if iommu else [])]
    with Lab(image=image, msix=False, device_properties=props, qemu_args=qemu_args) as lab:
        lab.iperf_server()
        lab.boot(extra_append="intel_iommu=on iommu.strict=1" if iommu else "")
        to_host = lab.iperf(seconds=seconds)
        to_guest = lab.iperf(reverse=True, seconds=seconds)
        return to_host, to_guest, lab.stats().get("iotlb")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    image = ensure_image(lambda m: None)
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in CONFIGS}
    iotlb: dict[str, dict | None] = {}
    for r in range(args.repeats):
        for name in CONFIGS:
            print(f"  repeat {r + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
            to_host, to_guest, counters = run(image, name, args.seconds)
            results[name].append((to_host, to_guest))
            iotlb[name] = counters
    version = ".".join(map(str, qemu_version()))
    print(f"guest iperf3 through pyvhost net, {args.seconds} s each way, "
          f"q35 TCG guest, QEMU {version}, INTx")  # fmt: skip
    print(f"machine: {machine()}")
    base = [statistics.median(x[i] for x in results["split"]) for i in (0, 1)]
    for name, runs in results.items():
        med = [statistics.median(x[i] for x in runs) for i in (0, 1)]
        cells = "  ".join(
            f"{d} {m:5.2f} Gbit/s (min {min(x[i] for x in runs):.2f}, ratio {m / b:.2f})"
            for i, (d, m, b) in enumerate(zip(("to host", "to guest"), med, base, strict=True))
        )
        print(f"  {name:<16} {cells}")
        if iotlb.get(name):
            print(f"  {'':<16} IOTLB of the last run: {iotlb[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
