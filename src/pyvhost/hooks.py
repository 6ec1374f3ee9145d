"""Python functions on a port's frames: the programmable part of the datapath.

A hook is `module:function`, called for each frame entering ("in") or
leaving ("out") the port it is attached to:

    def hook(frame: memoryview, ctx: HookContext):
        ...
        return None                     # pass it on (or PASS)
        return DROP                     # drop it (counted as "hook")
        return b"..."                   # a replacement frame (same offload fields)
        return Redirect("other-port")   # send it out of another port instead

`frame` is the Ethernet frame as the port sees it, often a view of guest
memory: read it, copy what you keep, do not hold the view. `ctx` has the
port name, the direction, the VLAN and the virtio-net header fields (a GSO
frame is one large frame; `ctx.header.gso_size` says how it will be cut).
A hook that raises is counted ("hook-error"), logged with its traceback, and
its frame dropped; the port and the switch go on.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyvhost.devices.net.spec import VnetHeader
from pyvhost.errors import OptionError

log = logging.getLogger(__name__)

PASS = "pass"
DROP = "drop"
IN = "in"
OUT = "out"
# A broken hook logs its traceback at most this often (per hook), then counts.
LOG_INTERVAL_S = 5.0


@dataclass(frozen=True)
class Redirect:
    """Send the frame out of another port instead (its "out" hooks still run)."""

    port: str


@dataclass
class HookContext:
    port: str
    direction: str  # IN or OUT
    vlan: int  # 0: untagged on an access port's VLAN-less switch
    header: VnetHeader


Hook = Callable[[memoryview, HookContext], object]


class LoadedHook:
    """A hook function and the name it was loaded by."""

    def __init__(self, spec: str, function: Hook) -> None:
        self.spec = spec
        self.function = function
        self.errors = 0
        self._last_log = 0.0

    def __call__(self, frame: memoryview, ctx: HookContext) -> object:
        return self.function(frame, ctx)

    def failed(self, error: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._last_log = now
            log.error(
                "hook %s raised on a frame (%d so far); the frame is dropped",
                self.spec,
                self.errors,
                exc_info=error,
            )


def load(spec: str, reload: bool = False) -> LoadedHook:
    """`module:function` (the module importable from sys.path or the working
    directory), checked now: a typo is an error before any frame flows. With
    `reload`, a module already imported is read again (a hook edited and
    replaced at run time takes effect)."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise OptionError(f"hook {spec!r}: expected module:function, e.g. examples.acl:hook")
    try:
        if reload and module_name in sys.modules:
            module = importlib.reload(sys.modules[module_name])
        else:
            module = importlib.import_module(module_name)
    except Exception as e:
        raise OptionError(f"hook {spec!r}: cannot import {module_name}: {e}") from e
    function = getattr(module, name, None)
    if not callable(function):
        raise OptionError(f"hook {spec!r}: {module_name} has no function {name}")
    return LoadedHook(spec, function)


def run(hooks: list[LoadedHook], data: bytes | memoryview, ctx: HookContext):
    """Run hooks in order on one frame. Returns the verdict:

    (PASS, data)          go on, with `data` (the frame, or what replaced it)
    (DROP, "hook")        a hook dropped it
    (DROP, "hook-error")  a hook raised, or returned something that is no verdict
    (Redirect, port)      a hook sent it elsewhere (with the frame as it stands)
    """
    for hook in hooks:
        try:
            verdict = hook(memoryview(data), ctx)
        except Exception as e:
            hook.failed(e)
            return DROP, "hook-error"
        if verdict is None or verdict == PASS:
            continue
        if verdict == DROP:
            return DROP, "hook"
        if isinstance(verdict, Redirect):
            return Redirect, (verdict.port, data)
        if isinstance(verdict, bytes | bytearray | memoryview):
            data = bytes(verdict)
            continue
        hook.failed(TypeError(f"hook {hook.spec} returned {type(verdict).__name__}"))
        return DROP, "hook-error"
    return PASS, data
