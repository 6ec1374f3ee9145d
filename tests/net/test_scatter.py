"""One frame read across buffers named by address, or written from them
(backends/scatter.py), on a real TAP and on pipes."""

from __future__ import annotations

import ctypes
import errno
import os
import select

import pytest

from pyvhost.backends.scatter import GatherWriter, ScatterReader

from .conftest import ETHERTYPE, HOST_MAC, recv_ours, tap_in


def buffers(*sizes: int) -> tuple[list, list[int], list[int]]:
    bufs = [ctypes.create_string_buffer(n) for n in sizes]
    return bufs, [ctypes.addressof(b) for b in bufs], list(sizes)


def test_a_frame_fills_the_spans_in_order_and_its_length_is_returned(netns):
    with tap_in(netns) as (tap, host):
        frame = b"\xff" * 6 + HOST_MAC + ETHERTYPE + bytes(range(256)) * 4
        host.send(frame)
        assert select.select([tap.fd], [], [], 5)[0]
        bufs, addrs, lengths = buffers(400, 400, 400)
        reader = tap.open_scatter_reader()
        try:
            got = reader.read(addrs, lengths)
        finally:
            reader.close()
        assert got == 12 + len(frame)  # 1048 bytes: two spans and part of the third
        joined = b"".join(b.raw for b in bufs)
        assert joined[12:got] == frame


def test_a_frame_longer_than_its_spans_runs_into_the_overflow_whole(netns):
    with tap_in(netns) as (tap, host):
        big = b"\xff" * 6 + HOST_MAC + ETHERTYPE + bytes(range(256)) * 5  # within the MTU
        small = b"\xff" * 6 + HOST_MAC + ETHERTYPE + b"s" * 50
        host.send(big)
        host.send(small)
        assert select.select([tap.fd], [], [], 5)[0]
        bufs, addrs, lengths = buffers(512, 512)
        reader = ScatterReader(tap.fd)
        try:
            got = reader.read(addrs, lengths)
            assert got == 12 + len(big)
            whole = bufs[0].raw + bufs[1].raw + bytes(reader.overflow(got - 1024))
            assert whole[12:] == big
            assert reader.read(addrs[:1], lengths[:1]) == 12 + len(small)  # the next frame
            assert bufs[0].raw[12 : 12 + len(small)] == small
        finally:
            reader.close()


def test_an_empty_tap_says_so_at_once(netns):
    with tap_in(netns) as (tap, _):
        reader = tap.open_scatter_reader()
        _, addrs, lengths = buffers(2048)
        with pytest.raises(BlockingIOError):
            reader.read(addrs, lengths)
        reader.close()


def test_a_span_the_kernel_cannot_write_is_efault_not_a_crash():
    r, w = os.pipe()
    try:
        os.write(w, b"data")
        reader = ScatterReader(r)
        with pytest.raises(OSError) as e:
            reader.read([8], [64])  # address 8 is never mapped
        assert e.value.errno == errno.EFAULT
        reader.close()
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("n", [0, 5])
def test_no_spans_or_more_than_the_table_holds_are_refused(n):
    r, w = os.pipe()
    try:
        reader = ScatterReader(r, max_spans=4)
        with pytest.raises(ValueError, match="1 to 4"):
            reader.read([1] * n, [1] * n)
        reader.close()
    finally:
        os.close(r)
        os.close(w)


def test_a_frame_written_from_its_spans_arrives_whole_and_one_frame_each(netns):
    with tap_in(netns) as (tap, host):
        host.settimeout(5)
        frames = [
            b"\xff" * 6 + HOST_MAC + ETHERTYPE + bytes([i]) * (100 + 300 * i) for i in range(3)
        ]
        writer = tap.open_gather_writer()
        try:
            for f in frames:
                data = bytes(12) + f  # a clean virtio-net header, then the frame in 3 parts
                cuts = [0, 12, 12 + 20, len(data)]
                bufs = [
                    ctypes.create_string_buffer(data[a:b], b - a)
                    for a, b in zip(cuts[:-1], cuts[1:], strict=True)
                ]
                assert writer.write(
                    [ctypes.addressof(b) for b in bufs], [len(b) for b in bufs]
                ) == len(data)
        finally:
            writer.close()
        assert recv_ours(host, 3) == frames


def test_a_span_the_kernel_cannot_read_is_efault_for_that_write():
    r, w = os.pipe()
    try:
        writer = GatherWriter(w)
        good = ctypes.create_string_buffer(b"ok", 2)
        with pytest.raises(OSError) as e:
            writer.write([ctypes.addressof(good), 8], [2, 2])  # address 8 is never mapped
        assert e.value.errno == errno.EFAULT
        writer.close()
    finally:
        os.close(r)
        os.close(w)
