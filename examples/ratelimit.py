"""A rate limiter hook: a token bucket per port and direction; frames over it are dropped.

    pyvhost switch ... --hook vm1=examples.ratelimit:hook
    PYVHOST_RATE_MBIT=50          # the rate, in Mbit/s (default 100)
    PYVHOST_BURST_KB=256          # how much may pass at once (default 256 KiB)

A GSO frame counts as all the bytes it will be cut into, so a guest with
TSO is limited as fairly as one without.
"""

from __future__ import annotations

import os
import time

from pyvhost.hooks import DROP

RATE = float(os.environ.get("PYVHOST_RATE_MBIT", "100")) * 1e6 / 8  # bytes per second
BURST = float(os.environ.get("PYVHOST_BURST_KB", "256")) * 1024

_buckets: dict[tuple[str, str], list[float]] = {}  # (port, direction) -> [tokens, last]


def hook(frame: memoryview, ctx) -> object:
    now = time.monotonic()
    bucket = _buckets.setdefault((ctx.port, ctx.direction), [BURST, now])
    tokens = min(BURST, bucket[0] + (now - bucket[1]) * RATE)
    bucket[1] = now
    if tokens < len(frame):
        bucket[0] = tokens
        return DROP
    bucket[0] = tokens - len(frame)
    return None
