"""pyvhost's command line.

pyvhost loopback --socket PATH [--client] [--queue-pairs N]
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

from pyvhost.errors import PyvhostError

log = logging.getLogger("pyvhost")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, metavar="PATH", help="vhost-user socket path")
    p.add_argument(
        "--client",
        action="store_true",
        help="connect to a front-end listening on PATH (default: listen on PATH)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvhost", description="vhost-user virtio-net back-end")
    sub = parser.add_subparsers(dest="command", required=True)
    lo = sub.add_parser(
        "loopback",
        help="serve a virtio-net device whose cable is looped back (no host networking)",
    )
    _common(lo)
    lo.add_argument("--queue-pairs", type=int, default=1, metavar="N")
    return parser


def run_daemon(daemon) -> int:
    """Serve until SIGTERM or SIGINT, then clean up."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_wakeup = signal.set_wakeup_fd(wake_w.fileno())

    def on_wake() -> None:
        try:
            wake_r.recv(64)
        except BlockingIOError:
            pass

    def on_signal(signum, frame) -> None:
        log.info("signal %d: shutting down", signum)
        daemon.loop.stop()

    daemon.loop.add_reader(wake_r.fileno(), on_wake)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon.run()
    finally:
        daemon.close()
        daemon.loop.remove_reader(wake_r.fileno())
        for s, h in old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(old_wakeup)
        wake_r.close()
        wake_w.close()
    return 0


def cmd_loopback(args: argparse.Namespace) -> int:
    from pyvhost.devices.loopback import LoopbackNet
    from pyvhost.vhost_user.daemon import Daemon

    if args.queue_pairs < 1:
        raise PyvhostError(f"--queue-pairs {args.queue_pairs}: must be at least 1")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="pyvhost: %(levelname)s: %(message)s")
    try:
        return {"loopback": cmd_loopback}[args.command](args)
    except PyvhostError as e:
        print(f"pyvhost: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
