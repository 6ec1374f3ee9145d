"""Small timing helpers shared by the bench scripts (not part of the package)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable


def rate(fn: Callable[[], int], repeats: int = 5, min_seconds: float = 0.3) -> list[float]:
    """Operations per second of fn() (which returns how many it did), per repeat."""
    rates = []
    for _ in range(repeats):
        ops = 0
        start = time.perf_counter()
        while True:
            ops += fn()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rates.append(ops / elapsed)
    return rates


def summary(rates: list[float]) -> str:
    return (
        f"median {statistics.median(rates):>12,.0f}/s  "
        f"(min {min(rates):,.0f}, max {max(rates):,.0f}, n={len(rates)})"
    )


def machine() -> str:
    return (
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores, {platform.machine()}, {_cpu_model()}"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
