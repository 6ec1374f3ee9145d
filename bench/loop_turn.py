"""One turn of the event loop: what the datapath pays per wake-up before its callback.

Every kick, TAP event and timer costs a turn of EventLoop.run_once: the
wait, finding the fd's callbacks, calling them under their owner. This
times turns with one ready fd and an empty callback, beside the floor of a
bare epoll.poll and a dict lookup, and the same turn with a pending timer
(what interrupt moderation leaves armed).

    python bench/loop_turn.py [--turns 200000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine  # noqa: E402
from pyvhost.eventloop import EventLoop  # noqa: E402


def per_turn_us(turn, turns: int) -> float:
    t0 = time.perf_counter()
    for _ in range(turns):
        turn()
    return (time.perf_counter() - t0) / turns * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ready = os.eventfd(1)  # readable until read: every turn finds it ready
    calls = []
    callback = calls.clear

    loop = EventLoop()
    loop.add_reader(ready, callback)
    timed = EventLoop()
    timed.add_reader(ready, callback)
    timed.call_at(time.monotonic_ns() + 3600 * 10**9, callback)  # pending, never due

    floor = select.epoll()
    floor.register(ready, select.EPOLLIN)
    table = {ready: callback}

    def bare() -> None:
        for fd, _ in floor.poll(0.5, 1):
            table[fd]()

    cases = [
        ("epoll.poll + dict (floor)", bare),
        ("EventLoop.run_once", lambda: loop.run_once(0.5)),
        ("  with a timer pending", lambda: timed.run_once(0.5)),
    ]
    print(f"one ready fd, an empty callback: us a turn (median, min, max); {machine()}")
    try:
        for name, turn in cases:
            us = [per_turn_us(turn, args.turns) for _ in range(args.repeats)]
            print(f"  {name:28} {statistics.median(us):5.2f} "
                  f"(min {min(us):.2f}, max {max(us):.2f})")  # fmt: skip
    finally:
        loop.close()
        timed.close()
        floor.close()
        os.close(ready)


if __name__ == "__main__":
    main()
