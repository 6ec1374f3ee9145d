"""Property tests: random maps and random (hostile) ranges against a reference model."""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st

from pyvhost.errors import GuestMemoryError
from pyvhost.memory import GuestAddress, GuestMemory, RegionSpec
from pyvhost.testing.memfd import memfd

PAGE = 4096


def pattern(gpa: int, length: int) -> bytes:
    """The bytes the model says live at guest [gpa, gpa+length)."""
    return bytes(((a * 131) >> 3) & 0xFF for a in range(gpa, gpa + length))


@st.composite
def layouts(draw):
    """Non-overlapping regions, some adjacent, some with holes, a few near 2**64."""
    regions = []
    pos = draw(st.sampled_from([0, PAGE, 2**64 - 16 * PAGE]))
    for _ in range(draw(st.integers(1, 5))):
        pos += draw(st.sampled_from([0, 0, PAGE, 3 * PAGE]))  # adjacency is common
        size = draw(st.integers(1, 4)) * PAGE
        if pos + size > 2**64:
            break
        regions.append((pos, size))
        pos += size
    return regions


def build(layout) -> GuestMemory:
    mem = GuestMemory()
    for gpa, size in layout:
        fd = memfd(size)
        os.pwrite(fd, pattern(gpa, size), 0)
        mem.add_region(RegionSpec(GuestAddress(gpa), size), fd)
    return mem


def covered(layout, addr: int, length: int) -> bool:
    pos, end = addr, addr + length
    if addr < 0 or length < 0 or end > 2**64:
        return False
    for gpa, size in sorted(layout):
        if gpa <= pos < gpa + size:
            pos = gpa + size
        if pos >= end:
            return True
    return length == 0


addresses = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(-8, 12 * PAGE),
    st.integers(2**64 - 16 * PAGE - 8, 2**64 + 8),
)
lengths = st.one_of(st.integers(0, 3 * PAGE), st.integers(-4, 2**65), st.just(2**64))


@settings(max_examples=300, deadline=None)
@given(layouts(), st.lists(st.tuples(addresses, lengths), min_size=1, max_size=12))
def test_translation_matches_the_model_or_raises_a_typed_error(layout, ranges):
    mem = build(layout)
    try:
        for addr, length in ranges:
            try:
                views = mem.translate(addr, length)
            except GuestMemoryError:
                assert not covered(layout, addr, length)
                continue
            assert covered(layout, addr, length)
            assert sum(len(v) for v in views) == length
            assert b"".join(views) == pattern(addr, length)
    finally:
        mem.clear()


@settings(max_examples=100, deadline=None)
@given(layouts(), st.data())
def test_removing_regions_keeps_lookups_exact(layout, data):
    mem = build(layout)
    try:
        live = list(layout)
        while live:
            gone = data.draw(st.sampled_from(live))
            mem.translate(gone[0], 1)  # put it in the last-hit cache first
            mem.remove_region(gone[0])
            live.remove(gone)
            addr = data.draw(st.integers(gone[0], gone[0] + gone[1] - 1))
            try:
                mem.translate(addr, 1)
                raise AssertionError("a removed region still translates")
            except GuestMemoryError:
                pass
            for gpa, size in live:
                assert mem.read(gpa + size - 1, 1) == pattern(gpa + size - 1, 1)
    finally:
        mem.clear()
