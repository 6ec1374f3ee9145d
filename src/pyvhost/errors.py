"""The one exception hierarchy of pyvhost.

Everything the guest or the VMM can make go wrong is raised as a subclass of
PyvhostError, with fields saying what was at fault, so callers catch one family
and never a bare struct.error, IndexError or ValueError from deep inside.
"""

from __future__ import annotations


class PyvhostError(Exception):
    """Base of every error pyvhost raises on purpose."""


# --- guest memory -------------------------------------------------------------


class GuestMemoryError(PyvhostError):
    """A guest-memory access or memory-map change that cannot be honoured."""


class AddressNotMappedError(GuestMemoryError):
    """Part of a range falls outside every published region."""

    def __init__(self, addr: int, length: int, missing_at: int | None = None) -> None:
        self.addr = addr
        self.length = length
        self.missing_at = addr if missing_at is None else missing_at
        super().__init__(
            f"guest range 0x{addr:x}+0x{length:x} is not backed by memory "
            f"(nothing mapped at 0x{self.missing_at:x})"
        )


class RangeOverflowError(GuestMemoryError):
    """A range whose end wraps past 2**64, or a negative address or length."""

    def __init__(self, addr: int, length: int, space: str = "guest") -> None:
        self.addr = addr
        self.length = length
        super().__init__(f"{space} range addr={addr:#x} length={length:#x} wraps past 2**64")


class ReadOnlyMemoryError(GuestMemoryError):
    """A write into a region the VMM shared read-only."""

    def __init__(self, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        super().__init__(f"guest range 0x{addr:x}+0x{length:x} is read-only")


class NotContiguousError(GuestMemoryError):
    """A structure that must sit in one mapping (a ring) crosses a region edge."""

    def __init__(self, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        super().__init__(f"guest range 0x{addr:x}+0x{length:x} crosses a region boundary")


class InvalidRegionError(GuestMemoryError):
    """A region that cannot be added: empty, overlapping, too many, or unmappable."""


class RegionNotFoundError(GuestMemoryError):
    """A removal names a region that is not in the map."""


class IotlbMiss(PyvhostError):
    """An I/O virtual address the device's IOTLB has no entry for (yet).

    Not a guest-memory error: the access waits for the front-end's IOTLB
    update (asked for with a miss message) and is then retried. `perm` is
    the access wanted: IOTLB_READ, IOTLB_WRITE or both."""

    def __init__(self, iova: int, perm: int) -> None:
        self.iova = iova
        self.perm = perm
        super().__init__(f"IOTLB miss at I/O virtual address 0x{iova:x} (perm {perm})")


class IotlbAccessError(GuestMemoryError):
    """An I/O virtual address whose IOTLB entry forbids the access (read or write)."""


# --- virtqueue ----------------------------------------------------------------


class QueueError(PyvhostError):
    """A virtqueue the guest (or the VMM) made unusable.

    The device side never raises these out of pop(): it stores the instance as
    the queue's `broken` reason and stops serving that queue.
    """


class QueueConfigError(QueueError):
    """Bad queue size, or ring addresses that are misaligned or not mapped."""


class AvailIndexError(QueueError):
    """avail.idx ran more than the queue size ahead of what the device consumed."""


class DescriptorIndexError(QueueError):
    """A head or `next` index points past the descriptor table."""


class ChainTooLongError(QueueError):
    """A chain longer than its table allows: a loop, or more descriptors than the queue."""


class IndirectDescriptorError(QueueError):
    """An indirect table that is nested, mis-sized, or not negotiated."""


class DescriptorOrderError(QueueError):
    """A device-readable descriptor after a device-writable one."""


class DescriptorMemoryError(QueueError):
    """A descriptor's buffer is not in guest memory (or is read-only but device-writable)."""


class ChainLengthError(QueueError):
    """The bytes of one chain add up to more than a used element can report (2**32 - 1)."""


class BufferIdError(QueueError):
    """A packed ring's buffer id is past the queue size, or already in flight."""


class WrapCounterError(QueueError):
    """A packed ring's chain runs into a descriptor not available in the current lap."""


# --- vhost-user protocol ----------------------------------------------------------


class ProtocolError(PyvhostError):
    """A vhost-user message the back-end refuses. The connection goes on."""

    def __init__(self, message: str, request: int | None = None) -> None:
        self.request = request
        super().__init__(message)


class MalformedMessageError(ProtocolError):
    """A size or payload that does not fit its request."""


class UnknownRequestError(ProtocolError):
    """A request number this back-end does not know or does not implement."""


class UnexpectedFdsError(ProtocolError):
    """More (or fewer) file descriptors than the request takes."""


class FeatureNotNegotiatedError(ProtocolError):
    """A request gated by a protocol feature that was not negotiated."""


class InvalidRingIndexError(ProtocolError):
    """A ring index past the device's queues."""


class InvalidRequestError(ProtocolError):
    """A well-formed request that cannot be honoured in the current state."""


class TransportError(PyvhostError):
    """The socket under the protocol failed or was closed."""


class PeerError(PyvhostError):
    """The other side (as seen by the frontend client) refused or broke a request."""


# --- host side and configuration ----------------------------------------------------


class TapError(PyvhostError):
    """A TAP device could not be opened, configured, read or written."""


class UringUnavailableError(PyvhostError):
    """io_uring cannot be used here (an old kernel, kernel.io_uring_disabled, a
    seccomp filter such as a container runtime's): TAP writes go one by one."""

    def __init__(self, errno_: int | None, reason: str) -> None:
        super().__init__(f"io_uring unavailable: {reason}")
        self.errno = errno_


class OptionError(PyvhostError):
    """A command-line option or --netdev sub-option that cannot be used as given."""
