"""The datapath's cost per frame when few frames come an event: batched or not.

A guest stream's other direction is a trickle: the ACKs come one or two a
TAP event (or a kick), and so do request/response frames. This times one
QueuePair event on a real TAP with 1 to 32 small frames waiting, each way:

- RX: frames sent into the TAP through a packet socket, then one
  process_tap_rx_event() into one-buffer RX chains (a Linux guest's
  mergeable buffers);
- TX: frames posted on the ring, then one kick's drain into the TAP.

with the TAP's batched I/O (io_uring, `--io-uring=auto`) and without it
(`off`: a readv or writev a frame). Only the event is timed. Needs root.

    python bench/trickle.py [--repeats 5] [--events 3000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine  # noqa: E402
from pyvhost.backends.tap import Tap  # noqa: E402
from pyvhost.device import RingConfig  # noqa: E402
from pyvhost.devices.net.datapath import QueuePair  # noqa: E402
from pyvhost.eventloop import EventLoop  # noqa: E402
from pyvhost.testing import GuestRam  # noqa: E402
from pyvhost.virtq.driver import DriverQueue, ring_footprint  # noqa: E402

SIZE = 256
BUF = 4096
FEATURES = 1 << 32 | 1 << 15 | 1 << 29  # VERSION_1, MRG_RXBUF, EVENT_IDX
# A 64-byte broadcast frame, from a locally administered address.
ETHERNET = bytes.fromhex("ffffffffffff020000000001") + b"\x08\x00" + bytes(50)
HDR = 12


@contextlib.contextmanager
def served_pair(tap: Tap, rx: bool, ram_bytes: int):
    """A QueuePair on `tap` serving one ring (RX or TX) of a mock driver's:
    (ram, driver, pair), all closed again on the way out."""
    loop = EventLoop()
    kick, call = os.eventfd(0), os.eventfd(0)
    try:
        with GuestRam(ram_bytes + (4 << 20)) as ram:
            driver = DriverQueue.layout(ram.memory, ram.alloc(ring_footprint(SIZE), 4096), SIZE)
            pair = QueuePair(0, tap, loop)
            pair.configure(FEATURES)
            config = RingConfig(
                index=0 if rx else 1, size=SIZE, desc=driver.desc_addr, avail=driver.avail_addr,
                used=driver.used_addr, base=0, memory=ram.map_again(), kick_fd=kick, call_fd=call,
            )  # fmt: skip
            pair.start_ring(rx, config)
            pair.set_ring_enabled(rx, True)
            try:
                yield ram, driver, pair
            finally:
                pair.close()
    finally:
        os.close(kick)
        os.close(call)
        loop.close()


def rx_event_us(tap: Tap, per: int, events: int, repeats: int) -> tuple[list[float], str]:
    """us per frame of process_tap_rx_event with `per` frames waiting."""
    out = []
    with (
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sender,
        served_pair(tap, True, SIZE * BUF) as (ram, driver, pair),
    ):
        sender.bind((tap.name, 0))
        for _ in range(SIZE):
            driver.add(writable=[(ram.alloc(BUF), BUF)])
        driver.publish()
        for _ in range(repeats):
            spent = 0
            for _ in range(events):
                for _ in range(per):
                    sender.send(ETHERNET)
                t0 = time.perf_counter_ns()
                pair.process_tap_rx_event()
                spent += time.perf_counter_ns() - t0
                for head, _ in driver.used():  # the guest posts them again
                    driver.write_avail_slot(driver.avail_idx, head)
                    driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
                driver.publish()
            if pair.rx_counters.packets < events * per:
                raise SystemExit(f"rx: {pair.rx_counters.packets} of {events * per} frames")
            pair.rx_counters.packets = 0
            out.append(spent / events / per / 1000)
        return out, pair.host_io()["rx"]


def tx_event_us(tap: Tap, per: int, events: int, repeats: int) -> tuple[list[float], str]:
    """us per frame of one kick's drain with `per` frames posted."""
    frame = bytes(HDR) + ETHERNET
    out = []
    with served_pair(tap, False, SIZE * 128) as (ram, driver, pair):
        free = [ram.alloc(128) for _ in range(SIZE)]
        for addr in free:
            ram.memory.write(addr, frame)
        posted: dict[int, int] = {}
        for _ in range(repeats):
            spent = 0
            for _ in range(events):
                for _ in range(per):
                    addr = free.pop()
                    posted[driver.add(readable=[(addr, len(frame))])] = addr
                driver.publish()
                t0 = time.perf_counter_ns()
                pair.process_tx_queue_event()
                spent += time.perf_counter_ns() - t0
                for head, _ in driver.used():
                    free.append(posted.pop(head))
            if posted:
                raise SystemExit(f"tx: {len(posted)} frames not sent")
            out.append(spent / events / per / 1000)
        return out, pair.host_io()["tx"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--events", type=int, default=3000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (a TAP)")
    print(f"small frames, us a frame for one event with N waiting (median, min, max); {machine()}")
    ifname = "pvtr" + uuid.uuid4().hex[:8]
    tap = Tap.open(ifname, vnet_hdr=True, multi_queue=False)
    try:
        subprocess.run(["ip", "link", "set", "dev", ifname, "up"], check=True)
        for name, run in (("RX", rx_event_us), ("TX", tx_event_us)):
            for per in (1, 2, 4, 8, 32):
                line = []
                for mode in ("auto", "off"):
                    tap.io_uring = mode
                    us, io = run(tap, per, max(1, args.events // per), args.repeats)
                    m = statistics.median(us)
                    line.append(f"{io:8} {m:5.2f} (min {min(us):.2f}, max {max(us):.2f})")
                print(f"  {name} {per:2d} a event:  " + "   ".join(line), flush=True)
    finally:
        tap.close()  # not persistent: the interface goes with its last fd


if __name__ == "__main__":
    main()
