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
