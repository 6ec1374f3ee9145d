"""Where the guest stream's backend time goes: pyvhost beside QEMU's tap path.

For each direction of an iperf3 stream in one TCG guest (set up as
`bench/run.py` sets it up, the backend pinned to core 1), the backend's user
and system CPU per GB moved, for pyvhost and for QEMU's own tap path (its
main loop thread). Then, for pyvhost, a py-spy profile (--native) of where
its busy time goes: by event-loop callback, and the datapath calls that
cost most under them. A sample whose leaf is in libc is a system call (or
libc's own work); epoll_wait is idle time and is left out. py-spy pauses
the process to sample it, so the profiled run is slower than the CPU run
before it: the profile gives shares, the CPU run the figures.

    python bench/stream_profile.py [--seconds 10]    # as root; pip install py-spy
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as side_by_side  # noqa: E402
from _timing import machine  # noqa: E402
from pyvhost.guest.image import ensure_image  # noqa: E402
from pyvhost.guest.lab import HOST_IP  # noqa: E402
from pyvhost.guest.qemu import GuestError  # noqa: E402

# The datapath's calls whose share is worth naming (inclusive of what they call).
CALLS = [
    "SplitQueue.pop_batch",
    "SplitQueue.pop_spans",
    "SplitQueue.push_used_batch",
    "SplitQueue.push_used_read",
    "ModeratedNotifier.completed",
    "Tap.read_iovec",
    "Tap.write_iovec",
    "SpanReader.read_spans",
    "SpanWriter.write_spans",
    "GuestMemory.gather",
]


def py_spy() -> str | None:
    """py-spy on PATH, or beside this Python (a virtualenv's bin/)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def stream(setup, to_guest: bool, seconds: int) -> tuple[float, float, float, float]:
    """(Gbit/s, GB, user s, system s) of one iperf3 run."""
    u0, s0 = side_by_side.user_system(setup.backend_pid, setup.backend_tid)
    end = setup.guest.iperf3(HOST_IP, seconds, reverse=to_guest)["end"]["sum_received"]
    u1, s1 = side_by_side.user_system(setup.backend_pid, setup.backend_tid)
    return end["bits_per_second"] / 1e9, end["bytes"] / 1e9, u1 - u0, s1 - s0


def profile(setup, to_guest: bool, seconds: int, out: Path) -> None:
    spy = subprocess.Popen(
        [py_spy(), "record", "--native", "--rate", "250",
         "--duration", str(seconds), "--format", "raw", "--output", str(out),
         "--pid", str(setup.backend_pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Only py-spy's samples are wanted from this run: an iperf3 that did not
        # end cleanly is said, not fatal (the samples cover the stream).
        try:
            setup.guest.iperf3(HOST_IP, seconds + 2, reverse=to_guest)
        except GuestError as e:
            print(f"  (the profiled iperf3 run did not end cleanly, {str(e).splitlines()[0]}; "
                  "the profile is of the stream up to then)")  # fmt: skip
    finally:
        spy.wait(seconds + 30)


def shares(raw: Path) -> tuple[int, Counter, Counter, Counter]:
    """Busy samples; per callback; per named call; system calls by name."""
    busy = 0
    callbacks: Counter = Counter()
    calls: Counter = Counter()
    syscalls: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        leaf_lib = stack.split(";")[-1]
        if frames[-1] == "epoll_wait":
            continue  # idle
        n = int(count)
        busy += n
        callback = "(the event loop itself)"
        for i, f in enumerate(frames[:-1]):
            if f == "EventLoop._call":
                callback = frames[i + 1]
                break
        callbacks[callback] += n
        for name in set(frames) & set(CALLS):
            calls[name] += n
        if "libc.so" in leaf_lib:
            syscalls[frames[-1]] += n
    return busy, callbacks, calls, syscalls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    if py_spy() is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    image = ensure_image(print)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="pyvhost-prof-") as tmp:
        workdir = Path(tmp)
        for to_guest in (False, True):
            direction = "to guest" if to_guest else "to host"
            line = []
            for kind in ("qemu-tap", "pyvhost"):
                setup = side_by_side.GuestSetup(kind, image, workdir)
                try:
                    setup.start()
                    gbits, gb, user, system = stream(setup, to_guest, args.seconds)
                    line.append(f"{kind} {gbits:.2f} Gbit/s, CPU per GB user {user / gb:.2f} s "
                                f"system {system / gb:.2f} s")  # fmt: skip
                    if kind == "pyvhost":
                        raw = workdir / f"{direction.replace(' ', '-')}.txt"
                        profile(setup, to_guest, args.seconds, raw)
                finally:
                    setup.close()
            print(f"{direction}: " + "; ".join(line))
            busy, callbacks, calls, syscalls = shares(raw)
            if not busy:
                print("  (py-spy took no samples)")
                continue
            print(f"  pyvhost's busy time ({busy} samples), by event-loop callback:")
            for name, n in callbacks.most_common(6):
                print(f"    {100 * n / busy:5.1f}%  {name}")
            print("  under them, these calls (with what they call):")
            for name, n in calls.most_common():
                print(f"    {100 * n / busy:5.1f}%  {name}")
            print("  system calls (samples in libc):")
            for name, n in syscalls.most_common(6):
                print(f"    {100 * n / busy:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("needs root (TAPs, network namespaces)")
    sys.exit(main())
