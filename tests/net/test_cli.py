"""`pyvhost net` as a user runs it: exit status, messages, and nothing left behind."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from pyvhost.backends import tap_netdev
from pyvhost.backends.tap import Tap
from pyvhost.backends.tap_options import parse_netdev
from pyvhost.errors import OptionError
from pyvhost.frontend.net import NetFrontend
from pyvhost.stats import format_table
from pyvhost.testing.netns import link_exists

from .conftest import GUEST_MAC, HOST_MAC, frame, io_uring_disabled, recv_ours


def run_net(tmp_path, netdev: str, *extra: str, timeout: float = 20, pass_fds=()):
    sock = str(tmp_path / "net.sock")
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "net", "--socket", sock, "--netdev", netdev, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        pass_fds=pass_fds,
    )
    return r, sock


def tap_names() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show", "type", "tun"], capture_output=True, text=True
    )
    return {line.split(":")[1].strip() for line in out.stdout.splitlines()}


@pytest.mark.parametrize(
    ("netdev", "message"),
    [
        ("tap,ifname=IFNAME,vhost=off,vhostfd=0", "vhostfd= is not valid without vhost"),
        ("tap,ifname=IFNAME,vhost=on", "vhost-net requested but could not be initialized"),
        ("tap,ifname=IFNAME,vhostfd=0", "vhostfd=0 is"),
        ("tap,fd=0,ifname=IFNAME", "ifname= is invalid with fd="),
        ("tap,fds=0:1,script=/bin/true,ifname=IFNAME", "are invalid with fds="),
        ("tap,ifname=IFNAME,colour=blue", "colour= is not a tap option"),
        ("tap,ifname=IFNAME,sndbuf=abc", "sndbuf=abc"),
        ("tap,ifname=IFNAME,queues=0", "queues=0"),
        ("tap,ifname=IFNAME,vnet_hdr=maybe", "vnet_hdr=maybe"),
        ("tap,ifname=IFNAME,script=/nonexistent/ifup", "script=/nonexistent/ifup: no such file"),
        ("tap,ifname=IFNAME,script=/bin/false", "script=/bin/false IFNAME failed with status 1"),
        ("tap,fd=0", "fd=0: not a TAP fd"),
    ],
)
def test_a_refused_netdev_exits_non_zero_naming_the_option_and_leaves_nothing(
    tmp_path, netdev, message
):
    ifname = f"pv{uuid.uuid4().hex[:8]}"
    r, sock = run_net(tmp_path, netdev.replace("IFNAME", ifname))
    assert r.returncode == 2, r.stderr
    assert message.replace("IFNAME", ifname) in r.stderr
    assert r.stderr.startswith("pyvhost: error:") or "pyvhost: error:" in r.stderr
    assert not os.path.exists(sock)
    assert not link_exists(ifname)
    assert ifname not in tap_names()


def test_vhost_on_without_vhost_net_names_the_reason(tmp_path):
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("this machine has /dev/vhost-net; the failure path needs it absent")
    r, _ = run_net(tmp_path, "tap,ifname=pvnovhost,vhost=on")
    assert "vhost-net requested but could not be initialized: /dev/vhost-net: No such file" in (
        r.stderr
    )


def test_vnet_hdr_on_where_the_kernel_lacks_it_is_an_error(monkeypatch):
    # Every Linux since 2.6.27 has IFF_VNET_HDR, so the kernel's answer is
    # faked here; the real TUNGETFEATURES path runs in every other TAP test.
    monkeypatch.setattr(Tap, "kernel_features", staticmethod(lambda: 0x7173 & ~0x4000))
    with pytest.raises(OptionError, match="vnet_hdr=on requested, but the kernel's TAP has no"):
        tap_netdev.TapNetdev.open(parse_netdev("tap,ifname=pvnohdr,vnet_hdr=on"))
    assert not link_exists("pvnohdr")


def test_a_bad_mac_mtu_user_or_tuning_value_is_refused_before_anything_opens(tmp_path):
    for extra, message in (
        (["--mac", "52:54:00:12:34"], "--mac 52:54:00:12:34: expected six hex bytes"),
        (["--mac", "01:00:5e:00:00:01"], "multicast"),
        (["--mtu", "20"], "--mtu 20: must be between 68 and 65535"),
        (["--user", "no-such-user-pyvhost"], "--user no-such-user-pyvhost: no such user"),
        (["--group", "no-such-group-pyvhost"], "--group no-such-group-pyvhost: no such group"),
        (["--poll-us", "-1"], "--poll-us -1: must be between 0 and 1000000 microseconds"),
        (["--rx-usecs", "2000000"], "--rx-usecs 2000000: must be between 0 and 1000000"),
        (["--rx-defer-us", "-5"], "--rx-defer-us -5: must be between 0 and 1000000"),
    ):
        r, sock = run_net(tmp_path, "tap,ifname=pvbadarg", *extra)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert not link_exists("pvbadarg") and not os.path.exists(sock)


def test_io_uring_on_where_the_kernel_refuses_it_is_an_error_naming_the_option(tmp_path):
    with io_uring_disabled():
        r, sock = run_net(tmp_path, "tap,ifname=pvnouring", "--io-uring=on")
    assert r.returncode == 2, r.stderr
    assert "--io-uring=on: io_uring unavailable" in r.stderr and "--io-uring=auto" in r.stderr
    assert not link_exists("pvnouring") and not os.path.exists(sock)


def test_scripts_run_with_the_interface_name_after_open_and_before_close(
    tmp_path, net_daemon, netns
):
    up, down, log = tmp_path / "ifup", tmp_path / "ifdown", tmp_path / "log"
    for path, word in ((up, "up"), (down, "down")):
        path.write_text(
            f'#!/bin/sh\nip link show dev "$1" >/dev/null && echo {word} "$1" >> {log}\n'
        )
        path.chmod(0o755)
    d = net_daemon(f"tap,ifname=IFNAME,script={up},downscript={down}", move=False)
    assert log.read_text() == f"up {d.ifname}\n"
    d.stop()
    assert log.read_text() == f"up {d.ifname}\ndown {d.ifname}\n"  # the TAP still existed


def test_a_tap_fd_from_a_management_process(tmp_path, net_daemon, netns):
    # The "management process" is this test: it opens the TAP and hands pyvhost the fd.
    name = f"pv{uuid.uuid4().hex[:8]}"
    tap = Tap.open(name, vnet_hdr=False, multi_queue=False)
    os.set_inheritable(tap.fd, True)
    from pyvhost.testing.processes import PyvhostProcess

    sock = str(tmp_path / "fd.sock")
    proc = PyvhostProcess(
        ["net", "--socket", sock, "--netdev", f"tap,fd={tap.fd}"], sock, pass_fds=(tap.fd,)
    )
    tap.close()  # pyvhost holds the only fd now
    netns.adopt(name)
    host = netns.packet_socket(name)
    host.settimeout(5)
    try:
        with NetFrontend.connect(sock) as fe:
            assert not fe.features & 1  # no IFF_VNET_HDR on that fd: no offloads offered
            fe.send(frame(HOST_MAC, GUEST_MAC, b"via an inherited fd".ljust(50)))
            assert recv_ours(host)[0][14:33] == b"via an inherited fd"
    finally:
        host.close()
        status, out, err = proc.stop()
    assert status == 0, err
    assert "vnet_hdr=off" in out
    assert not link_exists(name, netns.name)  # its only fd closed: the TAP is gone


def test_multiqueue_fds_from_a_management_process(tmp_path, netns):
    name = f"pv{uuid.uuid4().hex[:8]}"
    taps = [Tap.open(name, vnet_hdr=True, multi_queue=True) for _ in range(2)]
    fds = [t.fd for t in taps]
    for fd in fds:
        os.set_inheritable(fd, True)
    from pyvhost.testing.processes import PyvhostProcess

    sock = str(tmp_path / "fds.sock")
    proc = PyvhostProcess(
        ["net", "--socket", sock, "--netdev", f"tap,fds={fds[0]}:{fds[1]}"], sock, pass_fds=fds
    )
    for t in taps:
        t.close()
    try:
        with NetFrontend.connect(sock, queue_pairs=2) as fe:
            assert fe.max_pairs == 2
    finally:
        status, out, err = proc.stop()
    assert status == 0, err
    assert "2 queues" in out


@pytest.fixture
def nobody_dir():
    """A directory the unprivileged user can create and remove sockets in."""
    d = tempfile.mkdtemp(prefix="pyvhost-nobody-", dir="/tmp")
    os.chown(d, 65534, 65534)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_privileges_are_dropped_once_the_tap_is_open(netns, nobody_dir):
    from .conftest import NetDaemon

    d = NetDaemon(
        Path(nobody_dir), netns, "tap,ifname=IFNAME", "--user", "nobody", "--group", "nogroup"
    )
    with open(f"/proc/{d.proc.pid}/status") as f:
        ids = {line.split(":")[0]: line.split()[1:] for line in f if line[:3] in ("Uid", "Gid")}
    assert ids["Uid"] == ["65534"] * 4 and ids["Gid"] == ["65534"] * 4
    assert os.stat(d.sock).st_uid == 65534 and stat.S_ISSOCK(os.stat(d.sock).st_mode)
    assert stat.S_IMODE(os.stat(d.sock).st_mode) == 0o660  # --group's members may connect
    host = netns.packet_socket(d.ifname)
    host.settimeout(5)
    with NetFrontend.connect(d.sock) as fe:  # the datapath runs unprivileged
        fe.send(frame(HOST_MAC, GUEST_MAC, b"unprivileged".ljust(50)))
        assert recv_ours(host)[0][14:26] == b"unprivileged"
    host.close()
    d.stop()


def test_dropping_privileges_with_a_socket_the_user_cannot_remove_is_refused(tmp_path):
    r, sock = run_net(tmp_path, "tap,ifname=pvnoperm", "--user", "nobody")
    assert r.returncode == 2
    assert f"--stats-socket {sock}.stats: after dropping privileges" in r.stderr
    assert not link_exists("pvnoperm")


def test_stats_command_prints_the_table_and_json(net_daemon):
    d = net_daemon()
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "stats", "--socket", d.sock],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 0 and "rx0" in r.stdout and "tx0" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "stats", "--socket", d.sock, "--json"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    import json

    assert json.loads(r.stdout)["interface"] == d.ifname


def test_the_stats_table_says_which_datapath_and_tap_io_each_pair_uses():
    counters = dict.fromkeys(
        ["packets", "bytes", "drops", "errors", "notifications_sent", "notifications_suppressed"], 0
    )
    snapshot = {
        "device": "virtio-net",
        "interface": "pv0",
        "datapaths": ["python", "worker", "kernel"],
        "host_io": [{"rx": "io_uring", "tx": "writev"}, {}, {"rx": "kernel", "tx": "kernel"}],
        "queues": {"rx0": counters, "tx0": counters},
    }
    assert format_table(snapshot).splitlines()[1] == (
        "datapaths: pair 0 python (rx io_uring, tx writev), pair 1 worker, "
        "pair 2 kernel (rx kernel, tx kernel)"
    )


def test_stats_command_without_a_daemon_says_what_to_check(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "stats", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 2 and "is pyvhost net running" in r.stderr
