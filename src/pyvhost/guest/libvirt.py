"""libvirt domain XML for a NIC on pyvhost.

What libvirt needs, as the domain elements that say it:
- guest RAM the back-end can map: <memoryBacking> with a memfd source and
  shared access (QEMU's memory-backend-memfd,share=on);
- the NIC: <interface type='vhostuser'> whose <source mode> is QEMU's side of
  the socket. mode='client' pairs with `pyvhost net --socket-path` (pyvhost
  listens; <reconnect> brings QEMU back to a restarted pyvhost); mode='server'
  pairs with `pyvhost net --client` (QEMU listens, pyvhost connects and keeps
  reconnecting as the domain is destroyed and started);
- with Debian 12's QEMU 7.2 under TCG, no MSI-X on this device (it crashes in
  vhost_net_start): a <qemu:override> sets the device's vectors to 0.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NIC_ALIAS = "ua-pyvhost0"  # user aliases start with ua-; the override finds the NIC by it
ET.register_namespace("qemu", QEMU_NS)


@dataclass
class LibvirtNic:
    socket: str
    pyvhost_client: bool = False  # pyvhost net --client: QEMU listens
    queues: int = 1
    mac: str = "52:54:00:12:34:56"
    reconnect: int = 1
    msix: bool = True


def memory_backing() -> ET.Element:
    mb = ET.Element("memoryBacking")
    ET.SubElement(mb, "source", type="memfd")
    ET.SubElement(mb, "access", mode="shared")
    return mb


def interface(nic: LibvirtNic) -> ET.Element:
    iface = ET.Element("interface", type="vhostuser")
    ET.SubElement(iface, "mac", address=nic.mac)
    mode = "server" if nic.pyvhost_client else "client"
    source = ET.SubElement(iface, "source", type="unix", path=nic.socket, mode=mode)
    if mode == "client" and nic.reconnect > 0:
        ET.SubElement(source, "reconnect", enabled="yes", timeout=str(nic.reconnect))
    ET.SubElement(iface, "model", type="virtio")
    if nic.queues > 1:
        ET.SubElement(iface, "driver", queues=str(nic.queues))
    ET.SubElement(iface, "alias", name=NIC_ALIAS)
    return iface


def msix_override() -> ET.Element:
    """<qemu:override> giving the NIC vectors=0 (INTx), for QEMUs that crash with MSI-X."""
    ov = ET.Element(f"{{{QEMU_NS}}}override")
    dev = ET.SubElement(ov, f"{{{QEMU_NS}}}device", alias=NIC_ALIAS)
    fe = ET.SubElement(dev, f"{{{QEMU_NS}}}frontend")
    ET.SubElement(fe, f"{{{QEMU_NS}}}property", name="vectors", type="unsigned", value="0")
    return ov


def snippets(nic: LibvirtNic) -> str:
    """The elements to paste into an existing domain, with where each goes."""
    parts = [
        "<!-- in <domain>: guest RAM pyvhost can map -->",
        _text(memory_backing()),
        "<!-- in <devices> -->",
        _text(interface(nic)),
    ]
    if not nic.msix:
        parts += [
            "<!-- in <domain>, whose start tag needs "
            f"xmlns:qemu='{QEMU_NS}': this QEMU crashes with MSI-X on vhost-user "
            "under TCG -->",
            _text(msix_override()),
        ]
    return "\n".join(parts) + "\n"


def domain(
    name: str,
    nic: LibvirtNic,
    *,
    memory_mib: int = 512,
    kernel: str | None = None,
    initrd: str | None = None,
    cmdline: str = "console=ttyS0",
    console: str | None = None,
) -> str:
    """A whole TCG domain (type='qemu') booting `kernel` directly, with the NIC."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    dom.append(memory_backing())
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if kernel:
        ET.SubElement(os_, "kernel").text = kernel
        if initrd:
            ET.SubElement(os_, "initrd").text = initrd
        ET.SubElement(os_, "cmdline").text = cmdline
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    devices.append(interface(nic))
    if console:
        serial = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(serial, "source", mode="bind", path=console)
        ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    if not nic.msix:
        dom.append(msix_override())
    return _text(dom) + "\n"


def _text(element: ET.Element) -> str:
    ET.indent(element)
    return ET.tostring(element, encoding="unicode")
