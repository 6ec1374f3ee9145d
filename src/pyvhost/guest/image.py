"""Build (once) and cache the guest: a Debian kernel and a busybox initramfs.

Everything comes from Debian's packages: the kernel package is fetched with
`apt-get download` and unpacked with `dpkg -x` (nothing installed), busybox
is busybox-static, iperf3 goes in with the libraries it links. The result
lives under the user's cache directory and is rebuilt only when missing.
"""

from __future__ import annotations

import gzip
import io
import lzma
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
IMAGE_VERSION = 6
# Modules each guest role needs, by name; their dependencies are found in the
# modules themselves (.modinfo), so the load order fits whatever kernel
# version the distribution ships. Built-in ones (modules.builtin) are skipped.
MODULE_SETS = {
    # The demo's guest: a virtio-net NIC on PCI.
    "net": ("virtio_pci", "virtio_net"),
    # A guest that runs the host's own root (virtio-9p) with the kernel's
    # vhost-net inside, for the vhost=on tests and benchmarks.
    "vhost": ("9pnet_virtio", "9p", "vhost_net", "tun", "tap"),
}
BUSYBOX = "/bin/busybox"
GUEST_BINARIES = ("/usr/bin/iperf3",)
# Loaded with dlopen, so ldd does not list them: glibc's pthread_cancel needs
# libgcc_s for unwinding (Debian 13's iperf3 aborts without it).
DLOPENED = ("libgcc_s.so.1",)
INIT = Path(__file__).with_name("init.sh")
PT_INTERP = 3
KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


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
    """The kernel package Debian's linux-image-amd64 depends on (any release)."""
    r = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
    )
    return kernel_from_depends(r.stdout if r.returncode == 0 else "")


def kernel_from_depends(depends: str) -> str:
    """The linux-image-*-amd64 package in `apt-cache depends linux-image-amd64`."""
    if "Depends:" not in depends:
        raise GuestImageError(
            "apt knows no linux-image-amd64 (the package that names Debian's current "
            "kernel): run 'apt-get update' first, with Debian's main archive in "
            "/etc/apt/sources.list"
        )
    m = re.search(r"Depends: (linux-image-\S+-amd64)$", depends, re.M)
    if m is None:
        raise GuestImageError(
            "linux-image-amd64 depends on no linux-image-*-amd64 package here:\n" + depends.strip()
        )
    return m.group(1)


def read_module(path: Path) -> bytes:
    """A kernel module's ELF, decompressed (Debian 13 ships them as .ko.xz)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise GuestImageError(
                f"{path.name} is zstd-compressed: install zstd (apt-get install zstd)"
            )
        r = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True)
        return r.stdout
    return data


def module_name(path: Path) -> str:
    name = path.name
    for suffix in KO_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("-", "_")


def elf_section(elf: bytes, wanted: str) -> bytes:
    """The contents of section `wanted` of a 64-bit little-endian ELF file."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestImageError("a kernel module is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    _, _, _, _, names_off, names_size = sections[shstrndx]
    names = elf[names_off : names_off + names_size]
    for name_off, _, _, _, offset, size in sections:
        if names[name_off : names.index(b"\0", name_off)].decode() == wanted:
            return elf[offset : offset + size]
    return b""


def module_depends(elf: bytes) -> list[str]:
    """The modules a module needs loaded first (its .modinfo "depends=")."""
    for field in elf_section(elf, ".modinfo").split(b"\0"):
        if field.startswith(b"depends="):
            return [d.replace("-", "_") for d in field[8:].decode().split(",") if d]
    return []


def load_order(tree: Path, roots: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(name, module) for `roots` and everything they depend on, dependencies
    first; modules built into the kernel are left out."""
    available = {module_name(p): p for p in tree.rglob("*.ko*") if p.name.endswith(KO_SUFFIXES)}
    builtin_file = tree / "modules.builtin"
    builtin = (
        {module_name(Path(line)) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, needed_by: str) -> None:
        if name in done or name in builtin:
            return
        if name not in available:
            raise GuestImageError(
                f"the kernel has no module {name} (needed by {needed_by}) and does not build it in"
            )
        done.add(name)
        elf = read_module(available[name])
        for dep in module_depends(elf):
            visit(dep, name)
        order.append((name, elf))

    for root in roots:
        visit(root, "the guest")
    return order


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
        progress("unpacking the kernel and its modules (dpkg -x)")
        subprocess.run(["dpkg", "-x", str(deb), os.path.join(tmp, "x")], check=True)
        x = Path(tmp) / "x"
        vmlinuz = next((x / "boot").glob("vmlinuz-*"))
        kver = vmlinuz.name.removeprefix("vmlinuz-")
        # Debian 13 ships modules under /usr (merged /usr), Debian 12 under /lib.
        tree = next(
            (t for t in (x / "lib", x / "usr" / "lib") if (t / "modules" / kver).is_dir()), None
        )
        if tree is None:
            raise GuestImageError(f"{pkg} has no lib/modules/{kver} or usr/lib/modules/{kver}")
        tree = tree / "modules" / kver
        sets = {role: load_order(tree, roots) for role, roots in MODULE_SETS.items()}
        progress("writing the initramfs (busybox, iperf3, the modules in load order)")
        initrd = build_initramfs(sets)
        tmp_kernel = image.kernel.with_suffix(".tmp")
        shutil.copyfile(vmlinuz, tmp_kernel)
        tmp_initrd = image.initrd.with_suffix(".tmp")
        tmp_initrd.write_bytes(initrd)
        os.replace(tmp_kernel, image.kernel)  # complete files only, even if interrupted
        os.replace(tmp_initrd, image.initrd)
    progress("guest image ready")
    return image


def shared_libraries(binary: str) -> list[str]:
    """The libraries `binary` links, and those glibc loads behind its back."""
    r = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True)
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs + [lib for lib in map(find_library, DLOPENED) if lib is not None]


def find_library(soname: str) -> str | None:
    """Where the dynamic loader would find `soname` (ldconfig's cache)."""
    r = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True)
    m = re.search(rf"^\s*{re.escape(soname)} \(libc6,x86-64\) => (\S+)$", r.stdout, re.M)
    return m.group(1) if m else None


def build_initramfs(module_sets: dict[str, list[tuple[str, bytes]]]) -> bytes:
    """The initramfs: busybox, init, iperf3 and its libraries, and per role a
    list of modules in load order (lib/modules/ROLE.order) that init loads."""
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
    written: set[str] = set()
    for role, modules in module_sets.items():
        for name, data in modules:
            if name not in written:
                written.add(name)
                cpio.file(f"lib/modules/{name}.ko", data, 0o644)
        order = "".join(f"{name}\n" for name, _ in modules)
        cpio.file(f"lib/modules/{role}.order", order.encode(), 0o644)
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
