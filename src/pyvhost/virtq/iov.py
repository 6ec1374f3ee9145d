"""Scatter-gather helpers over a chain's buffer views (lists of memoryviews)."""

from __future__ import annotations


def skip(views: list[memoryview], n: int) -> list[memoryview]:
    """The views with their first n bytes cut off (zero-copy slices)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def write_at(views: list[memoryview], offset: int, data: bytes) -> None:
    """Write data at a byte offset of a scatter list (it may span views)."""
    pos = 0
    for v in views:
        if offset >= len(v):
            offset -= len(v)
            continue
        n = min(len(v) - offset, len(data) - pos)
        v[offset : offset + n] = data[pos : pos + n]
        pos += n
        offset = 0
        if pos == len(data):
            return


def scatter(views: list[memoryview], data: bytes | memoryview) -> int:
    """Copy data into the views in order; returns how many bytes fit."""
    pos = 0
    for v in views:
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n
        if pos == len(data):
            break
    return pos


def copy_views(src: list, dst: list) -> int:
    """Copy the concatenation of `src` into the concatenation of `dst`, as far
    as it fits; returns the bytes copied. One memcpy per overlapping piece."""
    di = 0
    doff = 0
    copied = 0
    for s in src:
        soff = 0
        n = len(s)
        while soff < n:
            if di == len(dst):
                return copied
            d = dst[di]
            k = min(n - soff, len(d) - doff)
            d[doff : doff + k] = s[soff : soff + k]
            soff += k
            doff += k
            copied += k
            if doff == len(d):
                di += 1
                doff = 0
    return copied
