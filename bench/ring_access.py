"""Ring access: per-field address translation (2010's ldl_phys) vs persistent views.

Both devices below do the same work on the same ring: read avail.idx, each
avail entry, each descriptor field, translate each buffer, write the used
elements and used.idx. One translates a guest address for every field it
touches, as QEMU's virtio did through ldl_phys/stl_phys before it mapped its
rings; the other is pyvhost's SplitQueue, which reads through views of the
rings mapped once for the queue's life.

    python bench/ring_access.py [--queue-size 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine, rate, summary  # noqa: E402
from pyvhost.memory import GuestMemory  # noqa: E402
from pyvhost.testing import GuestRam, queue_pair  # noqa: E402
from pyvhost.virtq import SplitQueue  # noqa: E402
from pyvhost.virtq.layout import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class PhysAccess:
    """ldl_phys and friends: find the region, bounds-check, access. Every time."""

    def __init__(self, memory: GuestMemory) -> None:
        self.find = memory.find_region

    def _load(self, s: struct.Struct, addr: int) -> int:
        r = self.find(addr)
        off = addr - r.start
        if off + s.size > r.end - r.start:
            raise ValueError("access crosses a region")
        return s.unpack_from(r.view, off)[0]

    def _store(self, s: struct.Struct, addr: int, value: int) -> None:
        r = self.find(addr)
        off = addr - r.start
        if off + s.size > r.end - r.start:
            raise ValueError("access crosses a region")
        s.pack_into(r.view, off, value)

    def lduw(self, a: int) -> int:
        return self._load(_U16, a)

    def ldl(self, a: int) -> int:
        return self._load(_U32, a)

    def ldq(self, a: int) -> int:
        return self._load(_U64, a)

    def stw(self, a: int, v: int) -> None:
        self._store(_U16, a, v)

    def stl(self, a: int, v: int) -> None:
        self._store(_U32, a, v)


class TranslatingDevice:
    """A split-ring device that reads every field through PhysAccess."""

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int) -> None:
        self.memory = memory
        self.phys = PhysAccess(memory)
        self.size, self.desc, self.avail, self.used = size, desc, avail, used
        self.next_avail = 0
        self.next_used = 0

    def process_all(self) -> int:
        p, mem, size = self.phys, self.memory, self.size
        done = 0
        avail_idx = p.lduw(self.avail + 2)
        while self.next_avail != avail_idx:
            head = p.lduw(self.avail + 4 + 2 * (self.next_avail % size))
            self.next_avail = (self.next_avail + 1) & 0xFFFF
            readable, writable, idx = [], [], head
            while True:
                d = self.desc + 16 * idx
                addr, length = p.ldq(d), p.ldl(d + 8)
                flags, nxt = p.lduw(d + 12), p.lduw(d + 14)
                mem.gather(addr, length, writable if flags & VIRTQ_DESC_F_WRITE else readable)
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                idx = nxt
            slot = self.used + 4 + 8 * (self.next_used % size)
            p.stl(slot, head)
            p.stl(slot + 4, 0)
            self.next_used = (self.next_used + 1) & 0xFFFF
            p.stw(self.used + 2, self.next_used)
            done += 1
        return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queue-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    size = args.queue_size
    chains = size // 2  # two descriptors each: 64 B readable, 64 B writable

    with GuestRam(1 << 22) as ram:
        driver, first = queue_pair(ram, size)
        first.close()  # this bench builds its own device queues below
        backend = ram.map_again()
        heads = [
            driver.add(readable=[(ram.alloc(64), 64)], writable=[(ram.alloc(64), 64)])
            for _ in range(chains)
        ]
        translating = TranslatingDevice(
            ram.map_again(), size, driver.desc_addr, driver.avail_addr, driver.used_addr
        )

        def repost() -> None:
            # The guest makes the same chains available again: rewrite the avail slots.
            for h in heads:
                driver.write_avail_slot(driver.avail_idx, h)
                driver.avail_idx = (driver.avail_idx + 1) & 0xFFFF
            driver.publish()

        device: SplitQueue

        def run_views() -> int:
            repost()
            batch = device.pop_batch(size)
            device.push_used_batch([(c.head, 0) for c in batch])
            return len(batch)

        def run_translated() -> int:
            repost()
            return translating.process_all()

        r_views, r_trans = [], []
        for _ in range(args.repeats):  # alternate, so drift hits both equally
            # Both devices take the ring over where the other left it.
            translating.next_avail = translating.next_used = driver.avail_idx
            r_trans += rate(run_translated, repeats=1)
            device = SplitQueue(
                backend,
                size,
                driver.desc_addr,
                driver.avail_addr,
                driver.used_addr,
                next_avail=driver.avail_idx,
            )
            r_views += rate(run_views, repeats=1)
            device.close()

    print(f"ring access, queue size {size}, {chains} chains of 2 descriptors per batch")
    print(f"machine: {machine()}")
    print(f"  per-field translation (ldl_phys style): {summary(r_trans)} chains")
    print(f"  persistent ring views (SplitQueue):     {summary(r_views)} chains")
    ratio = statistics.median(r_views) / statistics.median(r_trans)
    print(f"  ratio views/translated: {ratio:.2f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
