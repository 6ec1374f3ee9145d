"""Packed ring beside split ring: the device side's cost per chain, in one run.

The driver-side mock posts the same batch on each ring (128 chains of two
descriptors: 64 bytes readable, 64 writable), the device pops them all and
returns them all in one batch, and the driver reaps them. Only the device's
part (pop_batch + push_used_batch) is timed; the two rings alternate within
each repeat, so drift hits both equally.

    python bench/ring_packed.py [--queue-size 256] [--repeats 5] [--rounds 400]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine, summary  # noqa: E402
from pyvhost.testing import GuestRam, packed_queue_pair, queue_pair  # noqa: E402


def device_rate(ram: GuestRam, make, size: int, rounds: int) -> float:
    """Chains per second the device side handles on one ring kind."""
    driver, device = make(ram, size)
    chains = size // 2
    bufs = [(ram.alloc(64), ram.alloc(64)) for _ in range(chains)]
    spent = 0.0
    for _ in range(rounds):
        for r, w in bufs:
            driver.add(readable=[(r, 64)], writable=[(w, 64)])
        driver.kick()
        start = time.perf_counter()
        batch = device.pop_batch(size)
        device.push_used_batch([(c.head, 0) for c in batch])
        spent += time.perf_counter() - start
        assert len(batch) == chains and len(driver.used()) == chains
    device.close()
    return rounds * chains / spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=400)
    args = ap.parse_args()
    split, packed = [], []
    with GuestRam(1 << 24) as ram:
        for _ in range(args.repeats):
            split.append(device_rate(ram, queue_pair, args.queue_size, args.rounds))
            packed.append(device_rate(ram, packed_queue_pair, args.queue_size, args.rounds))
    print(f"device side per chain, queue size {args.queue_size}, "
          f"{args.queue_size // 2} chains of 2 descriptors per batch")  # fmt: skip
    print(f"machine: {machine()}")
    print(f"  split ring:  {summary(split)} chains")
    print(f"  packed ring: {summary(packed)} chains")
    print(f"  ratio packed/split: {statistics.median(packed) / statistics.median(split):.2f}x")


if __name__ == "__main__":
    main()
