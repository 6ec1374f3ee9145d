"""Queue pairs served by worker processes (`pyvhost net --workers`).

The datapath tests of the single-process mode run here again, unchanged,
with each pair in a worker; then what only workers have: one process per
pair, and what happens when one dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pyvhost.control import request
from pyvhost.frontend.net import NetFrontend
from pyvhost.stats import fetch
from pyvhost.testing.processes import wait_for
from tests.net.conftest import (
    NetDaemon,
    big_socket,
    hot_plug_reaches_the_engine,
    numbered,
    recv_ours,
    switch_under_traffic,
)
from tests.net.test_datapath import (  # noqa: F401 - run again here, with workers
    test_a_64k_gso_frame_from_the_host_arrives_merged_over_many_buffers,
    test_a_64k_tso_frame_from_the_guest_reaches_the_host_whole,
    test_a_burst_beyond_the_tx_budget_is_sent_whole_after_one_kick,
    test_a_stream_of_large_frames_from_the_guest_is_drained_on_a_timer_whole_and_in_order,
    test_a_stream_of_large_frames_from_the_host_is_read_in_deferred_batches_whole_and_in_order,
    test_every_queue_pair_carries_traffic,
    test_frames_from_the_guest_reach_the_tap_byte_for_byte,
    test_frames_from_the_host_reach_the_guest_byte_for_byte,
    test_stats_say_how_each_started_ring_reads_and_writes_the_tap,
    test_with_no_rx_buffers_frames_wait_in_the_tap_and_none_is_dropped,
    test_without_vnet_hdr_no_offload_is_offered_and_headers_are_added_and_removed,
)
from tests.net.test_migration import (  # noqa: F401 - dirty logging, done by the worker
    test_once_log_all_is_dropped_nothing_more_is_logged,
    test_received_frames_dirty_only_rx_buffers_and_the_rx_used_ring,
    test_sent_frames_dirty_only_the_tx_used_ring,
)


@pytest.fixture
def net_daemon(tmp_path, netns):
    daemons = []

    def start(netdev: str = "tap,ifname=IFNAME", *extra: str, move: bool = True) -> NetDaemon:
        d = NetDaemon(tmp_path, netns, netdev, "--workers", *extra, move=move)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        if d.proc.proc.poll() is None:
            d.stop()


SAMPLE_HOOK = "tests.switch.sample_hooks:drop_marked"


def workers_of(pid: int) -> list[int]:
    """The worker processes a daemon started (its children)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_each_queue_pair_runs_in_a_process_of_its_own(net_daemon, netns):
    d = net_daemon("tap,ifname=IFNAME,queues=2")
    host = big_socket(netns, d.ifname)
    assert workers_of(d.proc.pid) == []  # a worker starts with its pair's first ring
    with NetFrontend.connect(d.sock, queue_pairs=2) as fe:
        fe.set_queue_pairs(2)
        for pair in range(2):
            fe.post_rx(pair)
            fe.send(numbered(1, start=pair)[0], pair=pair)
        assert sorted(recv_ours(host, 2)) == sorted(numbered(2))
        workers = workers_of(d.proc.pid)
        assert len(workers) == 2
        assert all("pyvhost.devices.net.worker_process" in cmdline(w) for w in workers)
        # The worker maps the guest's memory itself; the daemon keeps its own map.
        assert all(
            any("pyvhost-frontend-ram" in line for line in open(f"/proc/{w}/maps")) for w in workers
        )
        snapshot = fetch(d.sock + ".stats")
        assert snapshot["datapaths"] == ["worker", "worker"]
        assert [snapshot["queues"][f"tx{p}"]["packets"] for p in range(2)] == [1, 1]
    # Between front-ends a worker holds none of the guest's memory.
    wait_for(
        lambda: not any("pyvhost-frontend-ram" in open(f"/proc/{w}/maps").read() for w in workers),
        10,
        "the workers to unmap the guest",
    )
    host.close()
    d.stop()
    assert all(not os.path.exists(f"/proc/{w}") for w in workers)  # ended with the daemon


def test_a_pair_moves_between_the_control_process_and_its_worker_losing_nothing(net_daemon, netns):
    d = net_daemon()
    switch_under_traffic(d, netns, ["python", "worker"] * 5)


def test_a_worker_that_dies_ends_its_session_and_the_next_front_end_is_served(net_daemon, netns):
    d = net_daemon()
    host = big_socket(netns, d.ifname)
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        fe.send(numbered(1)[0])
        assert recv_ours(host, 1) == numbered(1)
        (worker,) = workers_of(d.proc.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not d.proc.maps("pyvhost-frontend-ram"), 10, "the session to end")
    assert d.proc.proc.poll() is None  # the daemon goes on
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        sent = numbered(5, start=1)
        for f in sent:
            fe.send(f)
        assert recv_ours(host, 5) == sent
        (new,) = workers_of(d.proc.pid)
        assert new != worker
    host.close()
    _, err = d.stop()
    assert f"worker process exited (signal {signal.SIGKILL})" in err


def test_a_hook_moves_the_pair_into_the_control_process_and_back_when_removed(net_daemon, netns):
    d = net_daemon()
    stats = d.sock + ".stats"
    with NetFrontend.connect(d.sock) as fe:
        fe.post_rx()
        reply = request(stats, {"cmd": "hook", "port": "pair0", "add": SAMPLE_HOOK})
        assert reply["ok"], reply
        assert fetch(stats)["datapaths"] == ["python"]
        reply = request(stats, {"cmd": "hook", "port": "pair0", "remove": SAMPLE_HOOK})
        assert reply["ok"], reply
        assert fetch(stats)["datapaths"] == ["worker"]
        host = big_socket(netns, d.ifname)
        fe.send(numbered(1)[0])
        assert recv_ours(host, 1) == numbered(1)
        host.close()


def test_workers_refuse_a_vhost_on_netdev_naming_both_options(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pyvhost", "net", "--socket", str(tmp_path / "s"),
         "--netdev", "tap,ifname=pvw0,vhost=on", "--workers"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode != 0
    assert "--workers" in r.stderr and "vhost=on" in r.stderr


def test_hot_added_and_removed_memory_reaches_the_worker(net_daemon, netns):
    d = net_daemon()
    hot_plug_reaches_the_engine(d, netns)
