"""What `pyvhost switch` is told: from its command line or a TOML file.

    control = "/run/pyvhost/switch.ctl"     # the control socket (stats, hooks, capture)
    ageing = 300                            # seconds a learned MAC is kept

    [ports.vm1]
    socket = "/run/pyvhost/vm1.sock"
    mode = "server"                         # or "client": connect to a listening QEMU
    mac = "52:54:00:00:00:01"               # the MAC its virtio-net offers
    mac_policy = "lock"                     # only that MAC may send (default "learn")
    vlan = 10                               # an access port of VLAN 10
    mtu = 1500
    hooks = ["examples.acl:hook"]

    [uplinks.up0]
    netdev = "tap,ifname=tap0"              # the --netdev tap grammar (vhost=off)
    trunk = [10, 20]                        # tagged VLANs it carries
    native = 1                              # its untagged VLAN

Every error names the file, line and key, or the option, at fault.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

from pyvhost.backends.tap_options import TapOptions, parse_netdev
from pyvhost.errors import OptionError
from pyvhost.switch.fabric import DEFAULT_AGEING_S, MAX_VLAN, PortConfig

PORT_KEYS = {"socket", "mode", "mac", "mac_policy", "vlan", "trunk", "native", "mtu", "hooks"}
UPLINK_KEYS = {"netdev", "mac_policy", "vlan", "trunk", "native", "mtu", "hooks"}
TOP_KEYS = {"control", "ageing", "ports", "uplinks"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


@dataclass
class VmPortSpec:
    config: PortConfig
    socket: str
    client: bool = False


@dataclass
class UplinkSpec:
    config: PortConfig
    netdev: TapOptions


@dataclass
class SwitchConfig:
    control: str | None = None
    ageing: float = DEFAULT_AGEING_S
    ports: list[VmPortSpec] = field(default_factory=list)
    uplinks: list[UplinkSpec] = field(default_factory=list)

    def names(self) -> list[str]:
        return [p.config.name for p in self.ports] + [u.config.name for u in self.uplinks]


class _Where:
    """Says where a key is in a TOML file, for error messages."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def __call__(self, table: str, key: str | None = None) -> str:
        header = re.compile(r"^\s*\[\s*" + re.escape(table).replace(r"\.", r"\s*\.\s*") + r"\s*\]")
        start = 0
        if table:
            for i, line in enumerate(self.lines):
                if header.match(line):
                    start = i
                    break
            else:
                return f"{self.path}: [{table}]"
        if key is not None:
            assign = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
            for i in range(start + (1 if table else 0), len(self.lines)):
                if table and re.match(r"^\s*\[", self.lines[i]):
                    break
                if assign.match(self.lines[i]):
                    return f"{self.path} line {i + 1}: {table + '.' if table else ''}{key}"
        return f"{self.path} line {start + 1}: [{table}]" if table else f"{self.path}: {key}"


def load_toml(path: str) -> SwitchConfig:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OptionError(f"--config {path}: {e.strerror}") from e
    text = raw.decode(errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"{path}: not valid TOML: {e}") from e
    where = _Where(path, text)
    for key in data:
        if key not in TOP_KEYS:
            valid = ", ".join(sorted(TOP_KEYS))
            raise OptionError(f"{where('', key)}: unknown key; valid: {valid}")
    cfg = SwitchConfig()
    if "control" in data:
        cfg.control = _string(data["control"], where("", "control"))
    if "ageing" in data:
        cfg.ageing = _number(data["ageing"], where("", "ageing"), 1, 1_000_000)
    for section, keys in (("ports", PORT_KEYS), ("uplinks", UPLINK_KEYS)):
        tables = data.get(section, {})
        if not isinstance(tables, dict):
            raise OptionError(f"{where('', section)}: expected tables [{section}.NAME]")
        for name, table in tables.items():
            at = f"{section}.{name}"
            if not isinstance(table, dict):
                raise OptionError(f"{where('', section)}: {at} must be a table [{at}]")
            if not _NAME.match(name):
                raise OptionError(f"{where(at)}: port name {name!r}: letters, digits, _.- only")
            for key in table:
                if key not in keys:
                    raise OptionError(
                        f"{where(at, key)}: unknown key; valid: {', '.join(sorted(keys))}"
                    )
            config = _port_config(name, table, lambda k, at=at: where(at, k))
            if section == "ports":
                if "socket" not in table:
                    raise OptionError(f'{where(at)}: a port needs socket = "PATH"')
                mode = table.get("mode", "server")
                if mode not in ("server", "client"):
                    raise OptionError(f"{where(at, 'mode')}: {mode!r}: use server or client")
                socket = _string(table["socket"], where(at, "socket"))
                cfg.ports.append(VmPortSpec(config, socket, mode == "client"))
            else:
                if "netdev" not in table:
                    raise OptionError(f'{where(at)}: an uplink needs netdev = "tap,..."')
                netdev = _string(table["netdev"], where(at, "netdev"))
                try:
                    options = parse_netdev(netdev)
                except OptionError as e:
                    raise OptionError(f"{where(at, 'netdev')}: {e}") from None
                cfg.uplinks.append(UplinkSpec(config, options))
    _check(cfg)
    return cfg


def _port_config(name: str, table: dict, where) -> PortConfig:
    c = PortConfig(name)
    if "vlan" in table:
        c.vlan = int(_number(table["vlan"], where("vlan"), 1, MAX_VLAN))
    if "trunk" in table:
        vids = table["trunk"]
        if not isinstance(vids, list) or not vids:
            raise OptionError(f"{where('trunk')}: expected a list of VLAN IDs, e.g. [10, 20]")
        c.trunk = frozenset(int(_number(v, where("trunk"), 1, MAX_VLAN)) for v in vids)
    if "native" in table:
        c.native = int(_number(table["native"], where("native"), 1, MAX_VLAN))
    if c.vlan is not None and c.trunk is not None:
        raise OptionError(f"{where('trunk')}: a port is an access port (vlan) or a trunk, not both")
    if c.native is not None and c.trunk is None:
        raise OptionError(f"{where('native')}: native needs trunk")
    if "mtu" in table:
        c.mtu = int(_number(table["mtu"], where("mtu"), 68, 65535))
    if "mac" in table:
        c.mac = parse_mac(_string(table["mac"], where("mac")), where("mac"))
    if "mac_policy" in table:
        policy = table["mac_policy"]
        if policy not in ("learn", "lock"):
            raise OptionError(f"{where('mac_policy')}: {policy!r}: use learn or lock")
        if policy == "lock" and c.mac is None:
            raise OptionError(f'{where("mac_policy")}: lock needs mac = "..."')
        c.mac_policy = policy
    if "hooks" in table:
        hooks = table["hooks"]
        if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
            raise OptionError(f'{where("hooks")}: expected a list of "module:function"')
        c.hooks = tuple(hooks)
    return c


def _string(value, at: str) -> str:
    if not isinstance(value, str) or not value:
        raise OptionError(f"{at}: expected a non-empty string")
    return value


def _number(value, at: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise OptionError(f"{at}: {value!r} is not a number from {lo} to {hi}")
    return value


def parse_mac(text: str, at: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(parts) != 6 or len(mac) != 6 or mac[0] & 1:
        raise OptionError(f"{at}: {text!r} is not a unicast MAC like 52:54:00:12:34:56")
    return mac


def _check(cfg: SwitchConfig) -> None:
    seen: set[str] = set()
    for name in cfg.names():
        if name in seen:
            raise OptionError(f"port {name} is defined twice")
        seen.add(name)
    sockets = [p.socket for p in cfg.ports]
    if len(set(sockets)) != len(sockets):
        raise OptionError("two ports share a socket path")
    if not cfg.ports and not cfg.uplinks:
        raise OptionError("a switch needs ports: --port NAME=SOCKET, or --config FILE")


# --- the command line ------------------------------------------------------------


def from_args(args) -> SwitchConfig:
    """--config FILE, then --port/--uplink and per-port options on top."""
    cfg = load_toml(args.config) if args.config else SwitchConfig()
    for spec in args.port or []:
        name, socket, client = _split_port(spec)
        cfg.ports.append(VmPortSpec(PortConfig(name), socket, client))
    for spec in args.uplink or []:
        name, _, netdev = spec.partition("=")
        if not netdev:
            raise OptionError(f"--uplink {spec}: expected NAME=tap,OPTIONS")
        cfg.uplinks.append(UplinkSpec(PortConfig(_name(name, "--uplink")), parse_netdev(netdev)))
    by_name = {p.config.name: p.config for p in cfg.ports} | {
        u.config.name: u.config for u in cfg.uplinks
    }

    def target(option: str, spec: str) -> tuple[PortConfig, str]:
        name, sep, value = spec.partition("=")
        if not sep or not value:
            raise OptionError(f"{option} {spec}: expected PORT=VALUE")
        if name not in by_name:
            raise OptionError(f"{option} {spec}: no port {name} (ports: {', '.join(by_name)})")
        return by_name[name], value

    for spec in args.vlan or []:
        c, v = target("--vlan", spec)
        c.vlan = _int_option("--vlan", spec, v, 1, MAX_VLAN)
    for spec in args.trunk or []:
        c, v = target("--trunk", spec)
        vids, _, native = v.partition(",native=")
        c.trunk = frozenset(_int_option("--trunk", spec, x, 1, MAX_VLAN) for x in vids.split(":"))
        c.native = _int_option("--trunk", spec, native, 1, MAX_VLAN) if native else None
    for spec in args.mtu or []:
        c, v = target("--mtu", spec)
        c.mtu = _int_option("--mtu", spec, v, 68, 65535)
    for spec in args.mac or []:
        c, v = target("--mac", spec)
        c.mac = parse_mac(v, f"--mac {spec}")
    for spec in args.lock or []:
        c = by_name.get(spec)
        if c is None:
            raise OptionError(f"--lock {spec}: no port {spec}")
        if c.mac is None:
            raise OptionError(f"--lock {spec}: give the port's MAC with --mac {spec}=MAC")
        c.mac_policy = "lock"
    for spec in args.hook or []:
        c, v = target("--hook", spec)
        c.hooks = (*c.hooks, v)
    for c in by_name.values():
        if c.vlan is not None and c.trunk is not None:
            raise OptionError(f"port {c.name}: --vlan and --trunk exclude each other")
    if args.control:
        cfg.control = args.control
    if cfg.control is None:
        first = cfg.ports[0].socket if cfg.ports else None
        if first is None:
            raise OptionError("--control PATH is needed when no port has a socket")
        cfg.control = first + ".ctl"
    _check(cfg)
    return cfg


def _split_port(spec: str) -> tuple[str, str, bool]:
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise OptionError(f"--port {spec}: expected NAME=SOCKET[,client]")
    socket, _, mode = rest.partition(",")
    if mode not in ("", "client", "server"):
        raise OptionError(f"--port {spec}: {mode!r}: the mode is client or server")
    return _name(name, "--port"), socket, mode == "client"


def _name(name: str, option: str) -> str:
    if not _NAME.match(name):
        raise OptionError(f"{option} {name}: a port name is letters, digits, _.- (at most 32)")
    return name


def _int_option(option: str, spec: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = lo - 1
    if not lo <= n <= hi:
        raise OptionError(f"{option} {spec}: {value!r} must be a whole number from {lo} to {hi}")
    return n
