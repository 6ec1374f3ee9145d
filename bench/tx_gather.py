"""The TX path's Python cost for 64 KiB GSO frames, per frame and per buffer.

A QueuePair drains a ring of 64 KiB frames posted as a Linux guest posts a
TSO frame: one indirect table of 17 buffers (the header with the linear
part, then a 4 KiB page per fragment). The host side writes nothing, so the
figure is pyvhost's own work: popping the chains, building the write's
iovec, returning the used elements. Two ways, in one invocation: the write
given a view of each buffer (os.writev), and given their addresses
(GatherWriter, what a TAP offers), the ratio between them.

    python bench/tx_gather.py [--repeats 5]
"""

from __future__ import annotations

import argparse
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
FRAGMENTS = 16  # 4 KiB pages behind the header and linear part: a 64 KiB frame
LINEAR = 12 + 1514  # the header, then the frame's headers and first bytes


class NullSink:
    """A host side that takes every frame at no cost; with `by_address`, it
    offers a gather writer as a TAP does."""

    has_vnet_hdr = True

    def __init__(self, by_address: bool) -> None:
        self._fd = os.eventfd(0)
        self.by_address = by_address

    def fileno(self) -> int:
        return self._fd

    def has_frames(self) -> bool:
        return False

    def read_iovec(self, buffers: list) -> int:
        raise BlockingIOError

    def write_iovec(self, buffers: list) -> int:
        return 0

    def open_gather_writer(self):
        return _NullGather() if self.by_address else None

    def close(self) -> None:
        os.close(self._fd)


class _NullGather:
    """GatherWriter's contract, writing nothing."""

    def write(self, addresses: list[int], lengths: list[int]) -> int:
        return 0

    def close(self) -> None:
        pass


def per_frame_us(repeats: int, by_address: bool) -> list[float]:
    loop, host = EventLoop(), NullSink(by_address)
    out = []
    with GuestRam(SIZE * (16 * 17 + LINEAR) + FRAGMENTS * 4096 + (4 << 20)) as ram:
        driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
        kick, call = os.eventfd(0), os.eventfd(0)
        config = RingConfig(
            index=1, size=SIZE, desc=driver.desc_addr, avail=driver.avail_addr,
            used=driver.used_addr, base=0, memory=ram.map_again(), kick_fd=kick, call_fd=call,
            indirect=True,
        )  # fmt: skip
        pair = QueuePair(0, host, loop)
        pair.configure(1 << 32 | 1 << 28)  # VERSION_1, INDIRECT_DESC
        pair.start_ring(False, config)
        pair.set_ring_enabled(False, True)
        pages = [(ram.alloc(4096, align=4096), 4096) for _ in range(FRAGMENTS)]
        heads = []
        for _ in range(SIZE):
            linear = (ram.alloc(LINEAR), LINEAR)
            heads.append(driver.add_indirect(ram.alloc(16 * 17), readable=[linear, *pages]))
        driver.publish()
        try:
            for _ in range(repeats):
                spent, frames = 0.0, 0
                while spent < 0.3:
                    t0 = time.perf_counter()
                    while (n := pair._drain_tx(rearm=False)) > 0:
                        frames += n
                    spent += time.perf_counter() - t0
                    driver.used()
                    for h in heads:  # the guest posts the same frames again
                        driver.write_avail_slot(driver.avail_idx, h)
                        driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
                    driver.publish()
                out.append(spent / frames * 1e6)
        finally:
            pair.close()
            host.close()
            for fd in (kick, call):
                os.close(fd)
    loop.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"TX of 64 KiB frames in {FRAGMENTS + 1} buffers (indirect); {machine()}")
    medians = []
    for by_address in (False, True):
        us = per_frame_us(args.repeats, by_address)
        m = statistics.median(us)
        medians.append(m)
        how = "by address" if by_address else "by views  "
        print(f"  {how}: {m:6.1f} us a frame (min {min(us):.1f}, max {max(us):.1f}), "
              f"{m / (FRAGMENTS + 1):.2f} us a buffer")  # fmt: skip
    print(f"  by views / by address = {medians[0] / medians[1]:.2f}x")


if __name__ == "__main__":
    main()
