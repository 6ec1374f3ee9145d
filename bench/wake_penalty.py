"""What an idle core costs the datapath's next event on this machine.

In a guest stream the backend sleeps in epoll between events (a few
thousand a second) and wakes for each. This times one RX event (one 64 KiB
frame into 17 mergeable 4 KiB buffers, as `bench/rx_fill.py` sets it up)
after a gap between events that is either slept (the core goes idle, as in
the stream) or spun (the core stays busy in Python), for the same lengths.
Where sleeping costs more than spinning, the difference is the price of
waking an idle core (caches and TLB that other work, or a halted virtual
CPU's host, took meanwhile): a per-event cost that grows with the size of
the code and data an event touches, which for CPython is large.

    python bench/wake_penalty.py [--events 2000] [--repeats 3]

Pin it to one core (taskset -c 1) for figures that compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine  # noqa: E402
from rx_fill import served_rx  # noqa: E402

GAPS_US = (0, 200, 1000)
WARMUP = 100  # events before timing starts


def event_us(gap_us: int, sleep: bool, events: int) -> float:
    """Median time of one RX event after a gap of `gap_us`, slept or spun."""
    gap = gap_us / 1e6
    times = []
    with served_rx(4096) as (pair, host, repost):
        for i in range(WARMUP + events):
            host.queue(1)
            if gap and sleep:
                time.sleep(gap)
            elif gap:
                end = time.perf_counter() + gap
                while time.perf_counter() < end:
                    pass
            t0 = time.perf_counter()
            pair.process_tap_rx_event()
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
            repost()
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"one RX event (a 64 KiB frame, 17 buffers) after a gap; {machine()}")
    print("  gap       spun (us)              slept (us)             slept / spun")
    for gap in GAPS_US:
        spun, slept = [], []
        for _ in range(args.repeats):  # alternate, so drift hits both alike
            spun.append(event_us(gap, False, args.events))
            slept.append(event_us(gap, True, args.events))
        s, z = statistics.median(spun), statistics.median(slept)
        print(f"  {gap:5d} us  {s:6.1f} ({min(spun):.1f}-{max(spun):.1f})"
              f"    {z:6.1f} ({min(slept):.1f}-{max(slept):.1f})    {z / s:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
