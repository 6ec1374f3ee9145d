"""QEMU's -netdev tap option grammar, parsed and checked without touching anything.

    tap[,id=NAME][,ifname=NAME][,fd=N][,fds=N:M:...][,script=FILE|no]
       [,downscript=FILE|no][,sndbuf=BYTES][,vnet_hdr=on|off][,queues=N]
       [,vhost=on|off][,vhostfd=N][,vhostfds=N:M:...][,vhostforce=on|off]

The exclusions are QEMU's (net/tap.c): fd= and fds= stand alone; vhostfd=
implies vhost=on and is refused with vhost=off, as in the 2010 patch.
Unlike QEMU, script= and downscript= default to "no": pyvhost never runs
/etc/qemu-ifup unasked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pyvhost.errors import OptionError

KNOWN = (
    "id",
    "ifname",
    "fd",
    "fds",
    "script",
    "downscript",
    "sndbuf",
    "vnet_hdr",
    "queues",
    "vhost",
    "vhostfd",
    "vhostfds",
    "vhostforce",
)
NOT_SUPPORTED = {
    "helper": "pyvhost does not run qemu-bridge-helper; create the TAP and use ifname= or fd=",
    "br": "pyvhost does not run qemu-bridge-helper; attach the TAP to a bridge in script=",
    "poll-us": "pyvhost's datapath is event driven; there is no busy polling to tune",
}
MAX_QUEUES = 256  # virtio-net's max_virtqueue_pairs is a u16; QEMU caps TAP queues lower
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
_SIZE = re.compile(r"^(\d+)([kKmMgGtT]?)[bB]?$")


@dataclass
class TapOptions:
    id: str | None = None
    ifname: str | None = None
    fds: list[int] = field(default_factory=list)  # fd= is fds=[N]
    script: str | None = None  # None: none (as "no")
    downscript: str | None = None
    sndbuf: int | None = None
    vnet_hdr: bool | None = None  # None: use it if the kernel has it
    queues: int = 1
    vhost: bool = False
    vhostfds: list[int] = field(default_factory=list)  # vhostfd= is vhostfds=[N]
    vhostforce: bool = False
    given: set[str] = field(default_factory=set)

    @property
    def from_fds(self) -> bool:
        return bool(self.fds)


def split_options(text: str) -> list[tuple[str, str | None]]:
    """QEMU's option splitting: commas separate, ",," is a literal comma."""
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    out: list[tuple[str, str | None]] = []
    for p in parts:
        key, eq, value = p.partition("=")
        out.append((key, value if eq else None))
    return out


def parse_netdev(text: str) -> TapOptions:
    """Parse `tap,OPTIONS` (the value of --netdev) and apply QEMU's rules."""
    items = split_options(text)
    kind, kind_value = items[0]
    if kind != "tap" or kind_value is not None:
        raise OptionError(f"--netdev {text!r}: pyvhost serves only 'tap' netdevs; start with tap,")
    opts = TapOptions()
    for key, value in items[1:]:
        if key == "":
            raise OptionError(f"--netdev {text!r}: empty option (stray comma?)")
        if key in NOT_SUPPORTED:
            raise OptionError(f"{key}= is not supported: {NOT_SUPPORTED[key]}")
        if key not in KNOWN:
            raise OptionError(f"{key}= is not a tap option; valid ones: {', '.join(KNOWN)}")
        if key in opts.given:
            raise OptionError(f"{key}= is given twice")
        if value is None:
            raise OptionError(f"{key}= needs a value ({key}=...)")
        opts.given.add(key)
        _set(opts, key, value)
    _check_rules(opts)
    return opts


def _set(opts: TapOptions, key: str, value: str) -> None:
    if key in ("id", "ifname"):
        if not value:
            raise OptionError(f"{key}= is empty")
        setattr(opts, key, value)
    elif key in ("script", "downscript"):
        setattr(opts, key, None if value in ("no", "") else value)
    elif key in ("vnet_hdr", "vhost", "vhostforce"):
        setattr(opts, key, _bool(key, value))
    elif key == "sndbuf":
        opts.sndbuf = _size(key, value)
    elif key == "queues":
        n = _int(key, value)
        if not 1 <= n <= MAX_QUEUES:
            raise OptionError(f"queues={value}: must be between 1 and {MAX_QUEUES}")
        opts.queues = n
    elif key == "fd":
        opts.fds = [_fd(key, value)]
    elif key == "fds":
        opts.fds = _fd_list(key, value)
    elif key == "vhostfd":
        opts.vhostfds = [_fd(key, value)]
    elif key == "vhostfds":
        opts.vhostfds = _fd_list(key, value)


def _check_rules(o: TapOptions) -> None:
    g = o.given
    for single, others in (
        ("fd", ("ifname", "script", "downscript", "vnet_hdr", "queues", "fds")),
        ("fds", ("ifname", "script", "downscript", "vnet_hdr", "queues", "fd")),
    ):
        if single in g:
            bad = [k for k in others if k in g]
            if bad:
                listed = ", ".join(f"{k}=" for k in bad)
                raise OptionError(
                    f"{listed} {'is' if len(bad) == 1 else 'are'} invalid with {single}="
                )
    if "fds" in g:
        o.queues = len(o.fds)
    if "vhostfds" in g and "fds" not in g:
        raise OptionError("vhostfds= is invalid if fds= wasn't specified; use vhostfd=")
    if "vhostfd" in g and "fds" in g:
        raise OptionError("vhostfd= is invalid with fds=; give one per queue with vhostfds=")
    if "vhostfds" in g and len(o.vhostfds) != len(o.fds):
        raise OptionError(
            f"vhostfds= has {len(o.vhostfds)} fds but fds= has {len(o.fds)}: one per queue"
        )
    if "vhostfd" in g and o.queues > 1:
        raise OptionError(f"vhostfd= is one fd but queues={o.queues}; use fds= and vhostfds=")
    if "vhost" not in g:
        o.vhost = bool(o.vhostfds) or o.vhostforce  # vhostfd= (and vhostforce=) imply vhost=on
    elif not o.vhost and o.vhostfds:
        which = "vhostfds" if "vhostfds" in g else "vhostfd"
        raise OptionError(f"{which}= is not valid without vhost")
    if len(set(o.fds)) != len(o.fds):
        raise OptionError(f"fds= names the same fd twice: {o.fds}")


def _bool(key: str, value: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise OptionError(f"{key}={value}: expected on or off")


def _int(key: str, value: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise OptionError(f"{key}={value}: expected a whole number") from None


def _size(key: str, value: str) -> int:
    m = _SIZE.match(value)
    if m is None:
        raise OptionError(f"{key}={value}: expected a size in bytes (e.g. 1048576 or 1M)")
    n = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    if n > 2**31 - 1:
        raise OptionError(f"{key}={value}: at most {2**31 - 1} bytes")
    return n


def _fd(key: str, value: str) -> int:
    n = _int(key, value)
    if n < 0:
        raise OptionError(f"{key}={value}: not a file descriptor")
    return n


def _fd_list(key: str, value: str) -> list[int]:
    fds = [_fd(key, v) for v in value.split(":")]
    if not fds:
        raise OptionError(f"{key}= needs at least one fd")
    return fds
