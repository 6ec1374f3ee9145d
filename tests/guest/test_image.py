"""The guest builder: which kernel, which modules, in which order."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from pyvhost.guest.image import (
    GuestImageError,
    kernel_from_depends,
    load_order,
    module_depends,
)


def fake_module(depends: str) -> bytes:
    """A minimal ELF64 file whose .modinfo says depends=`depends`."""
    modinfo = b"license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.12\0"
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    strtab_off = data_off + len(modinfo)
    shoff = (strtab_off + len(shstrtab) + 7) & ~7
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    body = header + modinfo + shstrtab
    body += bytes(shoff - len(body))
    sections = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_off, len(modinfo), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0),
    ]
    return body + b"".join(sections)


def write(tree: Path, rel: str, data: bytes) -> None:
    path = tree / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_module_depends_reads_modinfo():
    assert module_depends(fake_module("virtio,virtio_ring")) == ["virtio", "virtio_ring"]
    assert module_depends(fake_module("")) == []


def test_dependencies_load_first_and_each_once(tmp_path):
    write(tmp_path, "kernel/net/virtio_net.ko", fake_module("net_failover,virtio"))
    write(tmp_path, "kernel/net/net_failover.ko", fake_module("failover"))
    write(tmp_path, "kernel/net/failover.ko", fake_module(""))
    write(tmp_path, "kernel/virtio/virtio.ko", fake_module(""))
    write(tmp_path, "kernel/virtio/virtio_pci.ko", fake_module("virtio"))
    order = [n for n, _ in load_order(tmp_path, ("virtio_pci", "virtio_net"))]
    assert order == ["virtio", "virtio_pci", "failover", "net_failover", "virtio_net"]


def test_built_in_modules_are_skipped_and_compressed_ones_unpacked(tmp_path):
    """Debian 13: virtio is built in, and modules ship as .ko.xz (or .gz)."""
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    net = fake_module("virtio,failover")
    write(tmp_path, "kernel/net/virtio_net.ko.xz", lzma.compress(net))
    write(tmp_path, "kernel/net/failover.ko.gz", gzip.compress(fake_module("")))
    order = load_order(tmp_path, ("virtio_net",))
    assert [n for n, _ in order] == ["failover", "virtio_net"]
    assert order[1][1] == net  # decompressed, as insmod needs it


def test_a_missing_module_names_what_needed_it(tmp_path):
    write(tmp_path, "kernel/net/virtio_net.ko", fake_module("net_failover"))
    with pytest.raises(GuestImageError, match="no module net_failover \\(needed by virtio_net\\)"):
        load_order(tmp_path, ("virtio_net",))


@pytest.mark.parametrize(
    "depends, package",
    [
        (
            "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n",
            "linux-image-6.1.0-56-amd64",
        ),
        (
            "linux-image-amd64\n  Depends: linux-image-6.12.117+deb13-amd64\n",
            "linux-image-6.12.117+deb13-amd64",
        ),
    ],
)
def test_the_kernel_is_whatever_the_metapackage_depends_on(depends, package):
    assert kernel_from_depends(depends) == package


def test_no_metapackage_says_to_update_apt():
    with pytest.raises(GuestImageError, match="apt-get update"):
        kernel_from_depends("")
