"""The README's demo command, as a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from pyvhost.testing.netns import ip


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line}


def taps() -> str:
    return ip("-o", "link", "show", "type", "tun").stdout


def test_the_demo_prints_its_table_and_leaves_nothing(guest_image):
    before_ns = namespaces()
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "demo", "--seconds", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for step in range(1, 7):
        assert f"[{step}/6]" in r.stdout
    for row in ("boot time", "ping loss", "ping rtt", "guest -> host", "host -> guest"):
        assert row in r.stdout
    assert "ping loss               0 %" in r.stdout
    assert namespaces() == before_ns and "pv" not in taps()


def test_the_two_vm_demo_shows_guests_talking_through_the_switch(guest_image):
    before_ns = namespaces()
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "demo", "--vms", "2", "--seconds", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for row in (
        "ping vm0 -> vm1     0 % loss",
        "ping vm1 -> vm0     0 % loss",
        "ping vm0 -> host    0 % loss",
        "iperf3 vm0 -> vm1",
        "switch drops        0",
    ):
        assert row in r.stdout, r.stdout  # fmt: skip
    assert namespaces() == before_ns and "pv" not in taps()


@pytest.mark.parametrize(
    "sig",
    [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupted_demo_is_back_within_two_seconds_and_leaves_nothing(guest_image, sig):
    before_ns = namespaces()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvhost", "demo", "--seconds", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # wait until the guest is up and iperf3 is running
        if line.startswith("[5/6]"):
            break
    time.sleep(2)
    children = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert children  # pyvhost, QEMU, iperf3 are running
    proc.send_signal(sig)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 130 and "interrupted: cleaning up" in err
    assert took < 2.0, f"{took:.1f} s from the signal to the prompt"
    for pid in children:
        assert subprocess.run(["kill", "-0", pid], capture_output=True).returncode != 0, pid
    assert namespaces() == before_ns and "pv" not in taps()


def test_a_static_busybox_is_told_from_a_dynamic_binary():
    from pyvhost.guest.image import BUSYBOX, is_static_elf

    assert is_static_elf(BUSYBOX)
    assert not is_static_elf(sys.executable)
