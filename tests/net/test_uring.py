"""Batched writes through io_uring (backends/uring.py), on pipes and a real TAP."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select

import pytest

from pyvhost.backends.tap import Tap
from pyvhost.backends.uring import SpanReader, SpanWriter, probe
from pyvhost.errors import UringUnavailableError
from pyvhost.memory.region import buffer_address

from .conftest import ETHERTYPE, HOST_MAC, io_uring_disabled, recv_ours, tap_in

pytestmark = pytest.mark.skipif(probe() is not None, reason=f"io_uring: {probe()}")


@contextlib.contextmanager
def pipe():
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def test_spans_are_written_in_order_one_write_each():
    data = [bytes([i]) * (i + 1) for i in range(1, 40)]
    buffers = [ctypes.create_string_buffer(d, len(d)) for d in data]
    with pipe() as (r, w):
        writer = SpanWriter(w, 64)
        try:
            results = writer.write_spans(
                [ctypes.addressof(b) for b in buffers], [len(d) for d in data]
            )
        finally:
            writer.close()
        assert results == [len(d) for d in data]
        assert os.read(r, 65536) == b"".join(data)


def test_a_span_the_kernel_cannot_read_fails_alone_with_efault():
    good = ctypes.create_string_buffer(b"ok", 2)
    with pipe() as (r, w):
        writer = SpanWriter(w, 8)
        try:
            a = ctypes.addressof(good)
            results = writer.write_spans([a, 8, a], [2, 2, 2])  # address 8 is never mapped
        finally:
            writer.close()
        assert results == [2, -14, 2]  # EFAULT for the middle one, and no crash
        assert os.read(r, 16) == b"okok"


def test_batches_follow_each_other_round_the_ring():
    word = ctypes.create_string_buffer(b"x", 1)
    with pipe() as (r, w):
        writer = SpanWriter(w, 8)
        try:
            for n in (5, 8, 3, 7, 8, 1):  # more entries in all than the ring has
                assert writer.write_spans([ctypes.addressof(word)] * n, [1] * n) == [1] * n
        finally:
            writer.close()
        assert os.read(r, 100) == b"x" * 32


def test_a_batch_larger_than_the_ring_is_refused():
    with pipe() as (_, w):
        writer = SpanWriter(w, 4)
        try:
            with pytest.raises(ValueError, match="the ring holds 4"):
                writer.write_spans([0] * 5, [1] * 5)
        finally:
            writer.close()


def test_close_releases_the_ring_fd_and_its_mappings():
    def rings_open() -> tuple[int, int]:
        fds = sum(
            "io_uring" in os.readlink(f"/proc/self/fd/{fd}")
            for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")
        )
        with open("/proc/self/maps") as f:
            maps = sum("io_uring" in line for line in f)
        return fds, maps

    before = rings_open()
    with pipe() as (_, w):
        writers = [SpanWriter(w, 8) for _ in range(3)]
        assert rings_open() != before
        for writer in writers:
            writer.close()
    assert rings_open() == before


def test_runt_frames_are_refused_by_the_tap_and_the_rest_arrive_in_order(netns):
    with tap_in(netns) as (tap, host):
        host.settimeout(5)
        frames = [
            bytes(12) + b"\xff" * 6 + HOST_MAC + ETHERTYPE + bytes([i]) * 50 for i in range(3)
        ]
        runt = bytes(12) + b"\xff" * 5  # a header and 5 bytes: no Ethernet header
        spans = [frames[0], runt, frames[1], frames[2]]
        buffers = [ctypes.create_string_buffer(s, len(s)) for s in spans]
        writer = tap.open_span_writer()
        assert writer is not None
        try:
            addrs = [buffer_address(b) for b in buffers]
            results = writer.write_spans(addrs, [len(s) for s in spans])
        finally:
            writer.close()
        assert results[1] < 0 and [results[0], results[2], results[3]] == [len(frames[0])] * 3
        assert recv_ours(host, 3) == [f[12:] for f in frames]


def test_a_tap_with_a_finite_sndbuf_writes_frame_by_frame():
    tap = Tap.open(f"pu{os.getpid() % 100000}", vnet_hdr=True, multi_queue=False)
    try:
        tap.set_sndbuf(1 << 20)
        assert tap.open_span_writer() is None
    finally:
        tap.close()


def test_io_uring_off_is_never_used():
    tap = Tap.open(f"pu{os.getpid() % 100000}", vnet_hdr=True, multi_queue=False)
    try:
        tap.io_uring = "off"
        assert tap.open_span_writer() is None
    finally:
        tap.close()


def test_where_io_uring_is_disabled_the_writer_says_why_and_the_tap_writes_one_by_one(caplog):
    tap = Tap.open(f"pu{os.getpid() % 100000}", vnet_hdr=True, multi_queue=False)
    try:
        with io_uring_disabled():
            with pytest.raises(UringUnavailableError, match="io_uring unavailable"):
                SpanWriter(tap.fd)
            assert "io_uring unavailable" in probe()
            with caplog.at_level("INFO"):
                assert tap.open_span_writer() is None
        assert "one writev each" in caplog.text
    finally:
        tap.close()


def test_reads_take_a_frame_each_and_find_the_tap_empty_without_waiting(netns):
    with tap_in(netns) as (tap, host):
        frames = [b"\xff" * 6 + HOST_MAC + ETHERTYPE + bytes([i]) * (60 + i) for i in range(3)]
        for f in frames:
            host.send(f)
        assert select.select([tap.fd], [], [], 5)[0]
        buffers = [ctypes.create_string_buffer(2048) for _ in range(5)]
        reader = tap.open_span_reader()
        try:
            results = reader.read_spans([ctypes.addressof(b) for b in buffers], [2048] * 5)
        finally:
            reader.close()
        assert results == [12 + len(f) for f in frames] + [-errno.EAGAIN] * 2
        got = [b.raw[12 : 12 + len(f)] for b, f in zip(buffers[:3], frames, strict=True)]
        assert got == frames


def test_a_frame_longer_than_its_span_runs_into_its_own_overflow(netns):
    with tap_in(netns) as (tap, host):
        big = b"\xff" * 6 + HOST_MAC + ETHERTYPE + bytes(range(256)) * 5
        small = b"\xff" * 6 + HOST_MAC + ETHERTYPE + b"s" * 50
        host.send(big)
        host.send(small)
        assert select.select([tap.fd], [], [], 5)[0]
        buffers = [ctypes.create_string_buffer(512) for _ in range(2)]
        reader = SpanReader(tap.fd, 4)
        try:
            results = reader.read_spans([ctypes.addressof(b) for b in buffers], [512, 512])
            assert results == [12 + len(big), 12 + len(small)]
            whole = buffers[0].raw + bytes(reader.overflow(0, results[0] - 512))
            assert whole[12:] == big
            assert buffers[1].raw[12 : 12 + len(small)] == small
        finally:
            reader.close()
