"""Live migration of a Linux guest between two QEMUs, each on its own pyvhost,
while a TCP transfer into the guest runs (issue 10, part 3).

The RAM comparison catches a lost write only if pyvhost wrote a page in the
migration's last moments that the guest did not touch again before it
stopped (the guest itself dirties most RX pages as it takes the frames);
tests/net/test_migration.py checks the log page by page for that. It counts
a differing page against pyvhost if the bytes that differ lie in a used ring
or in an RX buffer the device returned and the guest has not posted again,
unless the page is one of the received file's pages whole (the guest's page
cache). A buffer posted and not yet taken holds whatever the guest's CPU last
left in that memory: not the device's. Other differences are the guest's CPU
writes (received data it copied to wget included), which QEMU
under TCG loses now and then by itself (seen with QEMU 7.2 and its own
user-mode virtio-net, no pyvhost: 1 page in 16 migrations)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import warnings

import pytest

from pyvhost.guest.lab import HOST_IP
from pyvhost.guest.migration_lab import GUEST_MAC, PAGE, MigrationLab
from pyvhost.guest.qemu import GuestError
from pyvhost.guest.qmp import QmpError
from pyvhost.testing.processes import wait_for

FILE_BYTES = 24 << 20
RATE = 3 << 20  # bytes/s: the transfer takes ~8 s, the migration happens inside it
ETH_P_RARP = 0x8035
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@pytest.fixture
def migration_lab(guest_image, tmp_path):
    labs = []

    def make(**kwargs) -> MigrationLab:
        workdir = tmp_path / f"lab{len(labs)}"  # a second lab's sockets beside none of the first's
        workdir.mkdir()
        lab = MigrationLab(image=guest_image, workdir=str(workdir), **kwargs).start()
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


class RarpCapture:
    """RARP frames seen on an interface in the namespace (a packet socket).

    ETH_P_ALL, not ETH_P_RARP: on a bridge port, only "all protocols" taps see
    a frame before the bridge takes it."""

    def __init__(self, netns, ifname: str) -> None:
        with netns.entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, (_, _, pkttype, _, _) = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            # Sent into the TAP by its pyvhost, not flooded out to it by the bridge.
            if pkttype != PACKET_OUTGOING and frame[12:14] == ETH_P_RARP.to_bytes(2, "big"):
                self.frames.append(frame)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class QemuLostGuestPages(Exception):
    """QEMU lost pages the guest's CPU wrote (TCG's dirty tracking), and the
    guest on the destination then failed: QEMU's fault, not pyvhost's."""


def test_a_guest_migrates_mid_transfer_and_the_source_lets_go(migration_lab, tmp_path):
    data = os.urandom(FILE_BYTES)
    path = tmp_path / "payload"
    path.write_bytes(data)
    # Again with fresh QEMUs only when QEMU corrupted the guest itself (seen
    # in 1 run of 5 here): any other failure, and a third corruption, fail.
    for attempt in range(3):
        lab = migration_lab()
        try:
            migrate_mid_transfer(lab, str(path), data)
            return
        except QemuLostGuestPages as e:
            if attempt == 2:
                raise
            lab.close()  # this pair goes before the next starts
            warnings.warn(f"{e}; again with a fresh pair of QEMUs", stacklevel=1)


def migrate_mid_transfer(lab: MigrationLab, path: str, data: bytes) -> None:
    lab.file_server(path, 8080, RATE)
    guest = lab.boot_source()
    lab.start_destination()
    rarp = RarpCapture(lab.netns, lab.destination.ifname)
    try:
        guest.run(
            f"(wget -q -O /tmp/payload http://{HOST_IP}:8080/payload; echo $? >/tmp/wget.status)"
            " >/dev/null 2>&1 &"
        )
        # Wait until the transfer is under way, then migrate in the middle of it.
        wait_for(lambda: int(guest.run("wc -c </tmp/payload || echo 0", check=False)[1]
                             .split()[-1]) > 2 << 20, 30, "the transfer to start")  # fmt: skip
        info = lab.migrate()
        assert info["status"] == "completed"
        # Both QEMUs stopped: b's RAM must be a's where pyvhost writes. A page
        # pyvhost wrote during the migration and did not log would differ. The
        # guest's own CPU writes are QEMU's to track, and TCG loses a few (the
        # same with QEMU's own virtio-net and no pyvhost): reported, not failed.
        differences = lab.ram_differences()
        device = lab.device_ranges()
        assert device.posted > 0, "QEMU's rings name no RX buffers posted for the NIC"
        # A page that holds one of the file's pages whole, at its place in the
        # file, is the guest's page cache of /tmp/payload: wget's write, by the
        # CPU. It may lie where a stale descriptor still names a freed RX buffer
        # (the table keeps the addresses of buffers the guest took back).
        cached = file_pages(data)
        lost = [d for d in differences
                if d.source not in cached and d.written_by_device(device.ranges)]  # fmt: skip
        assert lost == [], "pages pyvhost wrote and the migration lost: " + "; ".join(
            f"{d.address:#x} bytes {d.spans()} source {d.source[:32].hex()}" for d in lost
        )
        if differences:
            in_cache = sum(d.source in cached for d in differences)
            warnings.warn(f"{len(differences)} guest pages written by the guest's CPU were "
                          f"lost by QEMU's own dirty tracking (TCG), {in_cache} of them "
                          "pages of the received file", stacklevel=1)  # fmt: skip
        lab.resume()
        try:
            check_the_transfer_ends_intact(lab.destination.guest, data)
        except GuestError as e:
            console = "\n".join(lab.destination.guest.transcript)
            if differences and "Kernel panic" in console:
                raise QemuLostGuestPages(
                    f"the guest panicked after QEMU lost {len(differences)} of its pages"
                ) from e
            raise
    finally:
        rarp.close()
    # pyvhost b announced the guest's new place (SEND_RARP) on its TAP.
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    assert any(f[6:12] == mac and f[12:14] == b"\x80\x35" for f in rarp.frames), rarp.frames
    # The source QEMU leaves; pyvhost a holds nothing of it.
    src = lab.source
    lab.quit(src)
    wait_for(lambda: not src.pyvhost.maps("memfd:"), 10, "pyvhost a to unmap guest memory")
    wait_for(lambda: src.pyvhost.fds() == src.idle_fds, 10, "pyvhost a to close the fds")


def file_pages(data: bytes) -> set[bytes]:
    """The file's pages as a page cache holds them: 4 KiB from each multiple of
    4 KiB, the last one padded with zeros."""
    return {data[i : i + PAGE].ljust(PAGE, b"\0") for i in range(0, len(data), PAGE)}


def check_the_transfer_ends_intact(moved, data: bytes) -> None:
    """The transfer goes on from the destination and finishes intact. Polled
    once a second: a TCG guest busy with the transfer reads its console
    slowly, and a burst of commands overran its UART (a command arrived as
    "atus")."""
    status: list[str] = []

    def transfer_ended() -> bool:
        code, out = moved.run("cat /tmp/wget.status", check=False)
        if code == 0 and out.strip():
            status.append(out.strip().splitlines()[-1])
            return True
        time.sleep(1)
        return False

    wait_for(transfer_ended, 60, "the transfer to end")
    assert status[-1] == "0"  # wget's exit status
    got = moved.run("sha256sum /tmp/payload")[1].split()[0]
    assert got == hashlib.sha256(data).hexdigest()
    moved.run(f"ping -c 3 -W 2 {HOST_IP}")


def test_with_no_migration_qemu_refuses_to_migrate(migration_lab):
    lab = migration_lab(pyvhost_args=["--no-migration"])
    lab.boot_source()
    # QEMU names LOG_SHMFD or VHOST_F_LOG_ALL, whichever it checks first: both are off.
    with pytest.raises(QmpError, match=r"Migration disabled: vhost.* lacks"):
        lab.migrate(timeout=30)
    lab.source.guest.run(f"ping -c 1 -W 2 {HOST_IP}")  # the guest runs on, on its source
