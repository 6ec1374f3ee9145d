"""The device side of a split virtqueue.

A processing loop, as a device runs it:

    queue.disable_notification()
    while True:
        while (chain := queue.pop()) is not None:
            written = handle(chain.readable, chain.writable)   # zero-copy views
            queue.push_used(chain.head, written)
        if not queue.enable_notification():   # nothing slipped in meanwhile
            break
    if queue.needs_notification():
        signal_the_driver()

Everything the ring says is the guest's word, and the guest may be hostile.
Any structural lie (a loop, an index past the table, a nested or mis-sized
indirect table, a readable buffer after a writable one, an avail.idx running
ahead, a buffer outside guest memory) marks this queue broken: `broken` holds
the specific QueueError, it is logged, and pop() returns None from then on.
Nothing is raised to the caller and no other queue is affected.

The rings are read and written through views kept for the queue's life
(pinned in guest memory), not by translating an address per field; when the
memory map changes under a ring, a listener re-resolves the views.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable
from operator import add, itemgetter

from pyvhost.errors import (
    AvailIndexError,
    ChainLengthError,
    ChainTooLongError,
    DescriptorIndexError,
    DescriptorMemoryError,
    DescriptorOrderError,
    GuestMemoryError,
    IndirectDescriptorError,
    IotlbMiss,
    QueueConfigError,
    QueueError,
)
from pyvhost.memory import GuestMemory, Pin
from pyvhost.virtq.layout import (
    AVAIL_ALIGN,
    DESC,
    DESC_ALIGN,
    MAX_CHAIN_BYTES,
    MAX_INDIRECT_ENTRIES,
    RING_ENTRIES,
    RING_FLAGS,
    RING_IDX,
    USED_ALIGN,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    full_fence,
    is_valid_queue_size,
    need_event,
    u16_view,
    used_event_offset,
    used_ring_size,
)
from pyvhost.virtq.mapping import RingMapping, check_alignment

log = logging.getLogger(__name__)

_unpack_desc = DESC.unpack_from
_pack_used = USED_ELEM.pack_into
# Up to this many used elements at once are packed one by one (0.25 us each
# here); more go in as strided stores, whose fixed cost (two arrays, two
# slice assignments, about 3 us) is that of some ten packs.
_FEW_USED = 8

# Ring fields as indices into the rings' u16 views (see layout.u16_view).
_FLAGS = RING_FLAGS // 2
_IDX = RING_IDX // 2
_ENTRIES = RING_ENTRIES // 2


class DescriptorChain:
    """One available chain: device-readable then device-writable guest buffers."""

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_len}B"
            f"/{len(self.readable)}, writable={self.writable_len}B/{len(self.writable)})"
        )


class SplitQueue(RingMapping):
    """Device side of one split virtqueue in guest memory (or behind an IOMMU)."""

    packed = False

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        next_avail: int = 0,
        name: str = "vq",
        log_used: int | None = None,
    ) -> None:
        """`log_used`: while the memory's dirty log is on, used-ring writes are
        logged as if the used ring were at this guest address (SET_VRING_ADDR's
        log_guest_addr); None: at the used ring's own address."""
        if not is_valid_queue_size(size):
            raise QueueConfigError(f"{name}: queue size {size} is not a power of two <= 32768")
        check_alignment(name, (
            ("descriptor table", desc_addr, DESC_ALIGN),
            ("avail ring", avail_addr, AVAIL_ALIGN),
            ("used ring", used_addr, USED_ALIGN),
        ))  # fmt: skip
        self.name = name
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.broken: QueueError | None = None
        self.on_broken: Callable[[QueueError], None] | None = None  # see RingMapping
        self._memory = memory
        # Host addresses for pop_spans(): a GuestMemory has them, a vIOMMU's
        # address space (IOVAs) does not.
        self._host_window = getattr(memory, "host_window", None)
        # ... and regions whose views pop_views() cuts buffers from.
        self._region_of = getattr(memory, "find_region", None)
        self._mask = size - 1
        self._pins: list[Pin] = []
        self._desc: memoryview | None = None
        self._desc64 = self._desc32 = self._desc16 = self._used32 = None  # see _map_rings
        self._avail: memoryview | None = None  # u16 view of the avail ring
        self._used: memoryview | None = None  # the used ring, bytes
        self._used16: memoryview | None = None  # ... and as u16
        self._used_event = used_event_offset(size) // 2  # in the avail u16 view
        self._avail_event = avail_event_offset(size) // 2  # in the used u16 view
        self._next_avail = next_avail & 0xFFFF
        self._shadow_avail = self._next_avail  # avail.idx as last read
        self._next_used: int | None = None  # read from the used ring once it is mapped
        self._map_rings()  # raises QueueConfigError if a ring is not in guest memory
        self._signalled_used: int | None = None  # used idx at the last notify decision
        self._kicks_wanted = True  # until disable_notification(): keep avail_event current
        self.log_used = used_addr if log_used is None else log_used
        # While logging: what each chain in flight may write (guest ranges), by head.
        self._writable_ranges: dict[int, list[tuple[int, int]]] = {}
        memory.add_listener(self)

    # --- state the vhost-user layer reads and sets ------------------------------

    @property
    def next_avail(self) -> int:
        """Index of the next avail entry to consume (GET_VRING_BASE reports it)."""
        return self._next_avail

    @property
    def next_used(self) -> int:
        return self._next_used

    @property
    def vring_base(self) -> int:
        """Where to go on from: GET_VRING_BASE's value (the next avail index)."""
        return self._next_avail

    @property
    def ready(self) -> bool:
        """Rings mapped and not broken: pop() can make progress."""
        return self.broken is None and self._avail is not None

    def close(self) -> None:
        """Stop using guest memory: drop the ring views and the listener."""
        self._unmap_rings()
        try:
            self._memory.remove_listener(self)
        except ValueError:
            pass

    # --- consuming available chains ------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None (empty, broken, or rings unmapped)."""
        avail = self._avail
        if avail is None or self.broken is not None or self.stalled is not None:
            return None
        na = self._next_avail
        if na == self._shadow_avail:
            # avail.idx is read once per batch: only when the last read is used up.
            idx = avail[_IDX]
            ahead = (idx - na) & 0xFFFF
            if ahead > self.size:
                return self._break_ahead(idx, na, ahead)
            if ahead == 0:
                if not (self._kicks_wanted and self.event_idx and self._rearm(na)):
                    return None
                idx = avail[_IDX]
                ahead = (idx - na) & 0xFFFF
                if ahead > self.size:
                    return self._break_ahead(idx, na, ahead)
            self._shadow_avail = idx
        head = avail[_ENTRIES + (na & self._mask)]
        self._next_avail = (na + 1) & 0xFFFF
        try:
            return self._walk(head)
        except IotlbMiss as e:
            self._next_avail = na  # taken again once the translation arrives
            self._stall(e)
        except QueueError as e:
            self._break(e)
        except GuestMemoryError as e:
            self._break(DescriptorMemoryError(f"chain at head {head}: {e}"))
        return None

    def _rearm(self, na: int) -> bool:
        """Empty ring, kicks wanted: ask for a kick at the next entry (as QEMU's
        virtqueue_pop does), then look again. True if entries arrived meanwhile."""
        self._set_used_field(self._avail_event, na)
        full_fence()
        return self._avail[_IDX] != na

    def _break_ahead(self, idx: int, na: int, ahead: int) -> None:
        self._break(
            AvailIndexError(
                f"avail.idx {idx} is {ahead} entries ahead of the device's {na}, "
                f"more than the queue size {self.size}"
            )
        )

    def unpop(self) -> None:
        """Give back the last popped chain (not yet pushed): the next pop returns it again.

        For devices that find they cannot finish a chain now (no room on the
        other side) and must not hold it across a GET_VRING_BASE.
        """
        self._next_avail = (self._next_avail - 1) & 0xFFFF
        dirty = self._memory.log
        if dirty is not None and self._avail is not None:
            # The device may have written into it already (RX reads the TAP
            # straight into the buffers): while logging, that write is logged
            # too, whole, though the guest never sees it.
            head = self._avail[_ENTRIES + (self._next_avail & self._mask)]
            for addr, length in self._writable_ranges.pop(head, ()):
                dirty.mark(addr, length)

    def pop_batch(self, limit: int) -> list[DescriptorChain]:
        """Up to `limit` available chains, taken in one pass.

        What pop() does per chain, done once per batch: avail.idx is read
        once and the heads come from one slice of the avail ring. A chain of
        one descriptor (what a virtio-net driver posts for a small frame, and
        for each RX buffer) is built without walking; anything else is walked
        in full, so
        every check of pop() still applies. A chain that breaks or stalls the
        queue ends the batch: the ones before it are returned.
        """
        avail = self._avail
        if avail is None or self.broken is not None or self.stalled is not None:
            return []
        na = self._next_avail
        idx = avail[_IDX]
        ahead = (idx - na) & 0xFFFF
        if ahead > self.size:
            self._break_ahead(idx, na, ahead)
            return []
        if ahead == 0:
            chain = self.pop()  # empty: pop() re-arms kicks and looks once more
            return [] if chain is None else [chain]
        self._shadow_avail = idx
        n = ahead if ahead < limit else limit
        size = self.size
        heads = self._avail_heads(na, n)
        out: list[DescriptorChain] = []
        append = out.append
        table = self._desc
        gather = self._memory.gather
        simple = self._memory.log is None  # while logging, _walk records the ranges
        walk = self._walk
        for head in heads:
            try:
                if simple and head < size:
                    addr, length, flags, _ = _unpack_desc(table, head << 4)
                    if length and not flags & ~VIRTQ_DESC_F_WRITE:
                        views: list[memoryview] = []
                        if flags:  # one device-writable buffer: an RX buffer
                            gather(addr, length, views, True)
                            append(DescriptorChain(head, [], views, 0, length))
                        else:  # one device-readable buffer: a TX frame
                            gather(addr, length, views, False)
                            append(DescriptorChain(head, views, [], length, 0))
                        continue
                append(walk(head))
            except IotlbMiss as e:
                self._stall(e)  # this chain is taken again once the translation arrives
                break
            except QueueError as e:
                broken: QueueError = e
            except GuestMemoryError as e:
                broken = DescriptorMemoryError(f"chain at head {head}: {e}")
            else:
                continue
            # As in pop(): a chain that breaks the queue counts as taken.
            self._next_avail = (na + len(out) + 1) & 0xFFFF
            self._break(broken)
            return out
        self._next_avail = (na + len(out)) & 0xFFFF
        return out

    @property
    def memory(self):
        """The memory the rings and buffers are in (a GuestMemory, or a vIOMMU's
        address space)."""
        return self._memory

    def pop_spans(
        self, limit: int, writable: bool = False, at_least: int = 1
    ) -> tuple[list[int], list[int], list[int]]:
        """Up to `limit` available chains that are each one device-readable
        descriptor inside one memory region, as heads, host addresses and
        lengths: what a batched write (io_uring) takes, with no views built.
        With `writable`, one device-writable descriptor each, in a writable
        region (RX buffers, for a batched read); none while the dirty log is
        on, since pop_batch then records what each chain may write.

        Stops before the first chain that is anything else (a chain of several
        descriptors, an indirect table, a buffer across regions, a bad index),
        which pop_batch() then takes with every check of pop(). Empty when the
        ring is, when the memory cannot give host addresses (a vIOMMU's IOVAs),
        or when the queue is broken or stalled. The addresses are good until the
        memory map next changes: write them before returning to the loop.
        Empty too while fewer than `at_least` chains are posted: a caller whose
        batch only pays from some size on takes fewer one by one.
        """
        avail = self._avail
        window = self._host_window
        if avail is None or window is None or self.broken is not None or self.stalled is not None:
            return [], [], []
        if writable and self._memory.log is not None:
            return [], [], []
        want_flags = VIRTQ_DESC_F_WRITE if writable else 0
        na = self._next_avail
        idx = avail[_IDX]
        ahead = (idx - na) & 0xFFFF
        if ahead < at_least or ahead > self.size or limit <= 0:
            return [], [], []  # pop_batch() takes them, re-arms kicks, or breaks the queue
        self._shadow_avail = idx
        n = ahead if ahead < limit else limit
        size = self.size
        heads = self._avail_heads(na, n)
        head = heads[0]
        if head >= size or self._desc16[(head << 3) + 6] != want_flags:
            return [], [], []  # the next chain is not a span: pop_batch takes it
        # The whole batch at once (C loops over the table), when every head is
        # in the table, every descriptor is one readable buffer, and all of them
        # sit in the region of the first: what a driver posting small frames gives.
        if max(heads) < size:
            addrs_t, lengths_t, flags_t = self._fields_of(heads)
            if flags_t.count(want_flags) == n and 0 not in lengths_t:
                try:
                    lo, hi, delta = window(addrs_t[0], writable)
                except GuestMemoryError:
                    lo = hi = 0
                if lo <= min(addrs_t) and max(map(add, addrs_t, lengths_t)) <= hi:
                    self._next_avail = (na + n) & 0xFFFF
                    return heads, list(map(delta.__add__, addrs_t)), list(lengths_t)
        # Otherwise one descriptor at a time, up to the first that is not a span.
        table = self._desc
        addrs: list[int] = []
        lengths: list[int] = []
        lo = hi = delta = 0
        taken = 0
        for head in heads:
            if head >= size:
                break
            addr, length, flags, _ = _unpack_desc(table, head << 4)
            if flags != want_flags or not length:
                break
            if not (lo <= addr and addr + length <= hi):
                try:
                    lo, hi, delta = window(addr, writable)
                except GuestMemoryError:
                    break  # pop_batch() says what is wrong with it
                if addr + length > hi:
                    break
            addrs.append(addr + delta)
            lengths.append(length)
            taken += 1
        if taken < n:
            heads = heads[:taken]
        self._next_avail = (na + taken) & 0xFFFF
        return heads, addrs, lengths

    def pop_views(self, limit: int) -> tuple[list[int], list[memoryview], list[int]]:
        """Up to `limit` available chains that are each one device-writable
        descriptor, all in one writable memory region (a Linux driver's
        mergeable RX buffers), as heads, views of the buffers and their
        lengths: what one readv across several buffers takes (a large frame
        merged over them), with no DescriptorChain built. All or nothing:
        empty when the next `limit` (or fewer, as posted) are not all such,
        and then pop_batch() takes them with every check of pop(). Empty too
        while the dirty log is on, or for memory without regions of its own
        (a vIOMMU's IOVAs), or when the ring is empty, broken or stalled."""
        avail = self._avail
        region_of = self._region_of
        if (avail is None or region_of is None or self.broken is not None
                or self.stalled is not None or self._memory.log is not None):  # fmt: skip
            return [], [], []
        na = self._next_avail
        idx = avail[_IDX]
        ahead = (idx - na) & 0xFFFF
        if ahead == 0 or ahead > self.size or limit <= 0:
            return [], [], []  # pop_batch() re-arms kicks, or breaks the queue
        n = ahead if ahead < limit else limit
        heads = self._avail_heads(na, n)
        if max(heads) >= self.size:
            return [], [], []
        addrs, lengths, flags = self._fields_of(heads)
        if flags.count(VIRTQ_DESC_F_WRITE) != n or 0 in lengths:
            return [], [], []
        try:
            r = region_of(addrs[0])
        except GuestMemoryError:
            return [], [], []
        start = r.start
        if r.readonly or min(addrs) < start or max(map(add, addrs, lengths)) > r.end:
            return [], [], []
        view = r.view
        self._shadow_avail = idx
        self._next_avail = (na + n) & 0xFFFF
        return (
            heads,
            [view[a - start : a - start + k] for a, k in zip(addrs, lengths, strict=True)],
            list(lengths),
        )

    def _fields_of(self, heads: list[int]) -> tuple[tuple | list, tuple | list, tuple | list]:
        """The addresses, lengths and flags of the descriptors `heads` name (all
        inside the table), read in C loops: strided slices when the heads run
        in table order (a driver recycling descriptors in order; a lone head
        always does), else one itemgetter per field."""
        n = len(heads)
        head = heads[0]
        last = head + n
        if last <= self.size and heads == list(range(head, last)):
            return (
                self._desc64[head << 1 : last << 1 : 2].tolist(),
                self._desc32[(head << 2) + 2 : last << 2 : 4].tolist(),
                self._desc16[(head << 3) + 6 : last << 3 : 8].tolist(),
            )
        return (
            itemgetter(*[h << 1 for h in heads])(self._desc64),
            itemgetter(*[(h << 2) + 2 for h in heads])(self._desc32),
            itemgetter(*[(h << 3) + 6 for h in heads])(self._desc16),
        )

    def _avail_heads(self, na: int, n: int) -> list[int]:
        """The n heads in the avail ring from index `na` on, in one or two slices
        (two when they wrap around the ring's end)."""
        avail = self._avail
        first = na & self._mask
        end = first + n
        if end <= self.size:
            return avail[_ENTRIES + first : _ENTRIES + end].tolist()
        return (
            avail[_ENTRIES + first : _ENTRIES + self.size].tolist()
            + avail[_ENTRIES : _ENTRIES + end - self.size].tolist()
        )

    def _walk(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise DescriptorIndexError(f"avail ring names head {head}, past a table of {size}")
        gather = self._memory.gather
        logging_ = self._memory.log is not None
        ranges: list[tuple[int, int]] = []
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        table = self._desc
        limit = size
        idx = head
        count = 0
        in_indirect = False
        while True:
            count += 1
            if count > limit:
                raise ChainTooLongError(
                    f"chain at head {head} has more than {limit} descriptors (a loop?)"
                )
            addr, length, flags, nxt = _unpack_desc(table, idx << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                table, limit = self._indirect_table(head, in_indirect, addr, length, flags)
                in_indirect = True
                idx = 0
                count = 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                gather(addr, length, writable, True)
                wlen += length
                if logging_:
                    ranges.append((addr, length))
            else:
                if writable:
                    raise DescriptorOrderError(
                        f"chain at head {head}: descriptor {idx} is device-readable "
                        "after a device-writable one"
                    )
                gather(addr, length, readable, False)
                rlen += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= limit:
                raise DescriptorIndexError(
                    f"chain at head {head}: next index {nxt} is past a table of {limit}"
                )
            idx = nxt
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise ChainLengthError(f"chain at head {head} spans {rlen + wlen} bytes")
        if logging_:
            self._writable_ranges[head] = ranges
        return DescriptorChain(head, readable, writable, rlen, wlen)

    def _indirect_table(
        self, head: int, in_indirect: bool, addr: int, length: int, flags: int
    ) -> tuple[memoryview | bytes, int]:
        if not self.indirect:
            raise IndirectDescriptorError(
                f"chain at head {head} uses an indirect table, but INDIRECT_DESC was not negotiated"
            )
        if in_indirect:
            raise IndirectDescriptorError(f"chain at head {head} nests an indirect table")
        if flags & VIRTQ_DESC_F_NEXT:
            raise IndirectDescriptorError(
                f"chain at head {head}: an indirect descriptor also has NEXT set"
            )
        if length == 0 or length % 16:
            raise IndirectDescriptorError(
                f"chain at head {head}: indirect table length {length} is not a "
                "non-zero multiple of 16"
            )
        entries = length // 16
        if entries > MAX_INDIRECT_ENTRIES:
            raise IndirectDescriptorError(
                f"chain at head {head}: indirect table of {entries} entries "
                f"(at most {MAX_INDIRECT_ENTRIES} are addressable)"
            )
        views = self._memory.translate(addr, length)
        # A table split across regions is rare: copy it rather than refuse it.
        table = views[0] if len(views) == 1 else b"".join(views)
        return table, entries

    # --- returning used chains -----------------------------------------------------

    def push_used(self, head: int, written: int) -> None:
        """Return one chain to the driver and publish it at once."""
        used = self._used
        if used is None:
            return
        if not 0 <= head < self.size:
            raise DescriptorIndexError(f"{self.name}: used head {head} is past the table")
        nu = self._next_used
        _pack_used(used, RING_ENTRIES + 8 * (nu & self._mask), head, written)
        if self._memory.log is not None:
            self._log_completion(head, written, nu)
        nu = (nu + 1) & 0xFFFF
        self._next_used = nu
        # x86 keeps these two stores in order: the element is visible first.
        self._used16[_IDX] = nu
        if self._memory.log is not None:
            self._log_used_idx()

    def push_used_batch(self, completions: list[tuple[int, int]]) -> None:
        """Return several chains, publishing used.idx once after all elements."""
        used = self._used
        if used is None or not completions:
            return
        size = self.size
        mask = self._mask
        nu = self._next_used
        logging_ = self._memory.log is not None
        n = len(completions)
        if not logging_ and _FEW_USED < n <= size:
            # Many at once: strided stores (two, or four at the ring's end),
            # not one pack per element. A few cost less packed one by one.
            heads, written = zip(*completions, strict=True)
            if max(heads) < size and min(heads) >= 0:
                self._store_used(nu & mask, array("I", heads), array("I", written))
                nu = (nu + n) & 0xFFFF
                self._next_used = nu
                self._used16[_IDX] = nu
                return
        for head, written in completions:
            if not 0 <= head < size:
                raise DescriptorIndexError(f"{self.name}: used head {head} is past the table")
            _pack_used(used, RING_ENTRIES + 8 * (nu & mask), head, written)
            if logging_:
                self._log_completion(head, written, nu)
            nu = (nu + 1) & 0xFFFF
        self._next_used = nu
        self._used16[_IDX] = nu
        if logging_:
            self._log_used_idx()

    def _store_used(self, first: int, heads: array, written: array) -> None:
        """Used elements from slot `first` on (wrapping at the ring's end)."""
        used32 = self._used32
        n = len(heads)
        k = min(n, self.size - first)
        used32[1 + 2 * first : 1 + 2 * (first + k) : 2] = heads[:k]
        used32[2 + 2 * first : 2 + 2 * (first + k) : 2] = written[:k]
        if k < n:
            used32[1 : 1 + 2 * (n - k) : 2] = heads[k:]
            used32[2 : 2 + 2 * (n - k) : 2] = written[k:]

    def push_used_read(self, heads: list[int]) -> None:
        """Return chains the device only read (written = 0, a TX frame), publishing
        used.idx once: the elements go in as two strided stores, not one by one."""
        used32 = self._used32
        if used32 is None or not heads:
            return
        nu = self._next_used
        first = nu & self._mask
        n = len(heads)
        if self._memory.log is not None or n > self.size or max(heads) >= self.size:
            self.push_used_batch([(head, 0) for head in heads])  # logs, or refuses
            return
        self._store_used(first, array("I", heads), array("I", bytes(4 * n)))
        nu = (nu + n) & 0xFFFF
        self._next_used = nu
        self._used16[_IDX] = nu

    # --- the dirty log (live migration) ------------------------------------------------

    def _set_used_field(self, index: int, value: int) -> None:
        """Write used.flags or avail_event (u16 `index` of the used ring): the
        device's writes to guest memory, so logged like the rest while logging."""
        self._used16[index] = value
        dirty = self._memory.log
        if dirty is not None:
            dirty.mark(self.log_used + 2 * index, 2)

    def _log_completion(self, head: int, written: int, slot: int) -> None:
        """Log what the device wrote for chain `head` (its first `written` bytes
        of writable buffers) and the used element that returns it."""
        dirty = self._memory.log
        ranges = self._writable_ranges.pop(head, None)
        if ranges is None and written:
            # Popped before logging began: its buffers were not recorded, so log
            # them whole from the descriptors (a chain of the guest's own making).
            ranges = self._ranges_of(head)
        left = written
        for addr, length in ranges or ():
            if left <= 0:
                break
            n = min(length, left)
            dirty.mark(addr, n)
            left -= n
        dirty.mark(self.log_used + RING_ENTRIES + 8 * (slot & self._mask), 8)

    def _log_used_idx(self) -> None:
        self._memory.log.mark(self.log_used + RING_IDX, 2)
        self._memory.log.signal()

    def log_changed(self) -> None:
        """Logging began or ended: ranges recorded before are stale (a head seen
        then may be reused by a chain popped while logging was off)."""
        self._writable_ranges.clear()

    def _ranges_of(self, head: int) -> list[tuple[int, int]]:
        """The writable guest ranges of chain `head`, read again from its
        descriptors, with the same checks as _walk."""
        saved, self._writable_ranges = self._writable_ranges, {}
        try:
            self._walk(head)
            return self._writable_ranges.get(head, [])
        except (QueueError, GuestMemoryError):
            return []
        finally:
            self._writable_ranges = saved

    # --- notifications ---------------------------------------------------------------

    def needs_notification(self) -> bool:
        """Should the driver be signalled for what was pushed since the last check?"""
        avail = self._avail
        if avail is None:
            return False
        if not self.event_idx:
            return not avail[_FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT
        new = self._next_used
        old = self._signalled_used
        self._signalled_used = new
        if old is None:
            return True  # first decision: nothing to compare against
        full_fence()  # our used.idx store must land before we read used_event
        used_event = avail[self._used_event]
        return need_event(used_event, new, old)

    def disable_notification(self) -> None:
        """Ask the driver not to kick while we are polling anyway."""
        self._kicks_wanted = False
        if self._used16 is not None and not self.event_idx:
            self._set_used_field(_FLAGS, VIRTQ_USED_F_NO_NOTIFY)
        # With EVENT_IDX, leaving avail_event behind has the same effect.

    def enable_notification(self) -> bool:
        """Ask for kicks again. True if chains arrived meanwhile: poll once more."""
        used = self._used16
        avail = self._avail
        self._kicks_wanted = True
        if used is None or avail is None or self.broken is not None or self.stalled is not None:
            return False
        if self.event_idx:
            self._set_used_field(self._avail_event, self._next_avail)
        else:
            self._set_used_field(_FLAGS, 0)
        full_fence()  # publish our request before re-reading avail.idx
        return avail[_IDX] != self._next_avail

    def enable_notification_for_more(self) -> bool:
        """Ask for a kick when the driver makes more chains available than it
        has now (a frame waits for more room than the chains there give).
        True if more arrived meanwhile."""
        used = self._used16
        avail = self._avail
        self._kicks_wanted = True
        if used is None or avail is None or self.broken is not None or self.stalled is not None:
            return False
        idx = avail[_IDX]
        if self.event_idx:
            self._set_used_field(self._avail_event, idx)  # the entry after the last one there
        else:
            self._set_used_field(_FLAGS, 0)
        full_fence()
        return avail[_IDX] != idx

    # --- the memory map under the rings -------------------------------------------

    def _rings_mapped(self) -> bool:
        return self._avail is not None

    def _ring_ranges(self) -> list[tuple[int, int]]:
        return [
            (self.desc_addr, desc_table_size(self.size)),
            (self.avail_addr, avail_ring_size(self.size)),
            (self.used_addr, used_ring_size(self.size)),
        ]

    def _map_rings(self) -> None:
        pins = self._pin_rings(
            self._memory,
            (
                ("descriptor table", self.desc_addr, desc_table_size(self.size), False),
                ("avail ring", self.avail_addr, avail_ring_size(self.size), False),
                ("used ring", self.used_addr, used_ring_size(self.size), True),
            ),
        )
        if pins is None:
            return
        self._pins = pins
        self._desc, avail, self._used = (p.views[0] for p in pins)
        self._avail = u16_view(avail)
        self._used16 = u16_view(self._used)
        # The descriptor table's fields and the used ring's elements as arrays,
        # for pop_spans() and push_used_read() to read and write whole batches.
        self._desc64 = self._desc.cast("Q")  # addr: [2*head]
        self._desc32 = self._desc.cast("I")  # len: [4*head + 2]
        self._desc16 = self._desc.cast("H")  # flags: [8*head + 6]
        self._used32 = self._used[: RING_ENTRIES + 8 * self.size].cast("I")  # id, len pairs
        if self._next_used is None:  # first mapped: go on from the ring's used.idx
            self._next_used = self._used16[_IDX]

    def _unmap_rings(self) -> None:
        for view in (
            self._avail, self._used16, self._desc64, self._desc32, self._desc16, self._used32
        ):  # fmt: skip
            if view is not None:
                view.release()  # derived views would hold the mapping open
        self._desc = self._avail = self._used = self._used16 = None
        self._desc64 = self._desc32 = self._desc16 = self._used32 = None
        pins, self._pins = self._pins, []
        for p in pins:
            p.release()

    def __repr__(self) -> str:
        state = f"broken: {self.broken}" if self.broken else ("ready" if self.ready else "idle")
        return f"SplitQueue({self.name}, size={self.size}, {state})"
