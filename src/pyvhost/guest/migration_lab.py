"""Live migration on one machine: a guest moves from QEMU A on pyvhost A to
QEMU B (started with -incoming) on pyvhost B.

Each pyvhost has its own TAP; both TAPs are ports of one bridge in the
host-side namespace, which holds the host's address, as two hypervisor
hosts on one L2 segment would be. The migration stream goes over a Unix
socket. Every process is ended by its PID, and the namespace (with the
bridge) and the TAPs go too, also on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pyvhost.guest.image import GuestImage, ensure_image
from pyvhost.guest.lab import GUEST_IP, HOST_IP, HOST_MAC, PREFIX, _listening_tcp
from pyvhost.guest.msix import msix_works
from pyvhost.guest.qemu import Guest, NicOptions, VmOptions
from pyvhost.guest.qmp import Qmp
from pyvhost.testing.netns import NetNamespace
from pyvhost.testing.processes import PyvhostProcess, wait_for
from pyvhost.virtq.layout import (
    DESC,
    RING_ENTRIES,
    RING_IDX,
    USED_ELEM,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

GUEST_MAC = "52:54:00:12:34:56"

# A file server that sends at a set rate, so a transfer spans the migration.
_PACED_SERVER = """
import socket, sys, time
path, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
data = open(path, "rb").read()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(1)
conn, _ = srv.accept()
conn.recv(4096)
conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(data))
start, chunk = time.monotonic(), 65536
for off in range(0, len(data), chunk):
    conn.sendall(data[off:off + chunk])
    ahead = (off + chunk) / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
conn.close()
"""


def _guest_ram(pid: int) -> tuple[int, int]:
    """(address, size) of QEMU's mapping of the guest's RAM memfd (the largest)."""
    best = (0, 0)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "/memfd:" not in line:
                continue
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if end - start > best[1]:
                best = (start, end - start)
    if not best[1]:
        raise RuntimeError(f"QEMU {pid} has no memfd RAM mapped")
    return best


PAGE = 4096


@dataclass
class PageDifference:
    """One guest page that differs between the two sides after a migration."""

    address: int  # guest-physical
    source: bytes
    destination: bytes

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) offsets in the page of the bytes that differ; runs less
        than 16 bytes apart are one span."""
        spans: list[list[int]] = []
        for i, (x, y) in enumerate(zip(self.source, self.destination, strict=True)):
            if x != y:
                if spans and i - spans[-1][1] < 16:
                    spans[-1][1] = i + 1
                else:
                    spans.append([i, i + 1])
        return [(a, b) for a, b in spans]

    def written_by_device(self, device_ranges: list[tuple[int, int]]) -> bool:
        """Whether bytes that differ lie where the back-end writes: a used ring,
        or an RX buffer the guest had posted (MigrationLab.device_ranges).
        Anything else was written by the guest's CPU, whose writes QEMU tracks
        itself: under TCG it loses some (QEMU 7.2's migration sync clears a
        page's dirty bit without taking back the vCPU's writable TLB entry),
        also with no vhost-user device at all. Received data the guest copied
        (to a socket reader's buffer, say) is such a CPU write."""
        for start, end in self.spans():
            lo, hi = self.address + start, self.address + end
            if any(lo < addr + size and addr < hi for addr, size in device_ranges):
                return True
        return False


@dataclass
class DeviceRanges:
    ranges: list[tuple[int, int]]  # (guest address, size) the device wrote
    posted: int  # RX buffers posted and not taken: none of the device's writing


@dataclass
class RxRings:
    """An RX queue's rings as they lie in a stopped guest's RAM, with the index
    the device goes on from (its GET_VRING_BASE)."""

    desc: bytes
    avail: bytes
    used: bytes
    last_avail: int

    @property
    def num(self) -> int:
        return len(self.desc) // DESC.size

    def posted(self) -> set[int]:
        """Heads the guest posted that the device has not taken yet."""
        idx = int.from_bytes(self.avail[RING_IDX : RING_IDX + 2], "little")
        ahead = min((idx - self.last_avail) & 0xFFFF, self.num)
        return {int.from_bytes(self.avail[RING_ENTRIES + 2 * (i % self.num) :][:2], "little")
                for i in range(self.last_avail, self.last_avail + ahead)}  # fmt: skip

    def written(self) -> list[tuple[int, int]]:
        """(guest address, size) of each buffer the device returned that the
        guest has not posted again: the first `len` bytes its latest used
        element names, along its chain of device-writable descriptors. A
        reposted head's table entry names a new buffer, not yet written; a
        returned one's still names what the device wrote."""
        num = self.num
        idx = int.from_bytes(self.used[RING_IDX : RING_IDX + 2], "little")
        latest: dict[int, int] = {}
        for i in range(idx - min(idx, num), idx):  # oldest first: the latest stays
            head, written = USED_ELEM.unpack_from(self.used, RING_ENTRIES + 8 * (i % num))
            latest[head] = written
        posted = self.posted()
        ranges: list[tuple[int, int]] = []
        for head, left in latest.items():
            if head in posted or head >= num:
                continue
            at = head
            for _ in range(num):  # a loop in the table ends here, not hangs
                addr, length, flags, nxt = DESC.unpack_from(self.desc, DESC.size * at)
                if flags & VIRTQ_DESC_F_WRITE and left > 0:
                    ranges.append((addr, min(length, left)))
                    left -= length
                if not flags & VIRTQ_DESC_F_NEXT or nxt >= num or left <= 0:
                    break
                at = nxt
        return ranges


class Side:
    """One hypervisor host: a pyvhost on its TAP, and a QEMU."""

    def __init__(self, name: str, workdir: str) -> None:
        self.name = name
        self.socket = os.path.join(workdir, f"{name}.sock")
        self.qmp_path = os.path.join(workdir, f"{name}.qmp")
        self.ifname = f"pv{name}{uuid.uuid4().hex[:6]}"
        self.pyvhost: PyvhostProcess | None = None
        self.guest: Guest | None = None
        self.qmp: Qmp | None = None
        self.idle_fds: set[int] = set()  # pyvhost's fds before any QEMU came


class MigrationLab:
    def __init__(
        self,
        *,
        pyvhost_args: list[str] = (),
        mem: str = "512M",
        image: GuestImage | None = None,
        workdir: str | None = None,
        progress: Callable[[str], None] = lambda msg: None,
    ) -> None:
        """`pyvhost_args`: more `pyvhost net` arguments for both sides (e.g.
        --no-migration)."""
        self.pyvhost_args = list(pyvhost_args)
        self.mem = mem
        self.image = image
        self.progress = progress
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="pyvhost-mig-")
        self.workdir = workdir or self._tmp.name
        self.migration_socket = os.path.join(self.workdir, "migration.sock")
        self.source = Side("a", self.workdir)
        self.destination = Side("b", self.workdir)
        self.bridge = "br" + uuid.uuid4().hex[:8]
        self.netns: NetNamespace | None = None
        self.msix = False
        self._servers: list[subprocess.Popen] = []

    def start(self) -> MigrationLab:
        """The namespace with its bridge, and pyvhost on each side."""
        try:
            if self.image is None:
                self.image = ensure_image(self.progress)
            self.msix = msix_works(self.image, self.progress)
            self.netns = NetNamespace("pyvhost-mig")
            ns = self.netns
            ns.ip("link", "add", self.bridge, "type", "bridge")
            ns.adopt(self.bridge, address=f"{HOST_IP}/{PREFIX}", mac=HOST_MAC, move=False)
            for side in (self.source, self.destination):
                self.progress(f"starting pyvhost {side.name} on TAP {side.ifname}")
                side.pyvhost = PyvhostProcess(
                    ["net", "--socket", side.socket, "--netdev", f"tap,ifname={side.ifname}",
                     *self.pyvhost_args], side.socket,
                    stderr_path=os.path.join(self.workdir, f"pyvhost-{side.name}.log"))  # fmt: skip
                ns.adopt(side.ifname, ipv6=False)
                ns.ip("link", "set", "dev", side.ifname, "master", self.bridge)
                # Once settled: moving the TAP makes the link watcher reopen its socket.
                side.idle_fds = side.pyvhost.settled_fds()
        except BaseException:
            self.close()
            raise
        return self

    def _vm(self, side: Side, extra: list[str]) -> VmOptions:
        nic = NicOptions(side.socket, mem=self.mem, msix=self.msix, mac=GUEST_MAC)
        return VmOptions(nic, self.image, ip=f"{GUEST_IP}/{PREFIX}",
                         extra_args=["-qmp", f"unix:{side.qmp_path},server=on,wait=off",
                                     *extra])  # fmt: skip

    def boot_source(self) -> Guest:
        self.progress("booting the guest on side a")
        s = self.source
        s.guest = Guest(self._vm(s, []), os.path.join(self.workdir, "a.log"))
        s.guest.wait_ready()
        s.qmp = Qmp(s.qmp_path)
        return s.guest

    def start_destination(self) -> None:
        """QEMU B, the same machine, waiting for the migration stream. It stays
        paused (-S) after the migration until resume(), so its RAM can be
        compared with the source's first."""
        self.progress("starting QEMU b with -incoming")
        d = self.destination
        d.guest = Guest(self._vm(d, ["-S", "-incoming", f"unix:{self.migration_socket}"]),
                        os.path.join(self.workdir, "b.log"))  # fmt: skip
        d.qmp = Qmp(d.qmp_path)
        wait_for(lambda: d.qmp.execute("query-status")["status"] == "inmigrate", 30,
                 "QEMU b to wait for the migration")  # fmt: skip

    def migrate(self, timeout: float = 180.0) -> dict:
        """Migrate a to b; QEMU's final report. QmpError if QEMU refuses or fails."""
        self.progress("migrating a -> b")
        src = self.source
        src.qmp.execute("migrate", uri=f"unix:{self.migration_socket}")
        info = src.qmp.wait_migration(timeout, self.progress)
        d = self.destination
        wait_for(lambda: d.qmp.execute("query-status")["status"] == "paused", 30,
                 "QEMU b to have the whole guest")  # fmt: skip
        return info

    def resume(self) -> None:
        """Run the guest on b, and announce it there. QEMU announces (SEND_RARP
        to pyvhost) as an incoming migration completes, but b was still paused
        then (-S), when QEMU does not send; management asks again after `cont`,
        as it does after any change of the network's shape."""
        qmp = self.destination.qmp
        qmp.execute("cont")
        qmp.execute("announce-self", initial=50, max=550, rounds=3, step=50)

    def ram_differences(self) -> list[PageDifference]:
        """Guest pages whose contents differ between a (stopped after the
        migration) and b (not yet resumed). Both stopped, so any difference is
        a write the migration lost: by a back-end that did not log it, or by
        the guest's CPU (see PageDifference.written_by_device)."""
        a, b = (_guest_ram(side.guest.pid) for side in (self.source, self.destination))
        differ: list[PageDifference] = []
        step = 1 << 20
        pa, pb = self.source.guest.pid, self.destination.guest.pid
        with open(f"/proc/{pa}/mem", "rb", 0) as fa, open(f"/proc/{pb}/mem", "rb", 0) as fb:
            for off in range(0, min(a[1], b[1]), step):
                fa.seek(a[0] + off)
                fb.seek(b[0] + off)
                ca, cb = fa.read(step), fb.read(step)
                if ca != cb:
                    differ += [PageDifference(off + p, ca[p : p + PAGE], cb[p : p + PAGE])
                               for p in range(0, step, PAGE)
                               if ca[p : p + PAGE] != cb[p : p + PAGE]]  # fmt: skip
        return differ

    def device_ranges(self) -> DeviceRanges:
        """What the source's NIC back-end wrote, as the source QEMU's rings say
        once it stopped (x-query-virtio-queue-status, and the rings in RAM):
        each used ring, and each RX buffer the device returned that the guest
        has not posted again (RxRings.written)."""
        qmp = self.source.qmp
        pid = self.source.guest.pid
        ram, ram_size = _guest_ram(pid)
        found = DeviceRanges([], 0)

        def read(what: str, addr: int, size: int) -> bytes:
            if not 0 <= addr <= ram_size - size:
                raise RuntimeError(f"{what} lies outside RAM")
            mem.seek(ram + addr)
            return mem.read(size)

        with open(f"/proc/{pid}/mem", "rb", 0) as mem:
            for dev in qmp.execute("x-query-virtio"):
                if dev.get("name") != "virtio-net":
                    continue
                path = dev["path"]
                nvqs = qmp.execute("x-query-virtio-status", path=path).get("num-vqs", 0)
                for queue in range(nvqs):
                    q = qmp.execute("x-query-virtio-queue-status", path=path, queue=queue)
                    num = q["vring-num"]
                    if not q.get("vring-used") or not num:
                        continue
                    found.ranges.append((q["vring-used"], used_ring_size(num)))
                    if queue % 2 or (nvqs % 2 and queue == nvqs - 1):
                        continue  # TX (and the control queue): the device only reads
                    name = f"RX queue {queue}'s"
                    rings = RxRings(
                        read(f"{name} descriptors", q["vring-desc"], desc_table_size(num)),
                        read(f"{name} avail ring", q["vring-avail"], avail_ring_size(num)),
                        read(f"{name} used ring", q["vring-used"], used_ring_size(num)),
                        q["last-avail-idx"],
                    )
                    found.ranges += rings.written()
                    found.posted += len(rings.posted())
        return found

    def file_server(self, path: str, port: int, bytes_per_second: float) -> None:
        """Serve `path` once over HTTP from the host side, at a set rate."""
        proc = self.netns.popen(
            sys.executable, "-c", _PACED_SERVER, path, str(port), str(bytes_per_second),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._servers.append(proc)
        wait_for(lambda: f":{port:04X}" in _listening_tcp(self.netns) or proc.poll() is not None,
                 10, f"the file server on port {port}")  # fmt: skip

    def quit(self, side: Side) -> None:
        """End that side's QEMU through QMP (a migrated-away source is paused)."""
        if side.qmp is not None:
            try:
                side.qmp.execute("quit")
            except Exception:  # noqa: BLE001 - it may close the socket before answering
                pass
            side.qmp.close()
            side.qmp = None
        if side.guest is not None:
            side.guest.proc.wait(10)
            side.guest.stop()
            side.guest = None

    def close(self) -> None:
        for side in (self.source, self.destination):
            if side.qmp is not None:
                side.qmp.close()
                side.qmp = None
            if side.guest is not None:
                side.guest.kill()
                side.guest = None
        for proc in self._servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._servers.clear()
        for side in (self.source, self.destination):
            if side.pyvhost is not None:
                side.pyvhost.stop()
                side.pyvhost = None
        if self.netns is not None:
            self.netns.delete()  # the bridge goes with it
            self.netns = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> MigrationLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
