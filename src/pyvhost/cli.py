"""pyvhost's command line.

pyvhost net --socket PATH [--client] [--mac MAC] [--mtu N] --netdev tap,OPTIONS
            [--user USER] [--group GROUP]
pyvhost stats --socket PATH [--json]
pyvhost loopback --socket PATH [--client] [--queue-pairs N]
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, metavar="PATH", help="vhost-user socket path")
    p.add_argument(
        "--client",
        action="store_true",
        help="connect to a front-end listening on PATH (default: listen on PATH)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")


# Measured with bench/run.py on a TCG guest (BENCHMARKS.md, "tuning").
DEFAULT_POLL_US = 0
DEFAULT_TX_USECS = 1000
DEFAULT_RX_USECS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvhost", description="vhost-user virtio-net back-end")
    sub = parser.add_subparsers(dest="command", required=True)

    net = sub.add_parser("net", help="serve a virtio-net device bridged to a TAP")
    _common(net)
    net.add_argument(
        "--netdev",
        required=True,
        metavar="tap,OPTIONS",
        help="QEMU's -netdev tap grammar: ifname=, fd=, fds=, script=, downscript=, "
        "sndbuf=, vnet_hdr=, queues=, vhost=, vhostfd=, vhostfds=, vhostforce=",
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
        "--hook",
        action="append",
        metavar="PAIR=module:function",
        help="a Python hook on queue pair PAIR's frames (pair0, pair1, ...); runs in the "
        "Python datapath",
    )
    net.add_argument(
        "--no-migration",
        dest="migration",
        action="store_false",
        help="do not offer dirty logging (VHOST_F_LOG_ALL): QEMU then refuses to "
        "live-migrate the guest",
    )
    net.add_argument("--user", help="drop to this user once the TAP is open")
    net.add_argument("--group", help="drop to this group once the TAP is open")
    net.add_argument(
        "--stats-socket", metavar="PATH", help="where counters are served (default: SOCKET.stats)"
    )

    st = sub.add_parser(
        "stats", help="print a running pyvhost net's or switch's counters (per queue, per port)"
    )
    st.add_argument("--socket", metavar="PATH", help="a pyvhost net's --socket")
    st.add_argument(
        "--stats-socket",
        "--control",
        metavar="PATH",
        help="or its control socket (a switch's --control)",
    )
    st.add_argument("--json", action="store_true", help="print JSON")

    sw = sub.add_parser(
        "switch",
        help="switch VMs (vhost-user ports) to each other and to TAPs, with Python hooks",
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
    sw.add_argument("-v", "--verbose", action="count", default=0)

    hk = sub.add_parser(
        "hook",
        help="add, replace, remove or list the hooks of a running switch's port, or of a "
        "pyvhost net's queue pair (ports pair0, pair1, ...)",
    )
    hk.add_argument("--socket", metavar="PATH", help="a pyvhost net's --socket")
    hk.add_argument("--control", metavar="PATH", help="or a control socket (a switch's)")
    hk.add_argument("port")
    hk.add_argument("action", choices=("add", "remove", "set", "list"))
    hk.add_argument("specs", nargs="*", metavar="module:function")

    cap = sub.add_parser(
        "capture",
        help="live traffic as pcapng (tcpdump -r and Wireshark read it)",
        description="Capture a running pyvhost switch's or pyvhost net's traffic.",
    )
    cap.add_argument("--socket", metavar="PATH", help="a pyvhost net's --socket")
    cap.add_argument("--control", metavar="PATH", help="or a control socket (a switch's)")
    cap.add_argument("--port", action="append", metavar="NAME", help="only these ports")
    cap.add_argument("-w", dest="out", default="-", metavar="FILE", help="FILE, or - (stdout)")
    cap.add_argument("-c", "--count", type=int, metavar="N", help="stop after N frames")
    cap.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")

    dp = sub.add_parser(
        "datapath",
        help="move a running pyvhost net's queue pairs between the kernel (vhost-net) and "
        "Python datapaths, losslessly",
    )
    dp.add_argument("--socket", required=True, metavar="PATH", help="the daemon's --socket")
    dp.add_argument("--stats-socket", metavar="PATH", help="if the daemon was given one")
    dp.add_argument("--pair", type=int, metavar="N", help="only this queue pair (default: all)")
    dp.add_argument("to", choices=("kernel", "python"))

    demo = sub.add_parser(
        "demo", help="boot a Linux guest on pyvhost; ping and iperf3 both ways (needs root)"
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
    demo.add_argument("-v", "--verbose", action="count", default=0)

    qa = sub.add_parser("qemu-args", help="print QEMU's arguments for a NIC on pyvhost")
    qa.add_argument("--socket", required=True, metavar="PATH")
    qa.add_argument("--queues", type=int, default=1, metavar="N")
    qa.add_argument("--mem", default="1G", metavar="SIZE", help="guest RAM (shared memfd)")
    qa.add_argument("--mac", default="52:54:00:12:34:56")
    qa.add_argument(
        "--msix",
        action=argparse.BooleanOptionalAction,
        help="force MSI-X vectors on or off (default: decided for the QEMU on PATH; "
        "Debian 12's QEMU 7.2 crashes with them under TCG)",
    )

    gb = sub.add_parser("guest", help="the demo's guest image")
    gb.add_argument("action", choices=("build",), help="build (once) and print the paths")
    gb.add_argument("-v", "--verbose", action="count", default=0)

    lo = sub.add_parser(
        "loopback",
        help="serve a virtio-net device whose cable is looped back (no host networking)",
    )
    _common(lo)
    lo.add_argument("--queue-pairs", type=int, default=1, metavar="N")
    return parser


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


def cmd_loopback(args: argparse.Namespace) -> int:
    from pyvhost.devices.loopback import LoopbackNet
    from pyvhost.vhost_user.daemon import Daemon

    if args.queue_pairs < 1:
        raise OptionError(f"--queue-pairs {args.queue_pairs}: must be at least 1")
    device = LoopbackNet(args.queue_pairs)
    daemon = Daemon(device, args.socket, client=args.client)
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
    """Become uid/gid for good; the sockets we created become theirs."""
    if uid is None and gid is None:
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
    from pyvhost.control import ControlServer
    from pyvhost.devices.net.device import VirtioNet
    from pyvhost.memory import logging_supported
    from pyvhost.net_commands import NetCommands
    from pyvhost.stats import format_table
    from pyvhost.vhost_user.daemon import Daemon

    # Everything that needs nothing opened is checked first: a refusal leaves nothing.
    opts = parse_netdev(args.netdev)
    mac = parse_mac(args.mac)
    if args.mtu is not None and not 68 <= args.mtu <= 65535:
        raise OptionError(f"--mtu {args.mtu}: must be between 68 and 65535")
    for flag, value in (
        ("--poll-us", args.poll_us),
        ("--tx-usecs", args.tx_usecs),
        ("--rx-usecs", args.rx_usecs),
    ):
        if not 0 <= value <= 1_000_000:
            raise OptionError(f"{flag} {value}: must be between 0 and 1000000 microseconds")
    uid, gid = resolve_ids(args.user, args.group)
    stats_file = args.stats_socket or (args.socket + ".stats")
    check_removable(stats_file, uid, gid, "--stats-socket")
    if not args.client:
        check_removable(args.socket, uid, gid, "--socket")
    if uid is not None and opts.downscript:
        log.warning("downscript= will run as --user %s, without root's privileges", args.user)

    netdev = TapNetdev.open(opts)
    daemon = stats = None
    try:
        device = VirtioNet(
            netdev.queues,
            mac=mac,
            mtu=args.mtu,
            poll_us=args.poll_us,
            tx_usecs=args.tx_usecs,
            rx_usecs=args.rx_usecs,
            vhosts=netdev.vhosts,
            migration=args.migration,
        )
        why = device.dirty_logging_unavailable() or logging_supported()
        if why is not None:
            (log.info if not args.migration else log.warning)("live migration unavailable: %s", why)
        daemon = served = Daemon(device, args.socket, client=args.client)

        commands = NetCommands(device, netdev.ifname, args.socket, lambda: served.sessions)
        snapshot = commands.stats
        for spec in args.hook or []:
            port, _, hook = spec.partition("=")
            commands.hook({"port": port, "add": hook})

        def print_stats() -> None:
            print(format_table(snapshot()), flush=True)

        stats = ControlServer(stats_file, daemon.loop, commands.handlers())
        owned = [stats.path] + ([] if args.client else [args.socket])
        drop_privileges(uid, gid, owned)
        print(
            f"pyvhost: serving virtio-net on {args.socket}, TAP {netdev.ifname} "
            f"({len(netdev.queues)} queue{'s' if len(netdev.queues) > 1 else ''}, "
            f"vnet_hdr={'on' if device.vnet_hdr else 'off'}, "
            f"offloads={'on' if device.offloads else 'off'}, "
            f"datapath={'kernel (vhost-net)' if netdev.vhosts else 'python'})",
            flush=True,
        )
        run_daemon(daemon, on_usr1=print_stats)
        daemon = None  # closed by run_daemon
        print_stats()
    finally:
        if stats is not None:
            stats.close()
        if daemon is not None:
            daemon.close()
        netdev.close()
    return 0


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


def cmd_qemu_args(args: argparse.Namespace) -> int:
    import shlex

    from pyvhost.guest.qemu import NicOptions, nic_args

    if args.queues < 1:
        raise OptionError(f"--queues {args.queues}: must be at least 1")
    parse_mac(args.mac)
    msix = args.msix
    if msix is None:
        from pyvhost.guest.msix import cached_msix
        from pyvhost.guest.qemu import qemu_version

        version = qemu_version()
        msix = cached_msix(version)
        if msix is None:
            msix = False
            print(
                f"pyvhost: QEMU {'.'.join(map(str, version))} is not known to handle MSI-X "
                "with vhost-user under TCG: vectors=0 (run 'pyvhost demo' once to probe it, "
                "or pass --msix where KVM runs the guest)",
                file=sys.stderr,
            )
    args_ = nic_args(
        NicOptions(args.socket, queues=args.queues, mem=args.mem, mac=args.mac, msix=msix)
    )
    print(shlex.join(args_))
    return 0


def cmd_guest(args: argparse.Namespace) -> int:
    from pyvhost.guest.image import ensure_image

    image = ensure_image(lambda m: print(m, flush=True))
    print(f"kernel {image.kernel}\ninitrd {image.initrd}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (
        [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
        if hasattr(args, "verbose")
        else logging.WARNING
    )
    logging.basicConfig(level=level, format="pyvhost: %(levelname)s: %(message)s")
    commands = {
        "loopback": cmd_loopback,
        "net": cmd_net,
        "stats": cmd_stats,
        "datapath": cmd_datapath,
        "switch": cmd_switch,
        "hook": cmd_hook,
        "capture": cmd_capture,
        "demo": cmd_demo,
        "qemu-args": cmd_qemu_args,
        "guest": cmd_guest,
    }
    try:
        return commands[args.command](args)
    except PyvhostError as e:
        print(f"pyvhost: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
