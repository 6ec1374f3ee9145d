"""pyvhost side by side with what users would run instead. Needs root.

    python bench/run.py [--repeats 3] [--seconds 5] [--only throughput,pps,tso,latency]

1. Guest throughput: one TCG guest, iperf3 TCP both ways, through pyvhost
   (vhost-user), through QEMU's own -netdev tap,vhost=off, and through DPDK
   testpmd's vhost PMD forwarding to its tap PMD.
2. Packet rate to the TAP: testpmd's virtio_user PMD (txonly, 64 and 1500
   byte frames) into pyvhost, then into testpmd's vhost PMD + tap PMD.
3. Large frames: 64 KiB TSO frames from the Python front-end through pyvhost
   to the TAP (and from the TAP back to the front-end).
4. Cost: CPU seconds of the backend per GB moved, from /proc/PID/stat.
5. Latency: 64-byte ping-pong front-end -> pyvhost -> TAP -> echo -> back.

Anchor and pyvhost alternate within each repeat; every figure is the median
of --repeats runs with min and max. Processes are pinned with taskset (the
guest and generators on core 0, the backend under test on core 1) and the
pinning is printed. Raw figures go to bench/out/*.json, ratios to a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pyvhost.guest.image import ensure_image
from pyvhost.guest.lab import GUEST_IP, HOST_IP, HOST_MAC, PREFIX
from pyvhost.guest.qemu import Guest, NicOptions, VmOptions
from pyvhost.testing.dpdk import Hugepages, Testpmd
from pyvhost.testing.netns import NetNamespace, ip, link_exists, set_sysctl
from pyvhost.testing.processes import PyvhostProcess, wait_for

OUT = Path(__file__).resolve().parent / "out"
# pyvhost without busy polling and interrupt moderation (the "before" of the tuning).
UNTUNED = [
    "--poll-us",
    "0",
    "--tx-usecs",
    "0",
    "--rx-usecs",
    "0",
    "--rx-defer-us",
    "0",
    "--tx-defer-us",
    "0",
]
GUEST_CORE, BACKEND_CORE = "0", "1"


def pyvhost_variants(args) -> dict[str, list[str]]:
    """pyvhost with its defaults first, then each --also (and --untuned) setting:
    the name printed for it, and its extra `pyvhost net` options."""
    out = {"pyvhost": []}
    for name, tree in BEFORE.items():
        out[name] = [FROM_TREE + tree]
    if args.untuned:
        out["pyvhost-untuned"] = UNTUNED
    for extra in args.also:
        out[f"pyvhost {extra}"] = extra.split()
        for name, tree in BEFORE.items():  # the same setting before, for an A/B under it
            out[f"{name} {extra}"] = [FROM_TREE + tree, *extra.split()]
    return out


def pyvhost_net(sock: str, ifname: str, tuning: list[str] = (), netdev: str = "") -> list[str]:
    """`pyvhost net` on a new TAP, with a variant's options (`netdev`: more
    tap options, e.g. ",vhost=on")."""
    return ["net", "--socket", sock, "--netdev", f"tap,ifname={ifname}{netdev}", *tuning]


# --before REV: pyvhost as it was at REV, run from an exported tree beside the
# current one in every comparison ("pyvhost@REV"), for before/after figures
# from one invocation on one machine.
BEFORE: dict[str, str] = {}  # variant name -> the exported tree's src directory
FROM_TREE = "--from-tree="


def export_tree(rev: str, workdir: Path) -> str:
    """The package as it was at git revision `rev`, exported under workdir."""
    root = Path(__file__).resolve().parent.parent
    dest = workdir / f"tree-{rev.replace('/', '_')}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return str(dest / "src")


def start_pyvhost(args: list[str], sock: str) -> PyvhostProcess:
    """PyvhostProcess, from an exported tree if the options carry --from-tree=."""
    trees = [a[len(FROM_TREE) :] for a in args if a.startswith(FROM_TREE)]
    args = [a for a in args if not a.startswith(FROM_TREE)]
    env = {"PYTHONPATH": trees[0]} if trees else None
    return PyvhostProcess(args, sock, env=env)


def pyvhost_kinds() -> list[str]:
    """The pyvhost backends the TAP runs compare: this tree, and --before's."""
    return ["pyvhost", *BEFORE]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def user_system(pid: int, tid: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    return sum(user_system(pid, tid))


def pin(pid: int, cores: str) -> None:
    subprocess.run(["taskset", "-a", "-p", "-c", cores, str(pid)], capture_output=True, check=True)


def link_stats(ifname: str, netns: NetNamespace | None = None) -> dict:
    """The TAP's counters ({"rx": {...}, "tx": {...}}) as the host side sees them."""
    args = ("-s", "-j", "link", "show", "dev", ifname)
    out = (netns.ip(*args) if netns else ip(*args)).stdout
    return json.loads(out)[0]["stats64"]


def tap_counters(ifname: str, netns: NetNamespace | None = None) -> tuple[int, int]:
    """(rx_packets, rx_bytes) of the TAP as the host side sees it."""
    rx = link_stats(ifname, netns)["rx"]
    return rx["packets"], rx["bytes"]


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}  # fmt: skip


# --- 1. guest throughput ---------------------------------------------------------------


class GuestSetup:
    """A guest and the host side, through one of three backends."""

    def __init__(
        self, kind: str, image, workdir: Path, tuning: list[str] = (), properties: str = ""
    ) -> None:
        self.kind = kind
        self.tuning = list(tuning)  # pyvhost's options for this variant
        self.properties = properties  # more virtio-net-pci properties, for every backend
        self.image = image
        self.netns = NetNamespace("pyvhost-bench")
        self.ifname = f"pb{uuid.uuid4().hex[:8]}"
        slug = "".join(ch if ch.isalnum() else "-" for ch in kind)
        self.sock = str(workdir / f"{slug}-{uuid.uuid4().hex[:6]}.sock")  # testpmd leaves its file
        self.backend_pid: int | None = None
        self.backend_tid: int | None = None
        self.pyvhost = self.testpmd = self.guest = None
        self.iperf = None

    def start(self) -> None:
        extra: list[str] = []
        socket = self.sock
        if self.kind.startswith("pyvhost"):
            self.pyvhost = start_pyvhost(
                pyvhost_net(self.sock, self.ifname, self.tuning), self.sock
            )
            pin(self.pyvhost.pid, BACKEND_CORE)
            self.backend_pid = self.pyvhost.pid
            self._adopt()
        elif self.kind == "dpdk":
            self.testpmd = Testpmd(
                f"net_vhost0,iface={self.sock},queues=1",
                ["--forward-mode=io", "--auto-start"],
                prefix=f"bench-{uuid.uuid4().hex[:6]}",
                cores=f"{GUEST_CORE},{BACKEND_CORE}",
                extra_vdevs=[f"net_tap0,iface={self.ifname}"],
                netns=self.netns.name,
            )
            self.testpmd.wait_for_socket(self.sock)
            self.backend_pid = self.testpmd.proc.pid
        else:  # QEMU's own userspace virtio-net on a TAP
            socket = ""
            tap = f"tap,id=n0,ifname={self.ifname},script=no,downscript=no,vhost=off"
            dev = "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,vectors=0"
            if self.properties:
                dev += f",{self.properties}"
            extra = ["-netdev", tap, "-device", dev]
        nic = NicOptions(socket, mem="512M", properties=self.properties)
        opts = VmOptions(nic, self.image, ip=f"{GUEST_IP}/{PREFIX}", extra_args=extra,
                         taskset=GUEST_CORE)  # fmt: skip
        self.guest = Guest(opts)
        if self.kind == "qemu-tap":
            wait_for(lambda: link_exists(self.ifname), 20, "QEMU's TAP")
            self.backend_pid = self.guest.pid
            self.backend_tid = self.guest.pid  # the main loop thread runs the tap datapath
            self._adopt()
        self.guest.wait_ready()
        self.iperf = self.netns.popen("taskset", "-c", GUEST_CORE, "iperf3", "-s",
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)  # fmt: skip
        time.sleep(0.5)
        self.guest.run(f"ping -c 2 -W 2 {HOST_IP}", timeout=30, check=False)

    def _adopt(self, move: bool = True) -> None:
        self.netns.adopt(self.ifname, address=f"{HOST_IP}/{PREFIX}", mac=HOST_MAC, move=move)

    def iperf3(self, reverse: bool, seconds: int) -> tuple[float, float]:
        """(Gbit/s, backend CPU seconds per GB)."""
        cpu0 = cpu_seconds(self.backend_pid, self.backend_tid)
        end = self.guest.iperf3(HOST_IP, seconds, reverse=reverse)["end"]
        cpu = cpu_seconds(self.backend_pid, self.backend_tid) - cpu0
        gbits = end["sum_received"]["bits_per_second"] / 1e9
        gbytes = end["sum_received"]["bytes"] / 1e9
        return gbits, cpu / gbytes

    def close(self) -> None:
        if self.guest is not None:
            self.guest.stop()
        if self.iperf is not None and self.iperf.poll() is None:
            self.iperf.terminate()
            self.iperf.wait()
        if self.testpmd is not None:
            self.testpmd.kill()
        if self.pyvhost is not None:
            self.pyvhost.stop()
        self.netns.delete()


def bench_throughput(args, image, workdir: Path) -> dict:
    # DPDK as a guest's backend: with Debian's QEMU 7.2 and DPDK 22.11 the
    # guest's frames reach testpmd and its TAP, but testpmd's vhost port drops
    # every frame for the guest (it does not see the RX ring usable), so the
    # guest never resolves ARP. It stays behind --dpdk-guest; see BENCHMARKS.md.
    variants = pyvhost_variants(args)
    kinds = ["pyvhost", "qemu-tap", *list(variants)[1:]] + (["dpdk"] if args.dpdk_guest else [])
    results = {
        k: {"to_host": [], "to_guest": [], "cpu_per_gb": [], "cpu_to_host": [], "cpu_to_guest": []}
        for k in kinds
    }
    for r in range(args.repeats):
        for kind in kinds:
            print(f"  throughput run {r + 1}/{args.repeats}: {kind}", flush=True)
            setup = GuestSetup(kind, image, workdir, variants.get(kind, []), args.device)
            try:
                setup.start()
                up, cpu_up = setup.iperf3(False, args.seconds)
                down, cpu_down = setup.iperf3(True, args.seconds)
            finally:
                setup.close()
            results[kind]["to_host"].append(up)
            results[kind]["to_guest"].append(down)
            results[kind]["cpu_per_gb"].append((cpu_up + cpu_down) / 2)
            results[kind]["cpu_to_host"].append(cpu_up)
            results[kind]["cpu_to_guest"].append(cpu_down)
    return {k: {m: summary(v) for m, v in d.items()} for k, d in results.items()}


# --- 2. packet rate into the TAP ----------------------------------------------------------


def bench_pps(args, workdir: Path) -> dict:
    results: dict = {}
    for size in (64, 1500):
        for kind in (*pyvhost_kinds(), "dpdk"):
            results[f"{kind}/{size}"] = {"mpps": [], "gen_mpps": [], "cpu_per_gb": []}
    for r in range(args.repeats):
        for size in (64, 1500):
            for kind in (*pyvhost_kinds(), "dpdk"):
                print(f"  packet rate run {r + 1}/{args.repeats}: {kind}, {size}-byte frames",
                      flush=True)  # fmt: skip
                mpps, gen, cpu = pps_once(kind, size, args.seconds, workdir)
                d = results[f"{kind}/{size}"]
                d["mpps"].append(mpps)
                d["gen_mpps"].append(gen)
                d["cpu_per_gb"].append(cpu)
    return {k: {m: summary(v) for m, v in d.items()} for k, d in results.items()}


def start_tap_backend(kind: str, ifname: str, sock: str, netdev: str = ""):
    """The backend under test on a TAP in this namespace: (process, its PID).

    The TAP needs no address, so it stays here, up, with IPv6 off so the
    kernel adds no frames of its own.
    """
    if kind.startswith("pyvhost"):
        tuning = [FROM_TREE + BEFORE[kind]] if kind in BEFORE else []
        backend = start_pyvhost(pyvhost_net(sock, ifname, tuning, netdev), sock)
        pin(backend.pid, BACKEND_CORE)
        pid = backend.pid
    else:
        backend = Testpmd(
            f"net_vhost0,iface={sock},queues=1", ["--forward-mode=io", "--auto-start"],
            prefix=f"bench-{uuid.uuid4().hex[:6]}",
            # All of it on the backend's core, as pyvhost is: the forwarding
            # lcore, and with the main lcore EAL's interrupt and vhost threads.
            lcores=f"0@{BACKEND_CORE},1@{BACKEND_CORE}", taskset=BACKEND_CORE,
            extra_vdevs=[f"net_tap0,iface={ifname}"],
        )  # fmt: skip
        try:
            backend.wait_for_socket(sock)  # the vhost port probes first, then the tap port
            wait_for(lambda: link_exists(ifname), 20, "testpmd's TAP")
        except BaseException:
            backend.kill()
            raise
        pid = backend.proc.pid
    try:
        set_sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")
        ip("link", "set", "dev", ifname, "up")
    except BaseException:
        stop_backend(backend)
        raise
    return backend, pid


def stop_backend(backend) -> None:
    if isinstance(backend, Testpmd):
        backend.kill()
    elif backend is not None:
        backend.stop()


def pps_once(
    kind: str, size: int, seconds: int, workdir: Path, netdev: str = ""
) -> tuple[float, float, float]:
    """Frames per second arriving on the TAP, written there by the backend."""
    ifname = f"pb{uuid.uuid4().hex[:8]}"
    sock = str(workdir / f"pps-{kind}-{uuid.uuid4().hex[:6]}.sock")  # testpmd leaves its file
    backend = gen = None
    try:
        backend, pid = start_tap_backend(kind, ifname, sock, netdev)
        gen = Testpmd(
            f"net_virtio_user0,path={sock},queues=1,queue_size=256",
            ["--forward-mode=txonly", f"--txpkts={size}", "--auto-start"],
            prefix=f"gen-{uuid.uuid4().hex[:6]}", cores=f"{GUEST_CORE},{BACKEND_CORE}",
            main_lcore=int(BACKEND_CORE),  # its forwarding lcore is then the guest's core
        )  # fmt: skip
        gen.wait_started()
        gen_start = time.monotonic()
        time.sleep(1)
        p0, b0 = tap_counters(ifname)
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        if isinstance(backend, Testpmd) and backend.proc.poll() is not None:
            raise RuntimeError(
                f"testpmd (backend) exited:\n{backend.proc.communicate()[0][-2000:]}"
            )
        p1, b1 = tap_counters(ifname)
        c1, t1 = cpu_seconds(pid), time.monotonic()
        stats = gen.stop()
        # What the generator got into the ring. Its attempts against a full ring
        # (TX-dropped) cost it nothing and say nothing; its capacity shows in the
        # DPDK runs, where the same generator keeps a faster backend busy.
        gen_rate = stats.tx_packets / 1e6 / (time.monotonic() - gen_start)
        mpps = (p1 - p0) / (t1 - t0) / 1e6
        gbytes = (b1 - b0) / 1e9
        return mpps, gen_rate, (c1 - c0) / gbytes if gbytes else float("nan")
    finally:
        if gen is not None:
            gen.kill()
        stop_backend(backend)


def bench_rx_pps(args, workdir: Path) -> dict:
    results: dict = {}
    for r in range(args.repeats):
        for size in (64, 1500):
            for kind in (*pyvhost_kinds(), "dpdk"):
                print(f"  receive packet rate run {r + 1}/{args.repeats}: {kind}, "
                      f"{size}-byte frames", flush=True)  # fmt: skip
                run = rx_pps_once(kind, size, args.seconds, workdir)
                d = results.setdefault(f"{kind}/{size}", {k: [] for k in run})
                for k, v in run.items():
                    d[k].append(v)
    return {k: {m: summary(v) for m, v in d.items()} for k, d in results.items()}


# The receiver's ring: deep enough that the backend keeps delivering while the
# receiver, which shares the generator's core, waits for its time slice.
RX_RING = 4096
# The TAP's queue to the backend (tun's default is 500): room for a few ms of
# the generator's offer while the backend is busy with a batch, for both backends.
RX_TAP_QUEUE = 10000


def tap_tx_counters(ifname: str) -> tuple[int, int]:
    """(tx_packets, tx_dropped) of the TAP: frames the kernel queued for the
    backend to read, and frames it dropped because that queue was full."""
    tx = link_stats(ifname)["tx"]
    return tx["packets"], tx["dropped"]


def rx_pps_once(kind: str, size: int, seconds: int, workdir: Path, netdev: str = "") -> dict:
    """Frames injected into the TAP (testpmd's af_packet PMD, txonly) that reach a
    testpmd virtio_user front-end in rxonly mode, through the backend under test.

    The generator's offer is what reached the TAP: frames queued for the
    backend plus frames dropped because the backend left the queue full. When
    it is above what was delivered, the generator was not the bottleneck."""
    ifname = f"pb{uuid.uuid4().hex[:8]}"
    sock = str(workdir / f"rx-{kind}-{uuid.uuid4().hex[:6]}.sock")
    backend = receiver = gen = None
    try:
        backend, pid = start_tap_backend(kind, ifname, sock, netdev)
        ip("link", "set", "dev", ifname, "txqueuelen", str(RX_TAP_QUEUE))
        # The receiver and the generator share core 0; the backend has core 1.
        receiver = Testpmd(
            f"net_virtio_user0,path={sock},queues=1,queue_size={RX_RING}",
            ["--forward-mode=rxonly", "--auto-start", f"--rxd={RX_RING}"],
            prefix=f"rx-{uuid.uuid4().hex[:6]}", cores=f"{GUEST_CORE},{BACKEND_CORE}",
            main_lcore=int(BACKEND_CORE),
        )  # fmt: skip
        receiver.wait_started()
        gen = Testpmd(
            f"net_af_packet0,iface={ifname},qdisc_bypass=1,framecnt=4096",
            ["--forward-mode=txonly", f"--txpkts={size}", "--auto-start"],
            prefix=f"gen-{uuid.uuid4().hex[:6]}", cores=f"{GUEST_CORE},{BACKEND_CORE}",
            main_lcore=int(BACKEND_CORE),
        )  # fmt: skip
        gen.wait_started()
        # testpmd reports its counts only when it exits: the window runs from
        # the generator's start to its stop, and the receiver then gets half a
        # second to take what the backend still holds.
        (q0, x0), c0, t0 = tap_tx_counters(ifname), cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        gen.stop()
        (q1, x1), c1, t1 = tap_tx_counters(ifname), cpu_seconds(pid), time.monotonic()
        time.sleep(0.5)
        delivered = receiver.stop().rx_packets
        elapsed = t1 - t0
        return {
            "mpps": delivered / elapsed / 1e6,
            "offered_mpps": (q1 - q0 + x1 - x0) / elapsed / 1e6,
            "dropped_share": (x1 - x0) / max(1, q1 - q0 + x1 - x0),
            "backend_cpu": (c1 - c0) / elapsed,
        }
    finally:
        for t in (gen, receiver):
            if t is not None:
                t.kill()
        stop_backend(backend)


# --- 2c. queue pairs in worker processes ---------------------------------------------------


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def bench_workers(args, workdir: Path) -> dict:
    """64-byte frames into the TAP over 1 and 2 queue pairs, each pair in its own
    worker process, and 2 pairs in one process for comparison. The generator
    (testpmd txonly, one forwarding lcore for all queues) busy-polls core 0; the
    workers go one per core from core 1, so with 2 pairs worker 1 shares core
    0 with the generator. Per worker: CPU seconds and frames, for the cost per
    frame that the scaling model rests on."""
    runs = {"workers/1": (1, True), "workers/2": (2, True), "one-process/2": (2, False)}
    out: dict = {name: {} for name in runs}
    for r in range(args.repeats):
        for name, (pairs, workers) in runs.items():
            print(f"  queue pairs run {r + 1}/{args.repeats}: {name}", flush=True)
            for k, v in workers_once(pairs, workers, args.seconds, workdir).items():
                out[name].setdefault(k, []).append(v)
    return {name: {k: summary(v) for k, v in d.items()} for name, d in out.items()}


def workers_once(pairs: int, workers: bool, seconds: int, workdir: Path) -> dict:
    from pyvhost.stats import fetch

    ifname = f"pb{uuid.uuid4().hex[:8]}"
    sock = str(workdir / f"w-{uuid.uuid4().hex[:6]}.sock")
    tuning = ["--workers"] if workers else []
    backend = start_pyvhost(pyvhost_net(sock, ifname, tuning, f",queues={pairs}"), sock)
    pin(backend.pid, BACKEND_CORE)
    gen = None
    try:
        set_sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")
        ip("link", "set", "dev", ifname, "up")
        gen = Testpmd(
            f"net_virtio_user0,path={sock},queues={pairs},queue_size=256",
            ["--forward-mode=txonly", "--txpkts=64", f"--txq={pairs}", f"--rxq={pairs}",
             "--auto-start"],
            prefix=f"gen-{uuid.uuid4().hex[:6]}", cores=f"{GUEST_CORE},{BACKEND_CORE}",
            main_lcore=int(BACKEND_CORE),  # its forwarding lcore is then core 0
        )  # fmt: skip
        gen.wait_started()
        procs = [backend.pid]
        if workers:
            wait_for(lambda: len(children(backend.pid)) == pairs, 20, "the workers")
            procs = children(backend.pid)
            for i, w in enumerate(procs):  # one per core, from the backend's core on
                pin(w, str((int(BACKEND_CORE) + i) % os.cpu_count()))
        gen_start = time.monotonic()
        time.sleep(1)
        stats = sock + ".stats"
        q0 = fetch(stats)["queues"]
        p0 = tap_counters(ifname)[0]
        c0, t0 = [cpu_seconds(p) for p in procs], time.monotonic()
        time.sleep(seconds)
        q1 = fetch(stats)["queues"]
        p1 = tap_counters(ifname)[0]
        c1, t1 = [cpu_seconds(p) for p in procs], time.monotonic()
        sent = gen.stop().tx_packets
        elapsed = t1 - t0
        frames = [q1[f"tx{i}"]["packets"] - q0[f"tx{i}"]["packets"] for i in range(pairs)]
        result = {
            "mpps": (p1 - p0) / elapsed / 1e6,
            "gen_mpps": sent / (time.monotonic() - gen_start) / 1e6,
        }
        for i, (a, b) in enumerate(zip(c0, c1, strict=True)):
            name = f"worker{i}" if workers else "process"
            result[f"{name}_cpu"] = (b - a) / elapsed
            share = frames[i] if workers else sum(frames)
            result[f"{name}_us_per_frame"] = (b - a) / max(1, share) * 1e6
        return result
    finally:
        if gen is not None:
            gen.kill()
        backend.stop()


# --- 3. large frames and 5. latency (the Python front-end as the guest) ------------------


def bench_tso(args, workdir: Path) -> dict:
    variants = pyvhost_variants(args)
    return {name: tso_runs(args, workdir, tuning) for name, tuning in variants.items()}


def tso_runs(args, workdir: Path, tuning: list[str], netdev: str = "") -> dict:
    res: dict[str, list[float]] = {}
    # This process is the front-end (the guest): on the guest's core.
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(GUEST_CORE)})
    try:
        for r in range(args.repeats):
            print(f"  64 KiB TSO run {r + 1}/{args.repeats} {' '.join(tuning)}", flush=True)
            for k, v in tso_once(args, workdir, tuning, netdev).items():
                res.setdefault(k, []).append(v)
    finally:
        os.sched_setaffinity(0, affinity)
    return {k: summary(v) for k, v in res.items()}


def tso_once(args, workdir: Path, tuning: list[str], netdev: str) -> dict[str, float]:
    from frames import gso_frame_and_header
    from pyvhost.frontend.net import NetFrontend

    netns = NetNamespace("pyvhost-bench")
    ifname = f"pb{uuid.uuid4().hex[:8]}"
    sock = str(workdir / "tso.sock")
    d = start_pyvhost(pyvhost_net(sock, ifname, tuning, netdev), sock)
    pin(d.pid, BACKEND_CORE)
    out: dict[str, float] = {}
    try:
        ip("link", "set", "dev", ifname, "netns", netns.name)
        netns.ip("link", "set", "dev", ifname, "up")
        c0 = cpu_seconds(d.pid)
        # 16 KiB RX buffers, as a Linux guest's mergeable buffers grow to under
        # bulk traffic: 5 chains per 64 KiB frame rather than 33; rings of 1024
        # (QEMU's rx_queue_size=1024), so the front-end is not the bound.
        with NetFrontend.connect(sock, rx_buf_size=16384, queue_size=TSO_RING) as fe:
            frame, hdr = gso_frame_and_header(fe.hdr_size, to_host=True)
            _, b0 = tap_counters(ifname, netns)
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                for _ in range(64):
                    try:
                        fe.send(frame, header=hdr)
                    except BlockingIOError:
                        time.sleep(0)
            _, b1 = tap_counters(ifname, netns)
            out["to_host_gbits"] = (b1 - b0) * 8 / (time.monotonic() - t0) / 1e9
            gbits, offered, cpu = tso_to_guest(fe, netns, ifname, args.seconds, d.pid)
            out["to_guest_gbits"] = gbits
            out["to_guest_offered_gbits"] = offered
            out["to_guest_backend_cpu"] = cpu
        out["backend_cpu_seconds"] = cpu_seconds(d.pid) - c0
    finally:
        d.stop()
        netns.delete()
    return out


# The 64 KiB frames to the front-end: the injector is paced to this rate, the
# rings are this deep. An unpaced injector spins on the core it shares with the
# front-end (a TAP gives no back-pressure, a full queue drops) and bounds the run.
TSO_OFFER_GBITS = 16
TSO_RING = 1024


def tso_to_guest(
    fe, netns: NetNamespace, ifname: str, seconds: int, pid: int
) -> tuple[float, float, float]:
    """An injector in the namespace sends 64 KiB GSO frames at TSO_OFFER_GBITS; the
    front-end takes them as a packet sink does, without reading them.
    Returns (Gbit/s delivered, Gbit/s the injector offered, backend CPU share)."""
    inj = netns.popen("taskset", "-c", GUEST_CORE, sys.executable,
                      str(Path(__file__).with_name("gso_inject.py")), ifname, str(seconds),
                      str(TSO_OFFER_GBITS), stdout=subprocess.PIPE, text=True)  # fmt: skip
    fe.post_rx()
    got = 0
    t0, c0 = time.monotonic(), cpu_seconds(pid)
    while time.monotonic() - t0 < seconds:
        got += fe.discard(timeout=0.2)[1]
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(pid) - c0
    out = inj.communicate(timeout=30)[0]
    offered = float(out.split()[-2]) if out.strip() else float("nan")
    return got * 8 / elapsed / 1e9, offered, cpu / elapsed


def bench_latency(args, workdir: Path) -> dict:
    out = {}
    for name, tuning in pyvhost_variants(args).items():
        print(f"  latency: {name}", flush=True)
        out[name] = latency_run(workdir, tuning)
    return out


def latency_run(workdir: Path, tuning: list[str]) -> dict:
    from pyvhost.frontend.net import NetFrontend

    rtts: list[float] = []
    netns = NetNamespace("pyvhost-bench")
    ifname = f"pb{uuid.uuid4().hex[:8]}"
    sock = str(workdir / "lat.sock")
    d = start_pyvhost(pyvhost_net(sock, ifname, tuning), sock)
    pin(d.pid, BACKEND_CORE)
    echo = None
    try:
        ip("link", "set", "dev", ifname, "netns", netns.name)
        netns.ip("link", "set", "dev", ifname, "up")
        echo = netns.popen("taskset", "-c", GUEST_CORE, sys.executable,
                           str(Path(__file__).with_name("echo.py")), ifname)  # fmt: skip
        time.sleep(1)
        with NetFrontend.connect(sock) as fe:
            fe.post_rx()
            frame = bytes.fromhex("020000000001525400123456") + b"\x88\xb5" + bytes(50)
            for _ in range(2000):
                t = time.perf_counter()
                fe.send(frame)
                while not [f for f in fe.receive(timeout=1.0) if f[12:14] == b"\x88\xb5"]:
                    pass
                rtts.append((time.perf_counter() - t) * 1e6)
    finally:
        if echo is not None:
            echo.terminate()
            echo.wait()
        d.stop()
        netns.delete()
    rtts = rtts[100:]  # warm-up
    rtts.sort()
    return {"median_us": statistics.median(rtts), "p99_us": rtts[int(len(rtts) * 0.99)],
            "samples": len(rtts)}  # fmt: skip


# --- report ---------------------------------------------------------------------------------


def ratio_of(a: dict, b: dict) -> str:
    """The ratio of two summaries: of their medians, and the min and max of the
    per-repeat ratios (the two ran in the same repeat, one after the other)."""
    per_run = [x / y for x, y in zip(a["runs"], b["runs"], strict=True) if y]
    med = a["median"] / b["median"]
    return f"{med:.2f} (min {min(per_run):.2f}, max {max(per_run):.2f})"


def fmt(s: dict, unit: str = "", digits: int = 2) -> str:
    return (f"{s['median']:.{digits}f}{unit} (min {s['min']:.{digits}f}, "
            f"max {s['max']:.{digits}f})")  # fmt: skip


def chart(ratios: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(ratios)
    ax.barh(names, [ratios[n] for n in names], color="#4878a8")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("pyvhost / anchor (median; > 1 means pyvhost is faster)")
    ax.set_title("pyvhost side by side")
    for i, n in enumerate(names):
        ax.text(ratios[n], i, f" {ratios[n]:.2f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--only", default="throughput,pps,rxpps,workers,tso,latency")
    ap.add_argument(
        "--workers",
        action="store_true",
        help="add the queue-pairs-in-worker-processes run to --only (the same as "
        "--only ...,workers); with --only workers, that run alone",
    )
    ap.add_argument(
        "--untuned",
        action="store_true",
        help="also run the guest on pyvhost without busy polling and moderation "
        "(--poll-us 0 --tx-usecs 0 --rx-usecs 0): before and after the tuning",
    )
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="also run pyvhost with these `pyvhost net` options (quoted; repeatable) "
        "in the throughput, tso and latency comparisons (and --before REV with them too), "
        'e.g. --also "--poll-us 200"',
    )
    ap.add_argument(
        "--before",
        metavar="REV",
        help="also run pyvhost as it was at git revision REV (exported beside this "
        "tree) in every comparison: before and after from one invocation",
    )
    ap.add_argument(
        "--device",
        default="",
        metavar="PROPERTIES",
        help="more virtio-net-pci properties for every guest in the throughput run, "
        "on pyvhost and on QEMU's tap alike, e.g. --device mrg_rxbuf=off",
    )
    ap.add_argument(
        "--dpdk-guest",
        action="store_true",
        help="also run the guest through testpmd vhost+tap (fails here, see doc)",
    )
    args = ap.parse_args()
    which = set(args.only.split(","))
    if args.workers:
        which.add("workers")
    if os.geteuid() != 0:
        print("bench/run.py needs root (TAPs, namespaces, hugepages)", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"pyvhost-bench-{os.getpid()}"
    workdir.mkdir()
    if args.before:
        BEFORE[f"pyvhost@{args.before}"] = export_tree(args.before, workdir)
    machine = (f"{platform.python_implementation()} {platform.python_version()}, "
               f"{os.cpu_count()} cores, {platform.machine()}")  # fmt: skip
    print(f"machine: {machine}")
    print(
        f"pinning: guest/QEMU, generators, iperf3 server on core {GUEST_CORE}; "
        f"backend under test (pyvhost, or testpmd's forwarding lcore) on core {BACKEND_CORE}"
    )
    results: dict = {"machine": machine, "repeats": args.repeats, "seconds": args.seconds,
                     "pinning": {"guest": GUEST_CORE, "backend": BACKEND_CORE}}  # fmt: skip
    if args.device:
        print(f"guests' virtio-net-pci: also {args.device} (pyvhost's and QEMU's tap alike)")
        results["device_properties"] = args.device
    pages = None
    try:
        if which & {"throughput", "pps", "rxpps", "workers"}:
            pages = Hugepages(1024)  # two testpmds at once (backend and generator), -m 512 each
        if "throughput" in which:
            print("1. guest throughput (iperf3 TCP, one TCG guest)")
            results["throughput"] = bench_throughput(args, ensure_image(print), workdir)
        if "pps" in which:
            print("2. packet rate into the TAP (testpmd virtio_user txonly as the generator)")
            results["pps"] = bench_pps(args, workdir)
        if "rxpps" in which:
            print("2b. packet rate out of the TAP (af_packet txonly in, virtio_user rxonly out)")
            results["rx_pps"] = bench_rx_pps(args, workdir)
        if "workers" in which:
            print("2c. queue pairs in worker processes, 64-byte frames into the TAP")
            results["workers"] = bench_workers(args, workdir)
        if "tso" in which:
            print("3. 64 KiB TSO frames, Python front-end through pyvhost")
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            results["tso"] = bench_tso(args, workdir)
        if "latency" in which:
            print("5. latency, 64-byte ping-pong front-end -> pyvhost -> TAP -> echo")
            results["latency"] = bench_latency(args, workdir)
    finally:
        if pages is not None:
            pages.release()
        subprocess.run(["rm", "-rf", str(workdir)])
    report(results)
    return 0


def report(results: dict) -> None:
    ratios: dict[str, float] = {}
    print()
    if "throughput" in results:
        t = results["throughput"]
        print("Guest throughput, Gbit/s (median of runs, min, max); backend CPU s/GB")
        for kind in t:
            k = t[kind]
            print(f"  {kind:22} to host {fmt(k['to_host'])}  to guest {fmt(k['to_guest'])}"
                  f"  cpu/GB {k['cpu_per_gb']['median']:.2f}")  # fmt: skip
            if "cpu_to_host" in k:  # the two directions' costs, each its own median
                print(f"  {'':22} cpu/GB to host {k['cpu_to_host']['median']:.2f}"
                      f"  to guest {k['cpu_to_guest']['median']:.2f}")  # fmt: skip
        for anchor in [a for a in ("qemu-tap", "dpdk") if a in t]:
            for kind in [k for k in t if k.startswith("pyvhost")]:
                cpu = ratio_of(t[kind]["cpu_per_gb"], t[anchor]["cpu_per_gb"])
                print(f"  {kind}/{anchor} CPU per GB: {cpu} (target at most 1.5)")
            for d in ("to_host", "to_guest"):
                ratio = t["pyvhost"][d]["median"] / t[anchor][d]["median"]
                ratios[f"iperf3 {d.replace('_', ' ')} vs {anchor}"] = ratio
                print(f"  pyvhost/{anchor} {d}: {ratio:.2f}")
                for kind in [k for k in t if k.startswith("pyvhost") and k != "pyvhost"]:
                    other = t[kind][d]["median"] / t[anchor][d]["median"]
                    print(f"  {kind}/{anchor} {d}: {other:.2f}")
    if "pps" in results:
        p = results["pps"]
        print("Packet rate into the TAP, Mpps (frames the generator got in, in brackets); CPU s/GB")
        for key, d in p.items():
            print(f"  {key:13} {fmt(d['mpps'], digits=3)}  [gen {d['gen_mpps']['median']:.3f}]"
                  f"  cpu/GB {d['cpu_per_gb']['median']:.2f}")  # fmt: skip
        for size in (64, 1500):
            for kind in pyvhost_kinds():
                a, b = p[f"{kind}/{size}"]["mpps"], p[f"dpdk/{size}"]["mpps"]
                if kind == "pyvhost":
                    ratios[f"{size}-byte pps vs dpdk"] = a["median"] / b["median"]
                print(f"  {kind}/dpdk {size}-byte: {ratio_of(a, b)} (target 0.7)")
    if "rx_pps" in results:
        p = results["rx_pps"]
        print(
            "Packet rate from the TAP to the front-end, Mpps; [the generator's offer to"
            " the TAP, the share dropped there as the backend left it full (target: under"
            " 5%)]; backend CPU"
        )
        for key, d in p.items():
            offer, dropped = d["offered_mpps"]["median"], d["dropped_share"]["median"]
            print(f"  {key:13} {fmt(d['mpps'], digits=3)}  [offered {offer:.3f}, dropped "
                  f"{dropped:.0%}]  cpu {d['backend_cpu']['median']:.0%}")  # fmt: skip
        for size in (64, 1500):
            for kind in pyvhost_kinds():
                a, b = p[f"{kind}/{size}"]["mpps"]["median"], p[f"dpdk/{size}"]["mpps"]["median"]
                if kind == "pyvhost":
                    ratios[f"{size}-byte rx pps vs dpdk"] = a / b
                print(f"  {kind}/dpdk {size}-byte receive: {a / b:.2f}")
    if "workers" in results:
        w = results["workers"]
        print("Queue pairs in worker processes, 64-byte frames into the TAP, Mpps "
              "[generator's own rate]; per process CPU share and us of CPU per frame")  # fmt: skip
        for name, d in w.items():
            procs = sorted(k[: -len("_cpu")] for k in d if k.endswith("_cpu"))
            costs = "  ".join(
                f"{p} {d[p + '_cpu']['median']:.0%} {d[p + '_us_per_frame']['median']:.2f} us"
                for p in procs
            )
            print(f"  {name:14} {fmt(d['mpps'], digits=3)}  [gen {d['gen_mpps']['median']:.3f}]"
                  f"  {costs}")  # fmt: skip
        one, two = w["workers/1"], w["workers/2"]
        ratio = two["mpps"]["median"] / one["mpps"]["median"]
        ratios["2 workers vs 1 (measured)"] = ratio
        per_frame = [two[k]["median"] for k in two if k.endswith("_us_per_frame")]
        model = 2 * one["worker0_us_per_frame"]["median"] / max(per_frame)
        print(
            f"  2 workers / 1, measured: {ratio_of(two['mpps'], one['mpps'])} (target 1.7; "
            "the generator busy-polls core 0, which worker 1 shares)"
        )
        print(
            f"  2 workers / 1, scaling model (a core each, rate = 1 / CPU per frame): {model:.2f}"
            " (target 1.7)"
        )
    if "tso" in results:
        for kind, s in results["tso"].items():
            print(f"64 KiB TSO frames, {kind}: to host {fmt(s['to_host_gbits'])} Gbit/s, "
                  f"to guest {fmt(s['to_guest_gbits'])} Gbit/s "
                  f"[offered {fmt(s['to_guest_offered_gbits'])}, backend CPU "
                  f"{s['to_guest_backend_cpu']['median']:.0%}] (target 10)")  # fmt: skip
    if "latency" in results:
        for kind, lat in results["latency"].items():
            print(f"Latency, {kind}: median {lat['median_us']:.0f} us, p99 "
                  f"{lat['p99_us']:.0f} us ({lat['samples']} samples)")  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"results-{stamp}.json").write_text(json.dumps(results, indent=1))
    if ratios:
        try:
            chart(ratios, OUT / f"ratios-{stamp}.png")
            print(f"wrote {OUT}/results-{stamp}.json and ratios-{stamp}.png")
        except ImportError:
            print(f"wrote {OUT}/results-{stamp}.json (pip install matplotlib for the chart)")


if __name__ == "__main__":
    sys.exit(main())
