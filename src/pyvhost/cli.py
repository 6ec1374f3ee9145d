"""pyvhost's command line.

pyvhost net (--socket-path PATH [--client] | --fd FDNUM) --netdev tap,OPTIONS
            [--mac MAC] [--mtu N] [--user USER] [--group GROUP]
pyvhost stats --socket PATH [--json]
pyvhost loopback --socket-path PATH [--client] [--queue-pairs N]
pyvhost-net ...  is `pyvhost net ...`: the back-end program of QEMU's conventions
"""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import pwd
import signal
import socket
import stat
import sys

from pyvhost.errors import OptionError, PyvhostError

log = logging.getLogger("pyvhost")


LOG_LEVELS = ("error", "warning", "info", "debug")


def _logging_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument(
        "--log-level", choices=LOG_LEVELS, help="log at this level and above (default: warning)"
    )


def _endpoint(p: argparse.ArgumentParser) -> None:
    """The vhost-user socket, as QEMU's back-end program conventions name it."""
    g = p.add_argument_group("vhost-user socket (one of --socket-path, --fd)")
    g.add_argument(
        "--socket-path",
        "--socket",
        dest="socket",
        metavar="PATH",
        help="listen on PATH for the front-end (QEMU's chardev socket path)",
    )
    g.add_argument(
        "--fd",
        type=int,
        metavar="FDNUM",
        help="an inherited Unix socket: a listening one (socket activation; LISTEN_FDS "
        "is read too) or one connected to a front-end",
    )
    g.add_argument(
        "--client",
        action="store_true",
        help="connect to a front-end listening on PATH instead (QEMU's server=on)",
    )
    p.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print this back-end's capabilities as JSON (QEMU's vhost-user.json) and exit",
    )
    _logging_options(p)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# Measured with bench/run.py on a TCG guest (BENCHMARKS.md, "tuning").
DEFAULT_POLL_US = 0
DEFAULT_TX_USECS = 1000
DEFAULT_RX_USECS = 1000
DEFAULT_RX_DEFER_US = 400
DEFAULT_TX_DEFER_US = 400


def build_parser() -> argparse.ArgumentParser:
    from pyvhost import __version__

    parser = argparse.ArgumentParser(
        prog="pyvhost",
        description="A vhost-user virtio-net back-end in Python: serves a VM's NIC (QEMU, "
        "libvirt, DPDK virtio_user) and bridges it to a Linux TAP, or switches VMs.",
        epilog=_examples(
            "pyvhost net --socket-path /run/vm1.sock --netdev tap,ifname=vm1",
            "pyvhost qemu-args --socket /run/vm1.sock   # what to give QEMU",
            "pyvhost demo                               # a guest, ping and iperf3",
            "pyvhost COMMAND --help                     # each command's options",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pyvhost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, *examples: str, description: str = ""
    ) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description or help[0].upper() + help[1:] + ".",
            epilog=_examples(*examples) if examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    net = command(
        "net",
        "serve a virtio-net device bridged to a TAP",
        "pyvhost net --socket-path /run/vm1.sock --netdev tap,ifname=vm1",
        "pyvhost net --socket-path /run/vm1.sock --netdev tap,ifname=vm1,queues=2,vhost=on",
        "pyvhost net --fd 3 --netdev tap,ifname=vm1   # socket-activated (systemd)",
        "pyvhost net --print-capabilities",
    )
    add_net_options(net)

    st = command(
        "stats",
        "print a running pyvhost net's or switch's counters (per queue, per port)",
        "pyvhost stats --socket /run/vm1.sock",
        "pyvhost stats --control /run/sw.ctl --json",
    )
    st.add_argument("--socket", metavar="PATH", help="a pyvhost net's --socket-path")
    st.add_argument(
        "--stats-socket",
        "--control",
        metavar="PATH",
        help="or its control socket (a switch's --control)",
    )
    st.add_argument("--json", action="store_true", help="print JSON")

    sw = command(
        "switch",
        "switch VMs (vhost-user ports) to each other and to TAPs, with Python hooks",
        "pyvhost switch --port vm1=/run/vm1.sock --port vm2=/run/vm2.sock "
        "--uplink up=tap,ifname=sw0",
        "pyvhost switch --config switch.toml",
        description="An L2 learning switch: MAC table with ageing, 802.1Q access and "
        "trunk ports, per-port MTU, Python hooks per port. Ports come from the options "
        "below or from a TOML file (--config); both may be given.",
    )
    sw.add_argument("--config", metavar="FILE.toml", help="ports, uplinks and their settings")
    sw.add_argument(
        "--port",
        action="append",
        metavar="NAME=SOCKET[,client]",
        help="a VM port on a vhost-user socket (client: connect to a listening QEMU)",
    )
    sw.add_argument(
        "--uplink", action="append", metavar="NAME=tap,OPTIONS", help="a TAP, --netdev grammar"
    )
    sw.add_argument("--vlan", action="append", metavar="PORT=VID", help="an access port's VLAN")
    sw.add_argument(
        "--trunk",
        action="append",
        metavar="PORT=VID:VID...[,native=VID]",
        help="a trunk port's tagged VLANs (and its untagged one)",
    )
    sw.add_argument("--mtu", action="append", metavar="PORT=N", help="a port's MTU (1500)")
    sw.add_argument("--mac", action="append", metavar="PORT=MAC", help="a VM port's MAC")
    sw.add_argument(
        "--lock", action="append", metavar="PORT", help="only the port's --mac may send from it"
    )
    sw.add_argument("--hook", action="append", metavar="PORT=module:function", help="a Python hook")
    sw.add_argument(
        "--control", metavar="PATH", help="control socket (default: first SOCKET.stats)"
    )
    _logging_options(sw)

    hk = command(
        "hook",
        "add, replace, remove or list the hooks of a running switch's port, or of a "
        "pyvhost net's queue pair (ports pair0, pair1, ...)",
        "pyvhost hook --socket /run/vm1.sock pair0 add examples.acl:hook",
        "pyvhost hook --control /run/sw.ctl vm1 list",
    )
    hk.add_argument("--socket", metavar="PATH", help="a pyvhost net's --socket-path")
    hk.add_argument("--control", metavar="PATH", help="or a control socket (a switch's)")
    hk.add_argument("port")
    hk.add_argument("action", choices=("add", "remove", "set", "list"))
    hk.add_argument("specs", nargs="*", metavar="module:function")

    cap = command(
        "capture",
        "live traffic as pcapng (tcpdump -r and Wireshark read it)",
        "pyvhost capture --socket /run/vm1.sock -c 10 -w vm1.pcapng",
        "pyvhost capture --control /run/sw.ctl --port vm1 | tcpdump -r -",
        description="Capture a running pyvhost switch's or pyvhost net's traffic.",
    )
    cap.add_argument("--socket", metavar="PATH", help="a pyvhost net's --socket-path")
    cap.add_argument("--control", metavar="PATH", help="or a control socket (a switch's)")
    cap.add_argument("--port", action="append", metavar="NAME", help="only these ports")
    cap.add_argument("-w", dest="out", default="-", metavar="FILE", help="FILE, or - (stdout)")
    cap.add_argument("-c", "--count", type=int, metavar="N", help="stop after N frames")
    cap.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")

    dp = command(
        "datapath",
        "move a running pyvhost net's queue pairs between the kernel (vhost-net), the "
        "Python datapath in the control process, and worker processes, losslessly",
        "pyvhost datapath --socket /run/vm1.sock python",
        "pyvhost datapath --socket /run/vm1.sock --pair 0 kernel",
        "pyvhost datapath --socket /run/vm1.sock --pair 1 worker",
    )
    dp.add_argument("--socket", required=True, metavar="PATH", help="the daemon's --socket-path")
    dp.add_argument("--stats-socket", metavar="PATH", help="if the daemon was given one")
    dp.add_argument("--pair", type=int, metavar="N", help="only this queue pair (default: all)")
    dp.add_argument("to", choices=("kernel", "python", "worker"))

    demo = command(
        "demo",
        "boot a Linux guest on pyvhost; ping and iperf3 both ways (needs root)",
        "pyvhost demo",
        "pyvhost demo --queues 2 --seconds 3",
        "pyvhost demo --vms 3          # three guests on one pyvhost switch",
    )
    demo.add_argument("--accel", default="tcg", choices=("tcg", "kvm"), help="default: tcg")
    demo.add_argument(
        "--msix",
        action=argparse.BooleanOptionalAction,
        help="force MSI-X on or off (default: on where this QEMU handles it under TCG; "
        "Debian 12's QEMU 7.2 crashes with it)",
    )
    demo.add_argument("--seconds", type=int, default=5, help="iperf3 duration each way")
    demo.add_argument("--queues", type=int, default=1, help="queue pairs")
    demo.add_argument(
        "--vms", type=int, default=1, help="N guests on one pyvhost switch (default 1: pyvhost net)"
    )
    _logging_options(demo)

    qa = command(
        "qemu-args",
        "print QEMU's arguments for a NIC on pyvhost",
        "pyvhost qemu-args --socket /run/vm1.sock --queues 2",
    )
    qa.add_argument("--socket", required=True, metavar="PATH")
    qa.add_argument("--queues", type=int, default=1, metavar="N")
    qa.add_argument("--mem", default="1G", metavar="SIZE", help="guest RAM (shared memfd)")
    qa.add_argument("--mac", default="52:54:00:12:34:56")
    _msix_option(qa)

    lx = command(
        "libvirt-xml",
        "print libvirt's domain XML for a NIC on pyvhost (interface and memoryBacking)",
        "pyvhost libvirt-xml --socket /run/pyvhost/vm1.sock",
        "pyvhost libvirt-xml --socket /tmp/vm1.sock --client   # pyvhost net --client",
        "pyvhost libvirt-xml --socket /tmp/vm1.sock --domain vm1 --kernel vmlinuz "
        "--initrd initrd.gz",
        description="Print the <interface type='vhostuser'> and <memoryBacking> elements "
        "a libvirt domain needs for a NIC on pyvhost, or with --domain a whole minimal "
        "domain (direct kernel boot) around them.",
    )
    lx.add_argument("--socket", required=True, metavar="PATH", help="pyvhost net's socket")
    lx.add_argument(
        "--client",
        action="store_true",
        help="pyvhost net runs with --client (QEMU listens: mode='server')",
    )
    lx.add_argument("--queues", type=int, default=1, metavar="N")
    lx.add_argument("--mac", default="52:54:00:12:34:56")
    lx.add_argument(
        "--reconnect",
        type=int,
        default=1,
        metavar="S",
        help="QEMU reconnects to a restarted pyvhost after S seconds (default 1)",
    )
    _msix_option(lx)
    lx.add_argument("--domain", metavar="NAME", help="print a whole domain of this name")
    lx.add_argument("--memory", type=int, default=512, metavar="MiB", help="with --domain")
    lx.add_argument("--kernel", metavar="PATH", help="with --domain: boot this kernel")
    lx.add_argument("--initrd", metavar="PATH", help="with --domain")
    lx.add_argument("--cmdline", default="console=ttyS0", help="with --domain")
    lx.add_argument(
        "--console", metavar="PATH", help="with --domain: the serial console on this socket"
    )

    vj = command(
        "vhost-user-json",
        "print or install the vhost-user.json file that tells QEMU and libvirt about pyvhost-net",
        "pyvhost vhost-user-json",
        "pyvhost vhost-user-json --install /etc/qemu/vhost-user",
    )
    vj.add_argument(
        "--install",
        metavar="DIR",
        help="write DIR/50-pyvhost-net.json (system: /etc/qemu/vhost-user; per user: "
        "~/.config/qemu/vhost-user)",
    )

    su = command(
        "systemd-units",
        "print or install the systemd units that run pyvhost-net per VM NIC, socket-activated",
        "pyvhost systemd-units",
        "pyvhost systemd-units --install /etc/systemd/system",
    )
    su.add_argument(
        "--install",
        metavar="DIR",
        help="write pyvhost-net@.service, pyvhost-net@.socket and an example drop-in to DIR",
    )

    gb = command("guest", "the demo's guest image", "pyvhost guest build")
    gb.add_argument("action", choices=("build",), help="build (once) and print the paths")
    _logging_options(gb)

    lo = command(
        "loopback",
        "serve a virtio-net device whose cable is looped back (no host networking)",
        "pyvhost loopback --socket-path /tmp/vhost.sock --queue-pairs 2",
    )
    _endpoint(lo)
    lo.add_argument("--queue-pairs", type=int, default=1, metavar="N")
    return parser


def _msix_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--msix",
        action=argparse.BooleanOptionalAction,
        help="force MSI-X vectors on or off (default: decided for the QEMU on PATH; "
        "Debian 12's QEMU 7.2 crashes with them under TCG)",
    )


def add_net_options(net: argparse.ArgumentParser) -> None:
    _endpoint(net)
    net.add_argument(
        "--netdev",
        metavar="tap,OPTIONS",
        help="QEMU's -netdev tap grammar: ifname=, fd=, fds=, script=, downscript=, "
        "sndbuf=, vnet_hdr=, queues=, vhost=, vhostfd=, vhostfds=, vhostforce= (required)",
    )
    net.add_argument("--mac", default="52:54:00:12:34:56", help="the guest's MAC address")
    net.add_argument("--mtu", type=int, help="offer VIRTIO_NET_F_MTU with this MTU")
    net.add_argument(
        "--poll-us",
        type=int,
        default=DEFAULT_POLL_US,
        metavar="N",
        help="busy-poll a TX ring N us after its last frame before waiting for kicks "
        f"again (default {DEFAULT_POLL_US}; 0: off, least CPU)",
    )
    net.add_argument(
        "--tx-usecs",
        type=int,
        default=DEFAULT_TX_USECS,
        metavar="N",
        help="as ethtool -C tx-usecs: signal TX completions at most once per N us, "
        f"a lone one at once (default {DEFAULT_TX_USECS}; 0: every time)",
    )
    net.add_argument(
        "--rx-usecs",
        type=int,
        default=DEFAULT_RX_USECS,
        metavar="N",
        help="as ethtool -C rx-usecs: signal received frames at most once per N us, "
        f"a lone one at once (default {DEFAULT_RX_USECS}; 0: every time)",
    )
    net.add_argument(
        "--rx-defer-us",
        type=int,
        default=DEFAULT_RX_DEFER_US,
        metavar="N",
        help="in a stream of large (GSO) frames to the guest, leave the TAP unread N us "
        "after an event that read only a few, so the next read takes several, as a "
        "NIC's gro_flush_timeout; small frames are never held "
        f"(default {DEFAULT_RX_DEFER_US}; 0: read every frame as it comes)",
    )
    net.add_argument(
        "--tx-defer-us",
        type=int,
        default=DEFAULT_TX_DEFER_US,
        metavar="N",
        help="in a stream of large (TSO) frames from the guest, keep its kicks off and "
        "drain the ring every N us while it has frames, as QEMU's virtio-net tx=timer; "
        f"small frames are sent at their kick (default {DEFAULT_TX_DEFER_US}; 0: off)",
    )
    net.add_argument(
        "--hook",
        action="append",
        metavar="PAIR=module:function",
        help="a Python hook on queue pair PAIR's frames (pair0, pair1, ...); runs in the "
        "Python datapath",
    )
    net.add_argument(
        "--workers",
        action="store_true",
        help="serve each queue pair in a worker process of its own, so queues=N uses N "
        "cores (the control process keeps the vhost-user session); see README, Tuning",
    )
    net.add_argument(
        "--io-uring",
        choices=("auto", "on", "off"),
        default="auto",
        help="write TX frames to the TAP in batches, one io_uring system call per batch "
        "(auto: where the kernel allows it, said once if not; on: required; off: one "
        "writev per frame). With a finite sndbuf= frames go one by one",
    )
    net.add_argument(
        "--no-migration",
        dest="migration",
        action="store_false",
        help="do not offer dirty logging (VHOST_F_LOG_ALL): QEMU then refuses to "
        "live-migrate the guest",
    )
    net.add_argument("--user", help="drop to this user once the TAP is open")
    net.add_argument(
        "--group",
        help="drop to this group once the TAP is open; the socket becomes the group's "
        "(mode 0660), so its members (QEMU's group, e.g. kvm) may connect",
    )
    net.add_argument(
        "--stats-socket",
        metavar="PATH",
        help="where counters are served (default: SOCKET.stats; with --fd, the inherited "
        "socket's path + .stats)",
    )


class SignalWakeup:
    """SIGTERM/SIGINT stop the loop; SIGUSR1 calls on_usr1. Restores handlers on close."""

    def __init__(self, loop, on_usr1=None) -> None:
        self.loop = loop
        self.on_usr1 = on_usr1
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno())
        self._usr1 = False
        loop.add_reader(self._r.fileno(), self._drain)
        sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
        self._old = {s: signal.signal(s, self._handler) for s in sigs}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGUSR1:
            self._usr1 = True  # printed from the loop, not from inside a handler
        else:
            log.info("signal %d: shutting down", signum)
            self.loop.stop()

    def _drain(self) -> None:
        try:
            self._r.recv(64)
        except BlockingIOError:
            pass
        if self._usr1:
            self._usr1 = False
            if self.on_usr1 is not None:
                self.on_usr1()

    def close(self) -> None:
        self.loop.remove_reader(self._r.fileno())
        for s, h in self._old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(self._old_fd)
        self._r.close()
        self._w.close()


def run_daemon(daemon, on_usr1=None) -> int:
    """Serve until SIGTERM or SIGINT, then clean up."""
    wake = SignalWakeup(daemon.loop, on_usr1)
    try:
        daemon.run()
    finally:
        daemon.close()
        wake.close()
    return 0


CAPABILITIES = {"type": "net"}  # vhost-user.json's VHostUserBackendCapabilities


def print_capabilities() -> int:
    print(json.dumps(CAPABILITIES, indent=2))
    return 0


class Endpoint:
    """Where the front-end comes from: a path (listen or, --client, connect), or an
    inherited socket (--fd, LISTEN_FDS). `path` names it for messages and the
    default control socket; it is "" for an inherited socket without a name."""

    def __init__(self, path: str, sock: socket.socket | None = None) -> None:
        self.path = path
        self.sock = sock

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Endpoint:
        from pyvhost.activation import inherited_socket, listen_fds

        activated = listen_fds()
        if args.fd is not None and args.socket:
            raise OptionError("--fd and --socket-path: give one of them, not both")
        fd, option = args.fd, "--fd"
        if fd is None and not args.socket:
            if len(activated) > 1:
                raise OptionError(
                    f"LISTEN_FDS={len(activated)}: pyvhost serves one socket; give the "
                    "socket unit one ListenStream=, or pick one with --fd"
                )
            if not activated:
                raise OptionError(
                    "give --socket-path PATH (the vhost-user socket) or --fd FDNUM (an "
                    "inherited one)"
                )
            fd, option = activated[0], "LISTEN_FDS"
        if fd is None:
            return cls(args.socket)
        if args.client:
            raise OptionError(
                f"--client with {option}: an inherited socket is already listening or "
                "connected; --client is for --socket-path"
            )
        sock = inherited_socket(fd, option)
        try:
            name = sock.getsockname()
        except OSError:
            name = ""
        return cls(name if isinstance(name, str) else "", sock)

    def stats_path(self, explicit: str | None) -> str | None:
        if explicit:
            return explicit
        return self.path + ".stats" if self.path else None

    def owns_path(self, client: bool) -> bool:
        return self.sock is None and not client


def cmd_loopback(args: argparse.Namespace) -> int:
    from pyvhost.devices.loopback import LoopbackNet
    from pyvhost.vhost_user.daemon import Daemon

    if args.print_capabilities:
        return print_capabilities()
    if args.queue_pairs < 1:
        raise OptionError(f"--queue-pairs {args.queue_pairs}: must be at least 1")
    endpoint = Endpoint.from_args(args)
    device = LoopbackNet(args.queue_pairs)
    daemon = Daemon(device, endpoint.path, client=args.client, sock=endpoint.sock)
    notify_ready()
    status = run_daemon(daemon)
    c = device.counters
    print(
        f"loopback: frames={c.frames} bytes={c.bytes} truncated={c.truncated} "
        f"discarded={c.discarded}",
        flush=True,
    )
    return status


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or any(len(p) != 2 for p in parts):
        raise OptionError(f"--mac {text}: expected six hex bytes, e.g. 52:54:00:12:34:56")
    if mac[0] & 1:
        raise OptionError(f"--mac {text}: a multicast address; the first byte must be even")
    return mac


def resolve_ids(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    uid = gid = None
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise OptionError(f"--user {user}: no such user") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OptionError(f"--group {group}: no such group") from None
    return uid, gid


def check_removable(path: str, uid: int | None, gid: int | None, option: str) -> None:
    """After dropping to uid/gid, can we still remove `path` at exit? Say so now if not."""
    if uid is None and gid is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    st = os.stat(directory)
    writable = (
        (uid is not None and st.st_uid == uid and st.st_mode & stat.S_IWUSR)
        or (gid is not None and st.st_gid == gid and st.st_mode & stat.S_IWGRP)
        or st.st_mode & stat.S_IWOTH
    )
    searchable = all(
        os.stat(d).st_mode & stat.S_IXOTH or os.stat(d).st_uid == uid for d in _parents(directory)
    )
    if not (writable and searchable):
        raise OptionError(
            f"{option} {path}: after dropping privileges pyvhost could not remove it at "
            f"exit; use a directory the user can write (e.g. chown it to that user)"
        )


def _parents(directory: str) -> list[str]:
    out = [directory]
    while directory != "/":
        directory = os.path.dirname(directory)
        out.append(directory)
    return out


def drop_privileges(uid: int | None, gid: int | None, paths: list[str]) -> None:
    """Become uid/gid for good; the sockets we created become theirs. Started as
    a user with capabilities (systemd's AmbientCapabilities=CAP_NET_ADMIN), the
    capabilities go instead: the TAP is open, nothing needs them any more."""
    if uid is None and gid is None:
        if os.geteuid() != 0:
            from pyvhost.capabilities import drop_all

            if drop_all():
                log.info("capabilities given up now that the TAP is open")
        return
    for p in paths:
        os.chown(p, -1 if uid is None else uid, -1 if gid is None else gid)
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover
            raise PyvhostError("dropped privileges could be regained; refusing to run")
    log.info("running as uid %d gid %d", os.getuid(), os.getgid())


def cmd_net(args: argparse.Namespace) -> int:
    from pyvhost.backends.tap_netdev import TapNetdev
    from pyvhost.backends.tap_options import parse_netdev
    from pyvhost.backends.uring import probe as uring_probe
    from pyvhost.control import ControlServer
    from pyvhost.devices.net.device import VirtioNet
    from pyvhost.memory import logging_supported
    from pyvhost.net_commands import NetCommands
    from pyvhost.stats import format_table
    from pyvhost.vhost_user.daemon import Daemon
    from pyvhost.virtq.layout import VIRTIO_F_ACCESS_PLATFORM

    if args.print_capabilities:
        return print_capabilities()
    # Everything that needs nothing opened is checked first: a refusal leaves nothing.
    if not args.netdev:
        raise OptionError("--netdev tap,OPTIONS is required (e.g. --netdev tap,ifname=vm1)")
    opts = parse_netdev(args.netdev)
    mac = parse_mac(args.mac)
    if args.mtu is not None and not 68 <= args.mtu <= 65535:
        raise OptionError(f"--mtu {args.mtu}: must be between 68 and 65535")
    for flag, value in (
        ("--poll-us", args.poll_us),
        ("--tx-usecs", args.tx_usecs),
        ("--rx-usecs", args.rx_usecs),
        ("--rx-defer-us", args.rx_defer_us),
        ("--tx-defer-us", args.tx_defer_us),
    ):
        if not 0 <= value <= 1_000_000:
            raise OptionError(f"{flag} {value}: must be between 0 and 1000000 microseconds")
    if args.workers and (opts.vhost or opts.vhostfds):
        raise OptionError(
            "--workers: the pairs of a vhost=on netdev are served by the kernel; drop "
            "--workers, or use vhost=off"
        )
    if args.io_uring == "on":
        why = uring_probe()
        if why is not None:
            raise OptionError(
                f"--io-uring=on: {why}; use --io-uring=auto to write frame by frame where "
                "io_uring cannot be had (kernel.io_uring_disabled, a container's seccomp filter)"
            )
    uid, gid = resolve_ids(args.user, args.group)
    endpoint = Endpoint.from_args(args)
    stats_file = endpoint.stats_path(args.stats_socket)
    if stats_file is None:
        log.warning(
            "no control socket: the inherited socket has no path to name one after; give "
            "--stats-socket PATH for pyvhost stats, hook, capture and datapath"
        )
    else:
        check_removable(stats_file, uid, gid, "--stats-socket")
    if endpoint.owns_path(args.client):
        check_removable(endpoint.path, uid, gid, "--socket-path")
    if uid is not None and opts.downscript:
        log.warning("downscript= will run as --user %s, without root's privileges", args.user)

    netdev = TapNetdev.open(opts)
    for queue in netdev.queues:
        queue.io_uring = args.io_uring
    daemon = stats = None
    try:
        device = VirtioNet(
            netdev.queues,
            mac=mac,
            mtu=args.mtu,
            poll_us=args.poll_us,
            tx_usecs=args.tx_usecs,
            rx_usecs=args.rx_usecs,
            rx_defer_us=args.rx_defer_us,
            tx_defer_us=args.tx_defer_us,
            vhosts=netdev.vhosts,
            migration=args.migration,
            workers=args.workers,
        )
        why = device.dirty_logging_unavailable() or logging_supported()
        if why is not None:
            (log.info if not args.migration else log.warning)("live migration unavailable: %s", why)
        daemon = served = Daemon(device, endpoint.path, client=args.client, sock=endpoint.sock)
        endpoint.sock = None  # the daemon's now

        def iotlb() -> dict | None:
            backend = served.backend
            if backend is None or not backend.acked_features & (1 << VIRTIO_F_ACCESS_PLATFORM):
                return None
            return backend.iommu.stats()

        commands = NetCommands(device, netdev.ifname, endpoint.path, lambda: served.sessions, iotlb)
        snapshot = commands.stats
        for spec in args.hook or []:
            port, _, hook = spec.partition("=")
            commands.hook({"port": port, "add": hook})

        def print_stats() -> None:
            print(format_table(snapshot()), flush=True)

        if stats_file is not None:
            stats = ControlServer(stats_file, daemon.loop, commands.handlers())
        owned = ([stats.path] if stats else []) + (
            [endpoint.path] if endpoint.owns_path(args.client) else []
        )
        if gid is not None and endpoint.owns_path(args.client):
            # --group names who may connect (QEMU's group, e.g. kvm): connecting
            # to a Unix socket takes write permission on it.
            os.chmod(endpoint.path, 0o660)
        drop_privileges(uid, gid, owned)
        where = endpoint.path or f"inherited fd {args.fd}"
        print(
            f"pyvhost: serving virtio-net on {where}, TAP {netdev.ifname} "
            f"({len(netdev.queues)} queue{'s' if len(netdev.queues) > 1 else ''}, "
            f"vnet_hdr={'on' if device.vnet_hdr else 'off'}, "
            f"offloads={'on' if device.offloads else 'off'}, "
            f"datapath={'kernel (vhost-net)' if netdev.vhosts else 'python'})",
            flush=True,
        )
        notify_ready()
        run_daemon(daemon, on_usr1=print_stats)
        daemon = None  # closed by run_daemon
        print_stats()
    finally:
        if stats is not None:
            stats.close()
        if daemon is not None:
            daemon.close()
        if endpoint.sock is not None:
            endpoint.sock.close()
        netdev.close()
    return 0


def notify_ready() -> None:
    """Tell systemd (Type=notify) that the socket is served."""
    from pyvhost.activation import notify

    notify("READY=1")


def cmd_stats(args: argparse.Namespace) -> int:
    from pyvhost.stats import fetch, format_table, stats_path

    if not args.socket and not args.stats_socket:
        raise OptionError("give --socket (a pyvhost net's) or --control (a control socket)")
    snap = fetch(args.stats_socket or stats_path(args.socket))
    if args.json:
        print(json.dumps(snap, indent=1))
    elif snap.get("device") == "switch":
        from pyvhost.switch.server import format_switch

        print(format_switch(snap))
    else:
        print(format_table(snap))
    return 0


def cmd_switch(args: argparse.Namespace) -> int:
    from pyvhost.switch.config import from_args
    from pyvhost.switch.server import SwitchServer, format_switch

    server = SwitchServer(from_args(args))
    ports = ", ".join(
        f"{p.name} ({p.kind}{' ' + p.socket_path if p.kind == 'vm' else ''})"
        for p in [*server.vm_ports, *server.uplinks]
    )
    print(f"pyvhost: switch with ports {ports}; control {server.cfg.control}", flush=True)
    wake = SignalWakeup(server.loop, lambda: print(format_switch(server.stats()), flush=True))
    try:
        server.run()
    finally:
        snapshot = server.stats()
        server.close()
        wake.close()
    print(format_switch(snapshot), flush=True)
    return 0


def cmd_hook(args: argparse.Namespace) -> int:
    from pyvhost.control import request
    from pyvhost.stats import stats_path

    if bool(args.socket) == bool(args.control):
        raise OptionError("give --socket (a pyvhost net) or --control (a control socket)")

    command: dict = {"cmd": "hook", "port": args.port}
    if args.action == "set":
        command["set"] = args.specs
    elif args.action in ("add", "remove"):
        if len(args.specs) != 1:
            raise OptionError(f"hook {args.action} takes one module:function")
        command[args.action] = args.specs[0]
    reply = request(args.control or stats_path(args.socket), command)
    if not reply.get("ok"):
        raise PyvhostError(reply.get("error", "refused"))
    where = f" (datapath: {reply['datapath']})" if "datapath" in reply else ""
    print(f"{reply['port']}: {', '.join(reply['hooks']) or 'no hooks'}{where}")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from pyvhost.capture_client import capture
    from pyvhost.stats import stats_path

    if bool(args.socket) == bool(args.control):
        raise OptionError("give --socket (a pyvhost net) or --control (a control socket)")
    path = args.control or stats_path(args.socket)
    return capture(path, args.port, args.out, args.count, args.seconds)


def cmd_datapath(args: argparse.Namespace) -> int:
    from pyvhost.control import request
    from pyvhost.stats import stats_path

    command: dict = {"cmd": "datapath", "to": args.to}
    if args.pair is not None:
        command["pair"] = args.pair
    reply = request(args.stats_socket or stats_path(args.socket), command)
    if not reply.get("ok"):
        raise PyvhostError(reply.get("error", "refused"))
    for i, kind in enumerate(reply["datapaths"]):
        print(f"pair {i}: {kind}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pyvhost.demo import run

    if not 1 <= args.vms <= 8:
        raise OptionError(f"--vms {args.vms}: from 1 to 8")
    return run(
        accel=args.accel, msix=args.msix, seconds=args.seconds, queues=args.queues, vms=args.vms
    )


def decide_msix(forced: bool | None) -> bool:
    """--msix/--no-msix, or what is known of the QEMU on PATH under TCG."""
    if forced is not None:
        return forced
    from pyvhost.guest.msix import cached_msix
    from pyvhost.guest.qemu import qemu_version

    version = qemu_version()
    msix = cached_msix(version)
    if msix is None:
        print(
            f"pyvhost: QEMU {'.'.join(map(str, version))} is not known to handle MSI-X "
            "with vhost-user under TCG: vectors=0 (run 'pyvhost demo' once to probe it, "
            "or pass --msix where KVM runs the guest)",
            file=sys.stderr,
        )
        return False
    return msix


def cmd_qemu_args(args: argparse.Namespace) -> int:
    import shlex

    from pyvhost.guest.qemu import NicOptions, nic_args

    if args.queues < 1:
        raise OptionError(f"--queues {args.queues}: must be at least 1")
    parse_mac(args.mac)
    msix = decide_msix(args.msix)
    args_ = nic_args(
        NicOptions(args.socket, queues=args.queues, mem=args.mem, mac=args.mac, msix=msix)
    )
    print(shlex.join(args_))
    return 0


def cmd_libvirt_xml(args: argparse.Namespace) -> int:
    from pyvhost.guest.libvirt import LibvirtNic, domain, snippets

    if args.queues < 1:
        raise OptionError(f"--queues {args.queues}: must be at least 1")
    if args.reconnect < 0:
        raise OptionError(f"--reconnect {args.reconnect}: seconds, 0 or more")
    if not os.path.isabs(args.socket):
        raise OptionError(f"--socket {args.socket}: libvirt needs an absolute path")
    parse_mac(args.mac)
    for flag in ("kernel", "initrd", "console"):
        if getattr(args, flag) and not args.domain:
            raise OptionError(f"--{flag} belongs to a whole domain: add --domain NAME")
    nic = LibvirtNic(
        args.socket,
        pyvhost_client=args.client,
        queues=args.queues,
        mac=args.mac,
        reconnect=args.reconnect,
        msix=decide_msix(args.msix),
    )
    if args.domain:
        print(
            domain(
                args.domain,
                nic,
                memory_mib=args.memory,
                kernel=args.kernel and os.path.abspath(args.kernel),
                initrd=args.initrd and os.path.abspath(args.initrd),
                cmdline=args.cmdline,
                console=args.console and os.path.abspath(args.console),
            ),
            end="",
        )
    else:
        print(snippets(nic), end="")
    return 0


VHOST_USER_JSON = "50-pyvhost-net.json"


def pyvhost_net_binary() -> str:
    """The installed pyvhost-net's absolute path: beside this pyvhost, beside this
    Python (a virtualenv's bin), or on PATH."""
    import shutil

    beside = [
        os.path.join(os.path.dirname(os.path.abspath(p)), "pyvhost-net")
        for p in (sys.argv[0], sys.executable)
    ]
    binary = next((b for b in beside if os.access(b, os.X_OK)), shutil.which("pyvhost-net"))
    if binary is None:
        raise PyvhostError(
            "pyvhost-net is not installed beside pyvhost or on PATH (it comes with "
            "'pip install pyvhost'); the file must name it by its absolute path"
        )
    return os.path.abspath(binary)


def vhost_user_description() -> dict:
    """vhost-user.json's VhostUserBackend for pyvhost-net, naming the installed binary."""
    from pyvhost import __version__

    return {
        "description": "pyvhost virtio-net back-end bridged to a TAP",
        "type": "net",
        "binary": pyvhost_net_binary(),
        "tags": [f"pyvhost-{__version__}"],
    }


def systemd_units() -> dict[str, str]:
    """The unit files, with ExecStart naming the installed pyvhost-net."""
    from importlib.resources import files

    binary = pyvhost_net_binary()
    return {
        f.name: f.read_text().replace("@PYVHOST_NET@", binary)
        for f in sorted(files("pyvhost.systemd").iterdir(), key=lambda f: f.name)
        if f.name.startswith("pyvhost-net@")
    }


def cmd_systemd_units(args: argparse.Namespace) -> int:
    units = systemd_units()
    if not args.install:
        for name, text in units.items():
            print(f"# ==> {name} <==\n{text}")
        return 0
    try:
        os.makedirs(args.install, exist_ok=True)
        for name, text in units.items():
            with open(os.path.join(args.install, name), "w") as f:
                f.write(text)
    except OSError as e:
        raise OptionError(f"--install {args.install}: {e.strerror}") from None
    print(f"pyvhost: wrote {', '.join(units)} to {args.install}")
    return 0


def cmd_vhost_user_json(args: argparse.Namespace) -> int:
    text = json.dumps(vhost_user_description(), indent=2) + "\n"
    if not args.install:
        print(text, end="")
        return 0
    try:
        os.makedirs(args.install, exist_ok=True)
        path = os.path.join(args.install, VHOST_USER_JSON)
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise OptionError(f"--install {args.install}: {e.strerror}") from None
    print(f"pyvhost: wrote {path}")
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from pyvhost.guest.image import ensure_image

    image = ensure_image(lambda m: print(m, flush=True))
    print(f"kernel {image.kernel}\ninitrd {image.initrd}")
    return 0


def setup_logging(args: argparse.Namespace) -> None:
    """Logs go to stderr: plain lines when it is not a terminal (journald and
    libvirt's log files add their own timestamps), with the time when it is."""
    if getattr(args, "log_level", None):
        level = getattr(logging, args.log_level.upper())
    else:
        verbose = getattr(args, "verbose", 0)
        level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    fmt = "pyvhost: %(levelname)s: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt)


COMMANDS = {
    "loopback": cmd_loopback,
    "net": cmd_net,
    "stats": cmd_stats,
    "datapath": cmd_datapath,
    "switch": cmd_switch,
    "hook": cmd_hook,
    "capture": cmd_capture,
    "demo": cmd_demo,
    "qemu-args": cmd_qemu_args,
    "libvirt-xml": cmd_libvirt_xml,
    "vhost-user-json": cmd_vhost_user_json,
    "systemd-units": cmd_systemd_units,
    "guest": cmd_guest,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except PyvhostError as e:
        print(f"pyvhost: error: {e}", file=sys.stderr)
        return 2


def net_main(argv: list[str] | None = None) -> int:
    """pyvhost-net: `pyvhost net` as a program of its own, the form QEMU's back-end
    program conventions and vhost-user.json describe."""
    from pyvhost import __version__

    parser = argparse.ArgumentParser(
        prog="pyvhost-net",
        description="A vhost-user virtio-net back-end bridged to a TAP (pyvhost net).",
        epilog=_examples(
            "pyvhost-net --socket-path /run/vm1.sock --netdev tap,ifname=vm1",
            "pyvhost-net --fd 3 --netdev tap,ifname=vm1",
            "pyvhost-net --print-capabilities",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pyvhost {__version__}")
    add_net_options(parser)
    args = parser.parse_args(argv)
    setup_logging(args)
    try:
        return cmd_net(args)
    except PyvhostError as e:
        print(f"pyvhost-net: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
