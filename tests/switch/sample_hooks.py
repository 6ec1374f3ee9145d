"""Hooks the switch tests load by name (module:function), as users load theirs."""

from pyvhost.hooks import DROP, Redirect

seen = []


def drop_marked(frame, ctx):
    """Drop frames whose payload ends with b"DROP"."""
    return DROP if bytes(frame).endswith(b"DROP") else None


def shout(frame, ctx):
    """Replace a payload ending with b"quiet" by one ending with b"QUIET"."""
    data = bytes(frame)
    if data.endswith(b"quiet"):
        return data[:-5] + b"QUIET"
    return None


def to_c(frame, ctx):
    return Redirect("c") if bytes(frame).endswith(b"toc") else None


def broken(frame, ctx):
    if bytes(frame).endswith(b"boom"):
        raise RuntimeError("a bug in a user's hook")
    return None
