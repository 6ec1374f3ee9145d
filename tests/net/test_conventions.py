"""QEMU's back-end program conventions and systemd's socket activation, on a real TAP.

systemd itself is not PID 1 here: pyvhost.testing.systemd plays its part from
the shipped unit files (the socket, LISTEN_FDS, READY=1, the unit's user and
capabilities); `systemd-analyze verify` checks the units themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pyvhost.cli import systemd_units
from pyvhost.frontend.net import NetFrontend
from pyvhost.testing.netns import link_exists
from pyvhost.testing.processes import PyvhostProcess, wait_for
from pyvhost.testing.systemd import ActivatedService

from .conftest import GUEST_MAC, HOST_MAC, frame, recv_ours

BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_print_capabilities_prints_the_json_qemu_defines():
    for argv in ([str(BIN / "pyvhost-net")], [sys.executable, "-m", "pyvhost", "net"]):
        r = run(*argv, "--print-capabilities")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"type": "net"}


def test_version_is_the_package_version():
    from importlib.metadata import version

    r = run(sys.executable, "-m", "pyvhost", "--version")
    assert r.stdout.strip() == f"pyvhost {version('pyvhost')}"


def test_every_command_explains_itself_with_an_example():
    from pyvhost.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert len(commands) >= 12
    for name, sub in commands.items():
        text = sub.format_help()
        assert sub.description, name
        assert "examples:" in text and f"pyvhost {name}" in text.split("examples:")[1], name


def test_vhost_user_json_names_a_binary_that_answers_for_itself(tmp_path):
    r = run(str(BIN / "pyvhost"), "vhost-user-json", "--install", str(tmp_path))
    assert r.returncode == 0, r.stderr
    desc = json.loads((tmp_path / "50-pyvhost-net.json").read_text())
    assert desc["type"] == "net" and desc["description"]
    assert os.path.isabs(desc["binary"]) and os.access(desc["binary"], os.X_OK)
    caps = run(desc["binary"], "--print-capabilities")
    assert json.loads(caps.stdout)["type"] == desc["type"]


def test_fd_and_socket_path_together_are_refused(tmp_path):
    r = run(sys.executable, "-m", "pyvhost", "net", "--fd", "0", "--socket-path",
            str(tmp_path / "s"), "--netdev", "tap,ifname=pvx")  # fmt: skip
    assert r.returncode == 2 and "--fd and --socket-path" in r.stderr


def test_an_fd_that_is_not_a_socket_is_refused_by_name(tmp_path):
    r = run(sys.executable, "-m", "pyvhost", "net", "--fd", "0", "--netdev", "tap,ifname=pvx")
    assert r.returncode == 2 and "--fd=0: not a socket" in r.stderr
    assert not link_exists("pvx")


def test_a_connected_fd_serves_that_front_end_and_exits_when_it_leaves(netns):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ifname = f"pv{uuid.uuid4().hex[:8]}"
    proc = PyvhostProcess(
        ["net", f"--fd={theirs.fileno()}", "--netdev", f"tap,ifname={ifname}"],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    from pyvhost.frontend.client import VhostUserClient
    from pyvhost.vhost_user.transport import Connection

    fe = NetFrontend(VhostUserClient(Connection(ours)))
    fe.setup()
    wait_for(lambda: link_exists(ifname), 10, "the TAP")
    netns.adopt(ifname, ipv6=False)
    host = netns.packet_socket(ifname)
    host.settimeout(5)
    fe.send(frame(HOST_MAC, GUEST_MAC, b"over a passed fd".ljust(50)))
    assert recv_ours(host)[0][14:30] == b"over a passed fd"
    host.close()
    fe.close()  # the front-end leaves: pyvhost's work is done
    assert proc.proc.wait(10) == 0, proc.stop()[2]
    proc.stop()
    assert not link_exists(ifname, netns.name)


def test_an_idle_daemon_sleeps_without_timer_wakeups(tmp_path):
    sock = str(tmp_path / "idle.sock")
    proc = PyvhostProcess(["loopback", "--socket-path", sock], sock)
    try:
        with NetFrontend.connect(sock):
            time.sleep(0.5)  # settle after set-up

            def switches() -> int:
                with open(f"/proc/{proc.pid}/status") as f:
                    return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)

            before = switches()
            time.sleep(3)
            woke = switches() - before
    finally:
        status, _, err = proc.stop()
    assert status == 0, err
    assert woke <= 1, f"{woke} wakeups in 3 s with no traffic"


# --- systemd -------------------------------------------------------------------------------


@pytest.fixture
def units(tmp_path):
    d = tmp_path / "units"
    d.mkdir()
    r = run(str(BIN / "pyvhost"), "systemd-units", "--install", str(d))
    assert r.returncode == 0, r.stderr
    return d


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_units_pass_systemd_analyze_verify(units):
    r = run("systemd-analyze", "verify", str(units / "pyvhost-net@.socket"),
            str(units / "pyvhost-net@.service"))  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "ExecStart=" + str(BIN / "pyvhost-net") in (units / "pyvhost-net@.service").read_text()


def test_the_shipped_units_are_what_systemd_units_prints():
    names = set(systemd_units())
    assert names == {
        "pyvhost-net@.service", "pyvhost-net@.socket", "pyvhost-net@.service.d-example.conf"
    }  # fmt: skip


@pytest.fixture
def service(units, netns):
    probe = run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                str(BIN / "pyvhost-net"), "--print-capabilities")  # fmt: skip
    if probe.returncode != 0:  # e.g. a checkout under a 0700 home directory
        pytest.skip(f"the unit's unprivileged user cannot run {BIN}/pyvhost-net: {probe.stderr}")
    rundir = Path("/tmp") / f"pyvhost-run-{uuid.uuid4().hex[:8]}"  # nobody can reach it
    rundir.mkdir(mode=0o755)
    ifname = f"pv{uuid.uuid4().hex[:8]}"
    svc = ActivatedService(
        (units / "pyvhost-net@.socket").read_text(),
        (units / "pyvhost-net@.service").read_text(),
        instance="vm1",
        runtime_dir=str(rundir),
        environment={"PYVHOST_NETDEV": f"tap,ifname={ifname}"},  # the example drop-in's job
    )
    svc.ifname = ifname
    try:
        yield svc
    finally:
        svc.close()
        shutil.rmtree(rundir, ignore_errors=True)


def test_socket_activation_serves_a_vm_that_connected_before_pyvhost_ran(service, netns):
    path = service.listen()
    # The VM comes first: it connects and sends its first requests to a socket
    # that nobody serves yet (systemd holds it).
    result: dict = {}

    def vm() -> None:
        try:
            result["fe"] = NetFrontend.connect(path, timeout=30)
        except Exception as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=vm)
    t.start()
    time.sleep(0.3)
    assert "fe" not in result and "error" not in result  # waiting on pyvhost
    proc = service.start()
    service.wait_ready()
    t.join(30)
    assert "error" not in result, result.get("error")
    fe = result["fe"]
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        assert status["Uid"].split()[0] == "65534"  # the unit's unprivileged user
        assert int(status["CapEff"], 16) == 0 and int(status["CapAmb"], 16) == 0  # given up
        netns.adopt(service.ifname, ipv6=False)
        host = netns.packet_socket(service.ifname)
        host.settimeout(5)
        fe.send(frame(HOST_MAC, GUEST_MAC, b"socket-activated".ljust(50)))
        assert recv_ours(host)[0][14:30] == b"socket-activated"
        host.close()
        control = os.path.join(service.runtime_directory(), "control")
        r = run(str(BIN / "pyvhost"), "stats", "--control", control, "--json")
        assert json.loads(r.stdout)["queues"]["tx0"]["packets"] >= 1, r.stderr
    finally:
        fe.close()
    started = time.monotonic()
    status, _, err = service.stop()
    assert status == 0, err
    assert time.monotonic() - started < 2
    assert os.path.exists(path)  # the socket is the socket unit's, and stays
    assert not os.path.exists(control)
    assert not link_exists(service.ifname, netns.name)
