"""DPDK's testpmd as a vhost-user peer: hugepages, start, stop, statistics.

testpmd runs non-interactively; a newline on its stdin makes it stop, print
its forwarding statistics and exit. It is started with --in-memory (no
runtime files), --single-file-segments (one memfd, so one vhost-user memory
region: SET_MEM_TABLE takes at most 8) and --no-pci (no hardware touched).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from pyvhost.testing.processes import wait_for

HUGEPAGES = "/proc/sys/vm/nr_hugepages"
HUGETLBFS = "/dev/hugepages"
PAGES_NEEDED = 512  # 2 MiB pages: testpmd's -m 512 plus headroom


class HugepagesUnavailable(Exception):
    """This machine cannot give testpmd hugepages (not root, or no memory for them)."""


def _free_hugepages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


class Hugepages:
    """Reserve 2 MiB hugepages and mount hugetlbfs; undo both on release()."""

    def __init__(self, pages: int = PAGES_NEEDED) -> None:
        self._old_count: int | None = None
        self._mounted = False
        try:
            with open(HUGEPAGES) as f:
                current = int(f.read())
            if _free_hugepages() < pages:
                self._old_count = current
                with open(HUGEPAGES, "w") as f:
                    f.write(str(current + pages - _free_hugepages()))
        except OSError as e:
            raise HugepagesUnavailable(f"cannot reserve hugepages: {e}") from e
        if _free_hugepages() < pages:
            self.release()
            raise HugepagesUnavailable(
                f"only {_free_hugepages()} free 2 MiB hugepages after asking for {pages}"
            )
        if not os.path.ismount(HUGETLBFS):
            os.makedirs(HUGETLBFS, exist_ok=True)
            r = subprocess.run(
                ["mount", "-t", "hugetlbfs", "nodev", HUGETLBFS], capture_output=True
            )
            if r.returncode != 0:
                self.release()
                raise HugepagesUnavailable(f"cannot mount hugetlbfs: {r.stderr.decode().strip()}")
            self._mounted = True

    def release(self) -> None:
        if self._mounted:
            subprocess.run(["umount", HUGETLBFS], capture_output=True)
            self._mounted = False
        if self._old_count is not None:
            with open(HUGEPAGES, "w") as f:
                f.write(str(self._old_count))
            self._old_count = None


@dataclass
class PortStats:
    rx_packets: int
    tx_packets: int
    tx_dropped: int


def testpmd_binary() -> str:
    path = shutil.which("dpdk-testpmd")
    if path is None:
        raise FileNotFoundError(
            "dpdk-testpmd not found: install Debian's dpdk-dev package (scripts/test.sh does)"
        )
    return path


class Testpmd:
    """One testpmd process with one virtual port."""

    __test__ = False  # not a pytest test class, whatever its name says

    def __init__(
        self,
        vdev: str,
        app_args: list[str],
        *,
        prefix: str = "pyvhost",
        cores: str = "0-1",
        lcores: str | None = None,
        taskset: str | None = None,
        extra_vdevs: list[str] | tuple[str, ...] = (),
        main_lcore: int | None = None,
        netns: str | None = None,
    ) -> None:
        cmd = [
            testpmd_binary(),
            # --lcores maps lcores to CPUs ("0@1,1@1": main and forwarding lcore,
            # and with them EAL's control threads, all on CPU 1).
            *(["--lcores", lcores] if lcores else ["-l", cores]),
            *(["--main-lcore", str(main_lcore)] if main_lcore is not None else []),
            "--in-memory",
            "--single-file-segments",
            "--no-pci",
            "--no-telemetry",
            "-m",
            "512",
            f"--file-prefix={prefix}",
            f"--vdev={vdev}",
            *(f"--vdev={v}" for v in extra_vdevs),
            "--",
            "--nb-cores=1",
            *app_args,
        ]
        if taskset:
            cmd = ["taskset", "-c", taskset, *cmd]
        # Line-buffered: on a pipe testpmd's stdio would hold back "Press enter to exit".
        cmd = ["stdbuf", "-oL", "-eL", *cmd]
        if netns:  # its tap PMD's interface is then born there (moving it loses it)
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.output = ""

    def wait_started(self, timeout: float = 30) -> None:
        """Read testpmd's output until it is forwarding (its ports configured)."""
        import select
        import time

        deadline = time.monotonic() + timeout
        while "Press enter to exit" not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"testpmd did not start:\n{self.output[-3000:]}")
            # Raw reads: testpmd leaves lines open ("Checking link statuses...")
            # while it waits, up to 9 s, for a vhost link.
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                self.output += os.read(self.proc.stdout.fileno(), 65536).decode(errors="replace")

    def wait_for_socket(self, path: str, timeout: float = 30) -> None:
        wait_for(
            lambda: os.path.exists(path) or self.proc.poll() is not None,
            timeout,
            f"testpmd to create {path}",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"testpmd exited early:\n{self.proc.communicate()[0]}")

    def stop(self, timeout: float = 30) -> PortStats:
        """Newline on stdin: testpmd stops forwarding, prints statistics, exits."""
        try:
            rest, _ = self.proc.communicate("\n", timeout=timeout)
            self.output += rest
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output, _ = self.proc.communicate()
            raise
        return parse_stats(self.output)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def parse_stats(output: str) -> PortStats:
    m = re.search(
        r"Accumulated forward statistics.*?RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)"
        r"\s+TX-dropped:\s*(\d+)",
        output,
        re.S,
    )
    if m is None:
        raise ValueError(f"no forwarding statistics in testpmd's output:\n{output[-3000:]}")
    return PortStats(int(m.group(1)), int(m.group(2)), int(m.group(3)))
