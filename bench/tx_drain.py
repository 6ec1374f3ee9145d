"""The TX datapath's Python cost per frame, and the kernel's floor under it.

A QueuePair drains a ring of 64-byte frames (one descriptor each, the
virtio-net header in front, as DPDK's virtio PMD and Linux post them); only
the drain is timed, not the guest's side. Into a host side whose write costs
nothing, the figure is pyvhost's own work per frame: the ring, the counters,
the loop. Into a real TAP it adds the writev per frame the TAP path cannot
avoid; and the floor is Python doing nothing but those writes, the best any
Python datapath to a TAP can reach on one core. Needs root (for the TAP).

    python bench/tx_drain.py [--repeats 5] [--frames 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine, summary  # noqa: E402
from pyvhost.backends.tap import Tap  # noqa: E402
from pyvhost.backends.uring import SpanWriter  # noqa: E402
from pyvhost.device import RingConfig  # noqa: E402
from pyvhost.devices.net.datapath import QueuePair  # noqa: E402
from pyvhost.eventloop import EventLoop  # noqa: E402
from pyvhost.memory.region import buffer_address  # noqa: E402
from pyvhost.testing import GuestRam  # noqa: E402
from pyvhost.virtq.driver import DriverQueue, ring_footprint  # noqa: E402

SIZE = 256


class NullHost:
    """A host side that takes every frame at no cost (or writes it to /dev/null)."""

    has_vnet_hdr = True

    def __init__(self, fd: int | None = None, writer: SpanWriter | None = None) -> None:
        self.fd = fd
        self.writer = writer
        self._eventfd = os.eventfd(0)

    def open_span_writer(self) -> SpanWriter | None:
        return self.writer

    def fileno(self) -> int:
        return self._eventfd

    def has_frames(self) -> bool:
        return False

    def read_iovec(self, buffers: list) -> int:
        raise BlockingIOError

    def write_iovec(self, buffers: list) -> int:
        if self.fd is None:
            return 0
        return os.writev(self.fd, buffers)

    def write_one(self, buffer) -> int:
        return 0 if self.fd is None else os.write(self.fd, buffer)

    def close(self) -> None:
        os.close(self._eventfd)


def bench(host: NullHost, frame_len: int, repeats: int) -> list[float]:
    loop = EventLoop()
    with GuestRam(1 << 22) as ram:
        base = ram.alloc(ring_footprint(SIZE), align=4096)
        driver = DriverQueue.layout(ram.memory, base, SIZE)
        kick, call = os.eventfd(0), os.eventfd(0)
        config = RingConfig(
            index=1, size=SIZE, desc=driver.desc_addr, avail=driver.avail_addr,
            used=driver.used_addr, base=0, memory=ram.map_again(), kick_fd=kick, call_fd=call,
        )  # fmt: skip
        pair = QueuePair(0, host, loop)
        pair.configure(1 << 32)  # VERSION_1: the 12-byte header
        pair.start_ring(False, config)
        pair.set_ring_enabled(False, True)
        buffers = [ram.alloc(frame_len) for _ in range(SIZE)]
        heads = [driver.add(readable=[(b, frame_len)]) for b in buffers]
        driver.publish()
        posted = [True]  # add() made them available once already

        def run() -> int:
            if not posted[0]:
                # The guest posts the same chains again: rewrite the avail slots.
                for h in heads:
                    driver.write_avail_slot(driver.avail_idx, h)
                    driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
                driver.publish()
            posted[0] = False
            n = 0
            t0 = time.perf_counter()
            while True:
                got = pair._drain_tx(rearm=False)
                n += got
                if got == 0:
                    break
            spent[0] += time.perf_counter() - t0
            driver.used()
            return n

        rates = []
        try:
            for _ in range(repeats):
                spent = [0.0]
                frames = 0
                while spent[0] < 0.3:
                    frames += run()
                rates.append(frames / spent[0])
            return rates
        finally:
            pair.close()
            for fd in (kick, call):
                os.close(fd)


def tap_floor(fd: int, frame_len: int, repeats: int) -> list[float]:
    """Frames per second of os.writev alone, one frame per call."""
    frame = [memoryview(bytes(12) + b"\xff" * 6 + b"\x02" * 6 + bytes(frame_len - 24))]
    writev = os.writev
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            for _ in range(1000):
                writev(fd, frame)
            n += 1000
        rates.append(n / (time.perf_counter() - t0))
    return rates


def uring_floor(fd: int, frame_len: int, repeats: int, batch: int = 64) -> list[float]:
    """Frames per second of io_uring batches alone, `batch` writes per system call."""
    frame = bytearray(bytes(12) + b"\xff" * 6 + b"\x02" * 6 + bytes(frame_len - 24))
    writer = SpanWriter(fd)
    try:
        addrs, lengths = [buffer_address(frame)] * batch, [frame_len] * batch
        rates = []
        for _ in range(repeats):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.3:
                for _ in range(16):
                    writer.write_spans(addrs, lengths)
                n += 16 * batch
            rates.append(n / (time.perf_counter() - t0))
        return rates
    finally:
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=64, help="frame length after the header")
    args = ap.parse_args()
    length = 12 + args.frames
    print(f"TX drain, {SIZE}-entry ring, {args.frames}-byte frames; {machine()}")
    free = bench(NullHost(), length, args.repeats)
    ifname = f"pbt{os.getpid() % 100000}"
    tap = Tap.open(ifname, vnet_hdr=True, multi_queue=False)
    try:
        # Up, with no address and IPv6 off: the kernel takes each frame and drops it.
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
        subprocess.run(["ip", "link", "set", "dev", ifname, "up"], check=True)
        to_tap = bench(NullHost(tap.fd), length, args.repeats)
        writer = SpanWriter(tap.fd)
        try:
            batched = bench(NullHost(tap.fd, writer), length, args.repeats)
        finally:
            writer.close()
        floor = tap_floor(tap.fd, length, args.repeats)
        batched_floor = uring_floor(tap.fd, length, args.repeats)
    finally:
        tap.close()
    for name, rates in (
        ("Python only (no write)", free),
        ("into a TAP (writev)", to_tap),
        ("into a TAP (io_uring)", batched),
        ("floor: writev alone", floor),
        ("floor: io_uring alone", batched_floor),
    ):
        us = 1e6 / statistics.median(rates)
        print(f"  {name:24s} {summary(rates)} frames  ({us:.2f} us/frame)")


if __name__ == "__main__":
    main()
