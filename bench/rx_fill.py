"""The RX path's Python cost for 64 KiB frames, per frame and per chain.

A QueuePair fills a ring of mergeable RX buffers (one descriptor each, as a
Linux guest posts them) with 64 KiB frames from a host side that hands over
a frame without copying it, so the figure is pyvhost's own work: popping the
chains, building the read's iovec, returning the used elements. A Linux
guest's buffers are 4 KiB under a TCP stream (16 chains per frame); the bench
front-end's are 16 KiB (5 chains).

    python bench/rx_fill.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine  # noqa: E402
from pyvhost.device import RingConfig  # noqa: E402
from pyvhost.devices.net.datapath import QueuePair  # noqa: E402
from pyvhost.eventloop import EventLoop  # noqa: E402
from pyvhost.testing import GuestRam  # noqa: E402
from pyvhost.virtq.driver import DriverQueue, ring_footprint  # noqa: E402

SIZE = 256
FRAME = 12 + 65536  # the mergeable header and a 64 KiB GSO frame


class FrameSource:
    """A host side with `left` frames of FRAME bytes queued, read without a copy."""

    has_vnet_hdr = True

    def __init__(self) -> None:
        self._fd = os.eventfd(0)
        self.left = 0

    def fileno(self) -> int:
        return self._fd

    def has_frames(self) -> bool:
        return False

    def queue(self, frames: int) -> None:
        """`frames` more wait: the fd reads readable until they are taken, as a
        TAP's does (the datapath polls it before taking more buffers)."""
        if self.left <= 0 < frames:
            os.eventfd_write(self._fd, 1)
        self.left += frames

    def read_iovec(self, buffers: list) -> int:
        if self.left <= 0:
            raise BlockingIOError
        self.left -= 1
        if self.left == 0:
            os.eventfd_read(self._fd)
        return FRAME

    def write_iovec(self, buffers: list) -> int:
        return 0

    def close(self) -> None:
        os.close(self._fd)


@contextlib.contextmanager
def served_rx(buf: int):
    """A QueuePair serving an RX ring of SIZE mergeable buffers of `buf` bytes
    (one descriptor each) from a FrameSource: (pair, host, repost), where
    repost() hands the used buffers back to the ring as a guest would."""
    loop, host = EventLoop(), FrameSource()
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        with GuestRam(SIZE * buf + (4 << 20)) as ram:
            driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
            config = RingConfig(
                index=0, size=SIZE, desc=driver.desc_addr, avail=driver.avail_addr,
                used=driver.used_addr, base=0, memory=ram.map_again(), kick_fd=kick,
                call_fd=call,
            )  # fmt: skip
            pair = QueuePair(0, host, loop)
            try:
                pair.configure(1 << 32 | 1 << 15)  # VERSION_1, MRG_RXBUF
                pair.start_ring(True, config)
                pair.set_ring_enabled(True, True)
                for _ in range(SIZE):
                    driver.add(writable=[(ram.alloc(buf), buf)])
                driver.publish()

                def repost() -> None:
                    for head, _ in driver.used():
                        driver.write_avail_slot(driver.avail_idx, head)
                        driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
                    driver.publish()

                yield pair, host, repost
            finally:
                pair.close()  # before the guest RAM goes
    finally:
        host.close()
        for fd in (kick, call):
            os.close(fd)
        loop.close()


def per_frame_us(buf: int, repeats: int) -> list[float]:
    chains = -(-FRAME // buf)
    frames_per_fill = SIZE // chains
    out = []
    with served_rx(buf) as (pair, host, repost):
        for _ in range(repeats):
            spent, frames = 0.0, 0
            while spent < 0.3:
                host.queue(frames_per_fill)
                t0 = time.perf_counter()
                while host.left > 0:
                    pair.process_tap_rx_event()
                spent += time.perf_counter() - t0
                frames += frames_per_fill
                repost()
            out.append(spent / frames * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"RX of 64 KiB frames into mergeable buffers; {machine()}")
    for buf in (4096, 16384):
        us = per_frame_us(buf, args.repeats)
        chains = -(-FRAME // buf)
        m = statistics.median(us)
        print(f"  {buf // 1024:2d} KiB buffers ({chains:2d} chains a frame): {m:6.1f} us a frame "
              f"(min {min(us):.1f}, max {max(us):.1f}), {m / chains:.2f} us a chain")  # fmt: skip


if __name__ == "__main__":
    main()
