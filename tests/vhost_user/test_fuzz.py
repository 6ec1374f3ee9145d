"""A stateful fuzz of the daemon through its real socket (issue 10, part 2).

Random sequences of valid, mutated and garbage messages, fds of the wrong
kind and count, memory tables that overlap or run past their files, rings
full of random bytes that are then kicked (pyvhost.testing.fuzz). After
each sequence the front-end goes, and the daemon must be alive, answering,
and back to the fds and mappings it had before.

The fast profile runs here in CI. The long one runs with `-m soak`
(PYVHOST_SOAK_MESSAGES, default 1,000,000) and prints its figures.
"""

from __future__ import annotations

import os
import random
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyvhost.frontend.client import VhostUserClient
from pyvhost.frontend.net import NetFrontend
from pyvhost.testing.fuzz import RAM_NAME, HostileFrontend
from pyvhost.testing.netns import NetNamespace
from pyvhost.testing.processes import PyvhostProcess, wait_for

MESSAGES_PER_EXAMPLE = 150


class Served:
    """A daemon under fuzz, and what it held when no front-end was there."""

    def __init__(self, kind: str, tmp_path, *extra: str) -> None:
        self.sock = str(tmp_path / f"{kind}.sock")
        log = str(tmp_path / f"{kind}.log")  # a file: a pipe would fill and stall the daemon
        self.netns: NetNamespace | None = None
        if kind == "net":
            self.netns = NetNamespace("pyvhost-fuzz")
            ifname = f"pvf{uuid.uuid4().hex[:8]}"
            args = ["net", "--socket", self.sock, "--netdev", f"tap,ifname={ifname},queues=2",
                    *extra]  # fmt: skip
            self.proc = PyvhostProcess(args, self.sock, stderr_path=log)
            self.netns.adopt(ifname, ipv6=False)
        else:
            args = ["loopback", "--socket", self.sock, *extra]
            self.proc = PyvhostProcess(args, self.sock, stderr_path=log)
        with NetFrontend.connect(self.sock) as fe:  # warm up: the daemon's own fds settle
            fe.post_rx()
        wait_for(lambda: not self.proc.maps("memfd:"), 10, "the warm-up session to end")
        self.baseline = self.proc.settled_fds()

    def check_clean(self) -> None:
        """Alive, answering a new front-end, and holding nothing of the old ones."""
        assert self.proc.proc.poll() is None, "the daemon died"
        c = VhostUserClient.connect(self.sock)
        try:
            assert c.get_features() & (1 << 32)  # VERSION_1: a real answer
        finally:
            c.close()
        try:
            wait_for(lambda: self.proc.fds() == self.baseline, 10,
                     "the daemon's fds to return to baseline")  # fmt: skip
        except TimeoutError:
            extra = {fd: _target(self.proc.pid, fd) for fd in self.proc.fds() - self.baseline}
            raise AssertionError(f"the daemon holds more fds than it did idle: {extra}") from None
        assert not self.proc.maps(RAM_NAME), "a mapping of the fuzzer's memory is left"

    def close(self) -> tuple[int, str]:
        status, _, err = self.proc.stop()
        if self.netns is not None:
            self.netns.delete()
        return status, err


@pytest.fixture(params=["net", "loopback"])
def served(request, tmp_path):
    s = Served(request.param, tmp_path)
    yield s
    status, err = s.close()
    assert status == 0, err


def fuzz(served: Served, rng: random.Random, messages: int) -> HostileFrontend:
    fe = HostileFrontend(served.sock, rng)
    try:
        while fe.messages < messages:
            fe.step()
    finally:
        fe.close()
    return fe


# Hypothesis draws the seed, not each choice: what the fuzzer sends next depends
# on what the daemon did (a hang-up means a reconnect), which hypothesis cannot
# replay choice by choice. A failure prints its seed, and the seed replays it.
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**64 - 1))
def _examples(served: Served, seed: int) -> None:
    fuzz(served, random.Random(seed), MESSAGES_PER_EXAMPLE)
    served.check_clean()


def test_random_message_sequences_leave_the_daemon_alive_and_holding_nothing(served):
    _examples(served)


def test_a_thousand_setup_and_disconnect_cycles_leak_nothing(served):
    for i in range(1000):
        if i % 2:
            with NetFrontend.connect(served.sock, queue_size=64):
                pass  # a whole set-up (memory, every ring, kicks, calls), then gone
        else:
            fe = HostileFrontend(served.sock, random.Random(i))  # half a set-up, then gone
            for _ in range(8):
                fe.step()
            fe.close()
    served.check_clean()


@pytest.mark.soak
def test_soak(served, capsys):
    total = int(os.environ.get("PYVHOST_SOAK_MESSAGES", "1000000"))
    seed = int(os.environ.get("PYVHOST_SOAK_SEED", "1"))
    rng = random.Random(seed)
    sent = hangups = sessions = 0
    rss0 = _rss_kib(served.proc.pid)
    start = time.monotonic()
    while sent < total:
        fe = fuzz(served, random.Random(rng.getrandbits(64)), min(1000, total - sent))
        sent += fe.messages
        hangups += fe.hangups
        sessions += 1 + fe.hangups
        if sessions % 50 == 0:
            served.check_clean()
            with capsys.disabled():
                print(f"soak: {sent:,} messages, {hangups:,} hang-ups, "
                      f"{sent / (time.monotonic() - start):,.0f} messages/s")  # fmt: skip
    served.check_clean()
    seconds = time.monotonic() - start
    with capsys.disabled():
        print(f"\nsoak ({served.sock.rsplit('/', 1)[-1]}, seed {seed}): {sent:,} messages in "
              f"{seconds:.0f} s ({sent / seconds:,.0f}/s), {sessions:,} sessions, {hangups:,} "
              f"reconnects after a send or receive failed; daemon RSS {rss0:,} -> "
              f"{_rss_kib(served.proc.pid):,} KiB; fds and mappings back to baseline")  # fmt: skip


def _target(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return "?"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
