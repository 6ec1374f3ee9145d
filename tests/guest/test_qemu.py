"""QEMU's command line for a NIC on pyvhost, per QEMU version."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyvhost.guest import msix
from pyvhost.guest.msix import cached_msix, known_msix
from pyvhost.guest.qemu import NicOptions, nic_args, qemu_version


@pytest.mark.parametrize(
    "version, works",
    [((7, 2, 22), False), ((5, 2, 0), False), ((10, 0, 13), True), ((10, 1, 0), True)],
)
def test_msix_by_known_qemu_version(version, works):
    assert known_msix(version) is works


def test_an_unknown_version_uses_a_cached_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cached_msix((9, 1, 0)) is None  # neither known nor probed
    path = msix._cache_file((9, 1, 0))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"qemu": [9, 1, 0], "msix": True}))
    assert cached_msix((9, 1, 0)) is True


def test_reconnect_is_spelled_for_the_qemu_version():
    old = " ".join(nic_args(NicOptions("/s", qemu_version=(7, 2, 0))))
    new = " ".join(nic_args(NicOptions("/s", qemu_version=(10, 0, 0))))
    assert "reconnect=1" in old and "reconnect-ms=1000" in new  # deprecated in 9.2


def test_msix_gives_a_vector_per_queue_and_config():
    args = " ".join(nic_args(NicOptions("/s", queues=4, msix=True, qemu_version=(10, 0, 0))))
    assert "vectors=10" in args  # 8 queues, the control queue and config
    args = " ".join(nic_args(NicOptions("/s", queues=4, msix=False, qemu_version=(10, 0, 0))))
    assert "vectors=0" in args


def test_qemu_args_prints_the_vectors_this_qemu_takes():
    out = subprocess.run(
        [sys.executable, "-m", "pyvhost", "qemu-args", "--socket", "/run/x.sock"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    works = cached_msix(qemu_version())
    assert ("vectors=0" in out) is not bool(works)
