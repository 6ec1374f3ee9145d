"""Guest-address translations per second.

Three access patterns over a map shaped like a real guest's (RAM below the
PCI hole, RAM above 4 GiB, plus smaller hot-plugged DIMMs):
  same-region   consecutive buffers in one region (last-hit cache)
  random        buffers spread over every region (bisect on a cache miss)
  crossing      buffers that straddle two adjacent regions (scatter-gather)

    python bench/translate.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine, rate, summary  # noqa: E402
from pyvhost.memory import GuestAddress, GuestMemory, RegionSpec  # noqa: E402
from pyvhost.testing.memfd import memfd  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
BATCH = 10_000


def guest_map() -> GuestMemory:
    mem = GuestMemory()
    layout = [(0, 3 * GiB), (4 * GiB, 1 * GiB)]  # sparse memfds: nothing is touched
    layout += [(8 * GiB + i * 128 * MiB, 128 * MiB) for i in range(14)]  # DIMMs, adjacent
    for gpa, size in layout:
        mem.add_region(RegionSpec(GuestAddress(gpa), size), memfd(size, "bench-ram"))
    return mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    mem = guest_map()
    rng = random.Random(1)
    regions = mem.regions
    same = [0x100000 + 2048 * i for i in range(BATCH)]
    spread = []
    for _ in range(BATCH):
        r = rng.choice(regions)
        spread.append(r.start + rng.randrange(0, r.size - 2048))
    crossing = [r.end - 700 for r in regions[2:-1]] * (BATCH // 13)

    def bench(addrs: list[int]):
        gather = mem.gather

        def run() -> int:
            out: list = []
            for a in addrs:
                gather(a, 1500, out)
            return len(addrs)

        return run

    print(f"guest-address translations (1500-byte buffers, {len(regions)} regions)")
    print(f"machine: {machine()}")
    results = {}
    for name, addrs in (("same-region", same), ("random", spread), ("crossing", crossing)):
        results[name] = rate(bench(addrs), repeats=args.repeats)
        print(f"  {name:<12} {summary(results[name])} translations")
    print(
        f"  target >= 1,000,000/s: same-region {statistics.median(results['same-region']):,.0f}, "
        f"random {statistics.median(results['random']):,.0f}"
    )
    mem.clear()


if __name__ == "__main__":
    main()
