"""Build (once) and cache the guest: a Debian kernel and a busybox initramfs.

Everything comes from Debian's packages: the kernel package is fetched with
`apt-get download` and unpacked with `dpkg -x` (nothing installed), busybox
is busybox-static, iperf3 goes in with the libraries it links. The result
lives under the user's cache directory and is rebuilt only when missing.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyvhost.errors import PyvhostError

# Bump when what goes into the image changes: old caches are then rebuilt.
IMAGE_VERSION = 2
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
BUSYBOX = "/bin/busybox"
GUEST_BINARIES = ("/usr/bin/iperf3",)
INIT = Path(__file__).with_name("init.sh")
PT_INTERP = 3


class GuestImageError(PyvhostError):
    """The guest image cannot be built: says what is missing and how to get it."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    version: str


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyvhost"


def missing_tools() -> list[tuple[str, str]]:
    """(what, Debian package) for every host tool the guest needs and lacks."""
    out = []
    for path, pkg in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        (BUSYBOX, "busybox-static"),
        ("iperf3", "iperf3"),
        ("apt-get", "apt"),
        ("dpkg", "dpkg"),
        ("ip", "iproute2"),
    ):
        if shutil.which(path) is None:
            out.append((path, pkg))
    if not out and not is_static_elf(BUSYBOX):
        out.append((BUSYBOX + " (static)", "busybox-static"))
    return out


def is_static_elf(path: str) -> bool:
    """True if the ELF file asks for no dynamic loader (no PT_INTERP segment)."""
    with open(os.path.realpath(path), "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # ELF, 64-bit
            return False
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != PT_INTERP for i in range(phnum))


def kernel_package() -> str:
    """The newest linux-image-6.1.0-N-amd64 apt knows of."""
    r = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
    )
    m = re.search(r"Depends: (linux-image-6\.1\.0-\d+-amd64)\b", r.stdout)
    if m:
        return m.group(1)
    r = subprocess.run(
        ["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"],
        capture_output=True,
        text=True,
    )
    names = re.findall(r"^(linux-image-6\.1\.0-(\d+)-amd64) ", r.stdout, re.M)
    if not names:
        raise GuestImageError(
            "apt knows no linux-image-6.1.0-*-amd64 package: run 'apt-get update' first"
        )
    return max(names, key=lambda n: int(n[1]))[0]


def ensure_image(progress: Callable[[str], None] = lambda msg: None) -> GuestImage:
    """The cached guest image, built first if missing."""
    missing = missing_tools()
    if missing:
        pkgs = " ".join(sorted({p for _, p in missing}))
        raise GuestImageError(
            f"missing {', '.join(w for w, _ in missing)}: install with 'apt-get install {pkgs}'"
        )
    pkg = kernel_package()
    root = cache_dir() / f"guest-{pkg}-v{IMAGE_VERSION}"
    image = GuestImage(root / "vmlinuz", root / "initramfs.cpio.gz", pkg)
    if image.kernel.exists() and image.initrd.exists():
        return image
    progress(f"building the guest image ({pkg}) in {root}")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyvhost-guest-") as tmp:
        progress(f"downloading {pkg} with apt-get download")
        r = subprocess.run(["apt-get", "download", pkg], cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise GuestImageError(
                f"apt-get download {pkg} failed: {r.stderr.strip().splitlines()[-1:]} "
                "(run 'apt-get update' and check the network to the Debian mirror)"
            )
        deb = next(Path(tmp).glob("linux-image-*.deb"))
        progress("unpacking the kernel and its virtio modules (dpkg -x)")
        subprocess.run(["dpkg", "-x", str(deb), os.path.join(tmp, "x")], check=True)
        x = Path(tmp) / "x"
        vmlinuz = next((x / "boot").glob("vmlinuz-*"))
        kver = vmlinuz.name.removeprefix("vmlinuz-")
        modules = {}
        for ko in (x / "lib" / "modules" / kver).rglob("*.ko"):
            if ko.stem in MODULES:
                modules[ko.stem] = ko.read_bytes()
        absent = [m for m in MODULES if m not in modules]
        if absent:
            raise GuestImageError(f"{pkg} lacks the modules {absent}")
        progress("writing the initramfs (busybox, iperf3, virtio modules)")
        initrd = build_initramfs(modules)
        tmp_kernel = image.kernel.with_suffix(".tmp")
        shutil.copyfile(vmlinuz, tmp_kernel)
        tmp_initrd = image.initrd.with_suffix(".tmp")
        tmp_initrd.write_bytes(initrd)
        os.replace(tmp_kernel, image.kernel)  # complete files only, even if interrupted
        os.replace(tmp_initrd, image.initrd)
    progress("guest image ready")
    return image


def shared_libraries(binary: str) -> list[str]:
    r = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def build_initramfs(modules: dict[str, bytes]) -> bytes:
    cpio = Cpio()
    for d in (
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "lib64",
        "usr",
        "usr/bin",
        "etc",
        "run",
    ):
        cpio.directory(d)
    cpio.file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
    cpio.file("init", INIT.read_bytes(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n", 0o644)
    cpio.file("etc/group", b"root:x:0:\n", 0o644)
    for name, data in modules.items():
        cpio.file(f"lib/modules/{name}.ko", data, 0o644)
    seen = set()
    for binary in GUEST_BINARIES:
        cpio.file(binary.lstrip("/"), Path(binary).read_bytes(), 0o755)
        for lib in shared_libraries(binary):
            real = os.path.realpath(lib)
            for path in (lib, real):
                if path not in seen:
                    seen.add(path)
                    # Shallowest first: the kernel's unpacker makes no missing parents.
                    for parent in reversed(Path(path.lstrip("/")).parents):
                        if str(parent) != ".":
                            cpio.directory(str(parent))
            cpio.file(real.lstrip("/"), Path(real).read_bytes(), 0o755)
            if lib != real:
                cpio.symlink(lib.lstrip("/"), real)
    return gzip.compress(cpio.finish(), compresslevel=6)


class Cpio:
    """A newc-format cpio archive, as the kernel unpacks into its initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        name_b = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name_b)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def directory(self, name: str) -> None:
        if name not in self.dirs:
            self.dirs.add(name)
            self._entry(name, stat.S_IFDIR | 0o755, b"")

    def file(self, name: str, data: bytes, perm: int) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.buf.getvalue()
