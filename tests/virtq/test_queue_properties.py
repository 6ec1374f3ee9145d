"""Property tests: random and malicious rings never escape the typed errors."""

from __future__ import annotations

import ctypes

from hypothesis import given, settings, strategies as st

from pyvhost.errors import QueueError
from pyvhost.testing import GuestRam, queue_pair
from pyvhost.virtq.layout import DESC

RAM = 1 << 16


def descriptor(size):
    addr = st.one_of(
        st.integers(0, RAM - 1),  # in RAM
        st.integers(0, 2**64 - 1),  # anywhere
        st.integers(RAM - 64, RAM + 64),  # at the edge
    )
    length = st.one_of(st.integers(0, 256), st.integers(0, 2**32 - 1), st.sampled_from([16, 32]))
    flags = st.integers(0, 7)
    nxt = st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF))
    return st.tuples(addr, length, flags, nxt)


@st.composite
def rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    descs = draw(st.lists(descriptor(size), min_size=size, max_size=size))
    head = st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF))  # mostly in the table
    heads = draw(st.lists(head, min_size=size, max_size=size))
    avail_idx = draw(st.one_of(st.integers(0, size), st.integers(0, 0xFFFF)))
    # An indirect table the descriptors may point at: random; or with the
    # flags of entries chained in order (NEXT on all but the last), and next
    # indices in order as a driver lays them out, or drawn.
    indirect = draw(st.lists(descriptor(8), min_size=0, max_size=8))
    layout = draw(st.sampled_from(["random", "flags in order", "in order"]))
    if layout != "random":
        last = len(indirect) - 1
        indirect = [(a, n, int(i < last) | f & 2,
                     nxt if layout == "flags in order" else i + 1 if i < last else 0)
                    for i, (a, n, f, nxt) in enumerate(indirect)]  # fmt: skip
    return size, descs, heads, avail_idx, indirect, draw(st.booleans()), draw(st.booleans())


def lay_out(ram, ring):
    """A driver queue in `ram` holding the drawn ring, and the device queue serving it."""
    size, descs, heads, avail_idx, indirect, use_indirect, event_idx = ring
    driver, device = queue_pair(ram, size, indirect=use_indirect, event_idx=event_idx)
    table = ram.alloc(16 * 8)
    ram.memory.write(table, b"".join(DESC.pack(*d) for d in indirect))
    for i, (addr, length, flags, nxt) in enumerate(descs):
        if flags & 4 and i % 2:
            addr, length = table, 16 * len(indirect)  # aim some at the real table
        driver.write_desc(i, addr, length, flags, nxt)
    for slot, head in enumerate(heads):
        driver.write_avail_slot(slot, head)
    driver.set_avail_idx(avail_idx)
    return driver, device


@settings(max_examples=400, deadline=None)
@given(rings())
def test_any_ring_yields_valid_chains_or_a_typed_broken_reason(ring):
    size, descs, heads, avail_idx, indirect, use_indirect, event_idx = ring
    with GuestRam(RAM) as ram:
        driver, device = lay_out(ram, ring)

        popped = 0
        for _ in range(size + 2):
            chain = device.pop()  # never raises
            if chain is None:
                break
            popped += 1
            assert chain.readable_len == sum(len(v) for v in chain.readable)
            assert chain.writable_len == sum(len(v) for v in chain.writable)
            assert chain.readable_len + chain.writable_len < 2**32
            for v in chain.writable:
                v[:1] = b"\xaa"[: len(v)]  # touching every writable view is safe
            device.push_used(chain.head, 0)
        assert popped <= min(avail_idx, size)
        assert device.broken is None or isinstance(device.broken, QueueError)
        device.needs_notification()
        device.enable_notification()
        device.close()


def _chain_facts(chain):
    return (
        chain.head,
        [bytes(v) for v in chain.readable],
        [len(v) for v in chain.writable],
        chain.readable_len,
        chain.writable_len,
    )


@settings(max_examples=300, deadline=None)
@given(rings(), st.integers(1, 20))
def test_a_batch_pop_takes_what_single_pops_take_and_breaks_alike(ring, limit):
    outcomes = []
    for batched in (False, True):
        with GuestRam(RAM) as ram:
            driver, device = lay_out(ram, ring)
            # Each chain's bytes as soon as it is taken: a buffer may overlap the
            # ring, and pop() re-arms kicks (writing the ring) when it finds none.
            if batched:
                facts = [_chain_facts(c) for c in device.pop_batch(limit)]
            else:
                facts = []
                while len(facts) < limit and (chain := device.pop()) is not None:
                    facts.append(_chain_facts(chain))
            outcomes.append(
                (
                    facts,
                    type(device.broken),
                    str(device.broken),
                    device.next_avail,
                )
            )
            device.close()
    assert outcomes[0] == outcomes[1]


@settings(max_examples=300, deadline=None)
@given(rings(), st.integers(1, 20))
def test_spans_then_a_batch_take_what_a_batch_alone_takes_and_break_alike(ring, limit):
    """pop_spans takes the one-buffer readable chains at the front, by host
    address; pop_batch takes the rest: the same chains, bytes and outcome."""
    outcomes = []
    for spans_first in (False, True):
        with GuestRam(RAM) as ram:
            driver, device = lay_out(ram, ring)
            taken = []
            if spans_first:
                heads, addrs, lengths = device.pop_spans(limit)
                for head, addr, length in zip(heads, addrs, lengths, strict=True):
                    taken.append((head, [ctypes.string_at(addr, length)], [], length, 0))
            taken += [_chain_facts(c) for c in device.pop_batch(limit - len(taken))]
            outcomes.append((taken, type(device.broken), str(device.broken), device.next_avail))
            device.close()
    assert outcomes[0] == outcomes[1]
