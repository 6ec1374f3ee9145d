"""Real Linux guests on one `pyvhost switch`: to each other, to the host, through hooks."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from pyvhost.guest.lab import HOST_IP
from pyvhost.guest.switch_lab import SwitchLab, guest_ip


def loss(output: str) -> int:
    return int(re.search(r"(\d+)% packet loss", output).group(1))


def ping(guest, ip: str, count: int = 3) -> int:
    _, out = guest.run(f"ping -c {count} -W 2 {ip}", timeout=60, check=False)
    return loss(out)


def iperf(guest, ip: str, seconds: int = 2, extra: str = "") -> float:
    import json

    status, out = guest.run(f"iperf3 -c {ip} -t {seconds} -J {extra}", timeout=seconds + 60,
                            check=False)  # fmt: skip
    if "{" not in out:
        return 0.0
    result = json.loads(out[out.index("{") :])
    if "error" in result:
        return 0.0
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


@pytest.fixture
def switch_lab(guest_image, tmp_path):
    labs = []

    def make(vms: int, **kw) -> SwitchLab:
        lab = SwitchLab(vms, image=guest_image, workdir=str(tmp_path), **kw).start()
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


@pytest.mark.slow
def test_three_guests_reach_each_other_and_the_host_and_one_restarts_alone(switch_lab):
    lab = switch_lab(3)
    a, b, c = lab.boot_all()
    assert ping(a, guest_ip(1)) == 0 and ping(b, guest_ip(2)) == 0 and ping(c, guest_ip(0)) == 0
    assert ping(a, HOST_IP) == 0  # through the uplink TAP
    lab.iperf_server(1)
    assert iperf(a, guest_ip(1)) > 0.01
    # vm2 is killed and started again while vm0 keeps pinging vm1.
    a.run(f"ping -c 40 -i 0.25 -W 2 {guest_ip(1)} > /tmp/ping.log 2>&1 &")
    c.kill()
    lab.guests[2] = None
    c = lab.boot(2)
    assert ping(c, guest_ip(0)) == 0  # the restarted guest is back
    a.run("sleep 12; cat /tmp/ping.log", timeout=60)
    _, log = a.run("cat /tmp/ping.log")
    assert loss(log) == 0, log
    ports = lab.stats()["ports"]
    assert ports["vm2"]["sessions"] == 2 and ports["vm0"]["sessions"] == 1


def test_guests_on_different_vlans_cannot_reach_each_other(switch_lab):
    lab = switch_lab(3, switch_args=["--vlan", "vm0=10", "--vlan", "vm1=10", "--vlan", "vm2=20"],
                     uplink=False)  # fmt: skip
    a, b, c = lab.boot_all()
    assert ping(a, guest_ip(1)) == 0  # same VLAN
    assert ping(a, guest_ip(2), count=2) == 100  # another VLAN: not even ARP gets there
    assert ping(c, guest_ip(1), count=2) == 100


def hook_set(lab, port: str, *specs: str) -> None:
    subprocess.run([sys.executable, "-m", "pyvhost", "hook", "--control", lab.control, port,
                    "set", *specs], check=True, capture_output=True)  # fmt: skip


@pytest.mark.slow  # the hooks are Python, the same on every release
def test_the_example_hooks_on_guest_traffic_swapped_at_run_time(switch_lab, tmp_path):
    """Two guests, one switch: each example hook in turn on vm0's port, set and
    replaced while the guests run, and a capture of their traffic."""
    lab = switch_lab(2, uplink=False, env={
        "PYVHOST_ACL": "tcp:5201",
        "PYVHOST_RATE_MBIT": "20", "PYVHOST_BURST_KB": "64",
        "PYVHOST_NAT": f"10.0.2.99={guest_ip(1)}",
    })  # fmt: skip
    a, b = lab.boot_all()
    lab.iperf_server(1, 5201)
    lab.iperf_server(1, 5202)
    assert iperf(a, guest_ip(1)) > 0.01  # no hooks yet

    # The ACL: iperf3's port is blocked, ping and another port pass.
    hook_set(lab, "vm0", "examples.acl:hook")
    assert ping(a, guest_ip(1)) == 0
    assert iperf(a, guest_ip(1), extra="-p 5201 --connect-timeout 3000") == 0.0
    assert iperf(a, guest_ip(1), extra="-p 5202") > 0.01
    assert lab.stats()["ports"]["vm0"]["drops"].get("hook", 0) > 0

    # The rate limiter: vm1 to vm0 (through vm0's "out"), held to 20 Mbit/s.
    hook_set(lab, "vm0", "examples.ratelimit:hook")
    limited = iperf(a, guest_ip(1), extra="-R")
    assert 0.0 < limited < 0.030, f"{limited * 1000:.1f} Mbit/s through a 20 Mbit/s limit"

    # The rewriter: 10.0.2.99 is vm1, ARP, ICMP and TCP checksums included.
    hook_set(lab, "vm0", "examples.rewrite:hook")
    assert ping(a, "10.0.2.99") == 0
    assert iperf(a, "10.0.2.99") > 0.01
    _, neigh = a.run("ip neigh show 10.0.2.99")
    assert "52:54:00:12:34:57" in neigh  # vm1's MAC answered for the virtual address

    # A capture of the guests' traffic, read by tcpdump.
    hook_set(lab, "vm0")
    pcap = tmp_path / "guests.pcapng"
    cap = subprocess.Popen([sys.executable, "-m", "pyvhost", "capture", "--control", lab.control,
                            "--port", "vm0", "-w", str(pcap), "--seconds", "8"])  # fmt: skip
    time.sleep(1)
    assert ping(a, guest_ip(1), count=3) == 0
    assert cap.wait(30) == 0
    out = subprocess.run(["tcpdump", "-nn", "-r", str(pcap), "icmp"], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ICMP echo request") >= 3 and out.stdout.count("ICMP echo reply") >= 3
