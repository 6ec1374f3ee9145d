"""`pyvhost switch` through real vhost-user sockets: the Python front-end plays the VMs."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from pyvhost.capture import read_pcapng
from pyvhost.control import request
from pyvhost.devices.net import spec
from pyvhost.frontend.net import WANTED_FEATURES, NetFrontend
from pyvhost.testing.frames import gso_header, tcp4_frame

A, B, C = (bytes.fromhex(f"5254000000{i:02x}") for i in (1, 2, 3))
BCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"


def eth(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + ETHERTYPE + payload


def received(fe: NetFrontend, n: int = 1, timeout: float = 3.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += [f for f in fe.receive(timeout=0.1, count=n) if f[12:14] in (ETHERTYPE, b"\x08\x00")]
    return got


def nothing(fe: NetFrontend) -> bool:
    return received(fe, 1, timeout=0.3) == []


def stats(sw) -> dict:
    return request(sw.control, {"cmd": "stats"})["ports"]


@pytest.fixture
def vms(switch):
    opened = []

    def connect(sw, name: str, **kw) -> NetFrontend:
        fe = NetFrontend.connect(sw.sockets[name], **kw)
        fe.post_rx()
        opened.append(fe)
        return fe

    yield connect
    for fe in opened:
        fe.close()


def test_unknown_unicast_floods_then_the_answer_is_switched(switch, vms):
    sw = switch()
    a, b, c = (vms(sw, n) for n in "abc")
    a.send(eth(B, A, b"who"))
    assert received(b) == [eth(B, A, b"who")] and received(c) == [eth(B, A, b"who")]
    b.send(eth(A, B, b"me"))
    assert received(a) == [eth(A, B, b"me")] and nothing(c)  # A was learned on a
    a.send(eth(B, A, b"again"))
    assert received(b) == [eth(B, A, b"again")] and nothing(c)
    s = stats(sw)
    assert s["a"]["rx_packets"] == 2 and s["b"]["tx_packets"] == 2 and s["c"]["tx_packets"] == 1
    assert s["a"]["host_io"] == {"rx": "switch", "tx": "switch"}  # frames go through the fabric


def test_access_vlans_keep_vms_apart(switch, vms):
    sw = switch("--vlan", "a=10", "--vlan", "b=10", "--vlan", "c=20")
    a, b, c = (vms(sw, n) for n in "abc")
    a.send(eth(BCAST, A, b"ten"))
    assert received(b) == [eth(BCAST, A, b"ten")] and nothing(c)
    c.send(eth(BCAST, C, b"twenty"))
    assert nothing(a) and nothing(b)


def test_a_vm_that_leaves_and_comes_back_does_not_disturb_the_others(switch, vms):
    sw = switch()
    a, b = vms(sw, "a"), vms(sw, "b")
    c = NetFrontend.connect(sw.sockets["c"])
    c.post_rx()
    c.close()  # c leaves
    for i in range(3):
        a.send(eth(BCAST, A, b"still %d" % i))
        assert received(b) == [eth(BCAST, A, b"still %d" % i)]
    c = vms(sw, "c")  # and comes back on the same socket
    a.send(eth(BCAST, A, b"welcome"))
    assert received(c) == [eth(BCAST, A, b"welcome")]
    assert stats(sw)["c"]["up"] is True


def test_tso_frames_stay_whole_where_taken_and_are_segmented_where_not(switch, vms):
    sw = switch("--mtu", "a=65535")
    a = vms(sw, "a")
    b = vms(sw, "b", rx_buf_size=2048)  # takes GUEST_TSO4: a merged 64 KiB frame
    no_offloads = WANTED_FEATURES & ~(
        1 << spec.F_GUEST_CSUM | 1 << spec.F_GUEST_TSO4 | 1 << spec.F_GUEST_TSO6
    )
    c = vms(sw, "c", features=no_offloads)
    big = tcp4_frame(60000, A, BCAST)
    a.send(big, header=gso_header(a.hdr_size))
    [whole] = received(b)
    assert whole == big  # one copy, ring to ring, offload kept
    segments = received(c, 42, timeout=5)
    assert len(segments) == 42 and max(len(s) for s in segments) <= 1514
    assert b"".join(s[54:] for s in segments) == big[54:]


def test_hooks_drop_replace_and_redirect_and_a_broken_one_is_survived(switch, vms):
    sw = switch(
        "--hook", "a=tests.switch.sample_hooks:drop_marked",
        "--hook", "a=tests.switch.sample_hooks:broken",
        "--hook", "a=tests.switch.sample_hooks:to_c",
        "--hook", "b=tests.switch.sample_hooks:shout",
    )  # fmt: skip
    a, b, c = (vms(sw, n) for n in "abc")
    a.send(eth(BCAST, A, b"DROP"))
    assert nothing(b) and nothing(c)
    a.send(eth(BCAST, A, b"quiet"))
    assert received(b) == [eth(BCAST, A, b"QUIET")] and received(c) == [eth(BCAST, A, b"quiet")]
    a.send(eth(BCAST, A, b"toc"))
    assert received(c) == [eth(BCAST, A, b"toc")] and nothing(b)
    a.send(eth(BCAST, A, b"boom"))
    assert nothing(b)
    a.send(eth(BCAST, A, b"after"))
    assert received(b) == [eth(BCAST, A, b"after")]
    drops = stats(sw)["a"]["drops"]
    assert drops == {"hook": 1, "hook-error": 1}


def test_hooks_are_added_and_removed_at_run_time(switch, vms):
    sw = switch()
    a, b = vms(sw, "a"), vms(sw, "b")
    a.send(eth(BCAST, A, b"DROP"))
    assert received(b) == [eth(BCAST, A, b"DROP")]
    run = [sys.executable, "-m", "pyvhost", "hook", "--control", sw.control, "a"]
    out = subprocess.run(
        [*run, "add", "tests.switch.sample_hooks:drop_marked"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "drop_marked" in out.stdout, out.stderr
    a.send(eth(BCAST, A, b"DROP"))
    assert nothing(b)
    subprocess.run([*run, "remove", "tests.switch.sample_hooks:drop_marked"], check=True)
    a.send(eth(BCAST, A, b"DROP"))
    assert received(b) == [eth(BCAST, A, b"DROP")]
    bad = subprocess.run([*run, "add", "no.such.module:fn"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot import no.such.module" in bad.stderr


def test_a_capture_is_pcapng_that_tcpdump_reads(switch, vms, tmp_path):
    sw = switch()
    a, b = vms(sw, "a"), vms(sw, "b")
    pcap = tmp_path / "cap.pcapng"
    cap = subprocess.Popen(
        [sys.executable, "-m", "pyvhost", "capture", "--control", sw.control, "--port", "a",
         "-w", str(pcap),
         "-c", "6"], stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1)
    for i in range(3):
        a.send(eth(B, A, b"cap %d" % i))
        b.send(eth(A, B, b"back %d" % i))
    assert cap.wait(10) == 0, cap.stderr.read()
    out = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(pcap)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if " > " in line]  # not the hex dumps
    assert len(lines) == 6
    assert sum("52:54:00:00:00:01 > 52:54:00:00:00:02" in line for line in lines) == 3
    assert sum("52:54:00:00:00:02 > 52:54:00:00:00:01" in line for line in lines) == 3
    packets = read_pcapng(pcap.read_bytes())
    assert {(name, d) for name, d, f in packets if f[6:12] == A} == {("a", "in")}
    assert {(name, d) for name, d, f in packets if f[6:12] == B} == {("a", "out")}


def test_a_bad_config_file_is_refused_naming_its_line_and_key(tmp_path):
    toml = tmp_path / "switch.toml"
    toml.write_text(
        'control = "ctl"\n\n[ports.vm1]\nsocket = "vm1.sock"\nvlan = 5000\n'
        '\n[ports.vm2]\nsocket = "vm2.sock"\ncolour = "blue"\n'
    )
    r = subprocess.run([sys.executable, "-m", "pyvhost", "switch", "--config", str(toml)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2
    assert f"{toml} line 5: ports.vm1.vlan: 5000 is not a number from 1 to 4094" in r.stderr
    toml.write_text(toml.read_text().replace("5000", "10"))
    r = subprocess.run([sys.executable, "-m", "pyvhost", "switch", "--config", str(toml)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and f"{toml} line 9: ports.vm2.colour: unknown key" in r.stderr
    assert not list(tmp_path.glob("*.sock"))  # refused before anything was opened


def test_a_config_file_sets_up_ports_vlans_and_hooks(tmp_path, vms):
    toml = tmp_path / "switch.toml"
    toml.write_text(f"""
control = "{tmp_path}/ctl"
[ports.a]
socket = "{tmp_path}/a.sock"
vlan = 7
hooks = ["tests.switch.sample_hooks:drop_marked"]
[ports.b]
socket = "{tmp_path}/b.sock"
vlan = 7
[ports.c]
socket = "{tmp_path}/c.sock"
vlan = 8
""")
    from pyvhost.testing.processes import PyvhostProcess

    proc = PyvhostProcess(["switch", "--config", str(toml)], str(tmp_path / "ctl"))
    try:
        sw = type("S", (), {"sockets": {p: str(tmp_path / f"{p}.sock") for p in "abc"}})
        a, b, c = (vms(sw, n) for n in "abc")
        a.send(eth(BCAST, A, b"DROP"))
        a.send(eth(BCAST, A, b"seven"))
        assert received(b) == [eth(BCAST, A, b"seven")] and nothing(c)
    finally:
        status, _, err = proc.stop()
    assert status == 0, err


def test_an_uplink_tap_joins_the_vms_to_the_host_side(switch, vms):
    from pyvhost.testing.netns import NetNamespace

    ifname = "pvup" + uuid.uuid4().hex[:6]
    host_mac = bytes.fromhex("02000000aa01")
    with NetNamespace() as ns:
        sw = switch("--uplink", f"up={'tap'},ifname={ifname}", ports=("a", "b"))
        ns.adopt(ifname, mac=host_mac.hex(":"), ipv6=False)
        host = ns.packet_socket(ifname)
        host.settimeout(3)
        a = vms(sw, "a")
        a.send(eth(host_mac, A, b"to the host"))
        while (got := host.recv(2000))[12:14] != ETHERTYPE:
            pass
        assert got == eth(host_mac, A, b"to the host")
        host.send(eth(A, host_mac, b"to the vm"))
        assert received(a) == [eth(A, host_mac, b"to the vm")]
        b = vms(sw, "b")
        assert nothing(b)  # A was learned: the host's answer went to a only
        host.close()
        assert stats(sw)["up"]["kind"] == "uplink"
        sw.stop()  # the TAP goes with the switch


def test_an_uplink_with_vhost_on_is_refused_with_the_reason(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "switch", "--port", f"a={tmp_path}/a.sock",
         "--uplink", "up=tap,ifname=pvupv,vhost=on"], capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2
    assert "uplink up: vhost=on hands the TAP to the kernel" in r.stderr
    assert not (tmp_path / "a.sock").exists()
