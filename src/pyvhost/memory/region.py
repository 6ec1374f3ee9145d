"""One region of guest RAM, mapped once and kept mapped for its whole life.

A region is what vhost-user's memory table describes: a guest-physical range,
the frontend's virtual address for it, and a file (fd + offset) holding it.

Lifetime (the 2010 thread's "reference counts that hold back hot-unplug"):

    MAPPED   --remove-->  RETIRED (unpublished; pins keep the mapping)
    RETIRED  --last pin released-->  UNMAPPED (munmap, fd closed)

A region with no pins goes straight from MAPPED to UNMAPPED on removal.

Python adds a second, finer safety net: a memoryview handed out from the
mapping holds a buffer export on the mmap object, and CPython refuses to
munmap while one exists. So a view that outlives its pin (say, a descriptor
chain still in flight) keeps the pages valid until that view is dropped; the
munmap then happens when the last view dies. No code path can touch host
memory that is no longer mapped.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import mmap
import os
import stat
import weakref
from dataclasses import dataclass

from pyvhost.errors import GuestMemoryError, InvalidRegionError, RangeOverflowError
from pyvhost.memory.address import ADDRESS_LIMIT, FrontendAddress, GuestAddress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionSpec:
    """Where a region sits: what the VMM's memory table says of it, minus the fd."""

    guest_addr: GuestAddress
    size: int
    frontend_addr: FrontendAddress = FrontendAddress(0)
    mmap_offset: int = 0
    readonly: bool = False

    def __post_init__(self) -> None:
        # Coerce plain ints into their address types (this also range-checks them).
        object.__setattr__(self, "guest_addr", GuestAddress(self.guest_addr))
        object.__setattr__(self, "frontend_addr", FrontendAddress(self.frontend_addr))
        if self.size <= 0:
            raise InvalidRegionError(f"region at {self.guest_addr!r} has size {self.size}")
        if self.mmap_offset < 0:
            raise InvalidRegionError(f"region mmap_offset {self.mmap_offset} is negative")
        self.guest_addr.checked_end(self.size)
        self.frontend_addr.checked_end(self.size)
        if self.mmap_offset + self.size > ADDRESS_LIMIT:
            raise RangeOverflowError(self.mmap_offset, self.size, "file offset")

    @property
    def guest_end(self) -> int:
        return int(self.guest_addr) + self.size

    def overlaps(self, other: RegionSpec) -> bool:
        return self.guest_addr < other.guest_end and other.guest_addr < self.guest_end


class RegionState(enum.Enum):
    MAPPED = "mapped"  # published in a GuestMemory, lookups find it
    RETIRED = "retired"  # removed from the map, still mapped for its pins
    UNMAPPED = "unmapped"  # our references dropped; munmap done or awaiting the last view


class MemoryRegion:
    """A mapped region. Created by GuestMemory, never by hand."""

    # Plain-int fields first: the lookup hot path reads start/end/view/readonly.
    __slots__ = (
        "start",
        "end",
        "view",
        "readonly",
        "spec",
        "pins",
        "state",
        "host_address",
        "_mm",
        "_mm_ref",
        "_fd",
        "__weakref__",
    )

    def __init__(self, spec: RegionSpec, fd: int) -> None:
        """Map `spec` from `fd`. Takes ownership of fd: it is closed whatever happens."""
        self.spec = spec
        self.start = int(spec.guest_addr)
        self.end = spec.guest_end
        self.readonly = spec.readonly
        self.pins = 0
        try:
            self._mm = _map_file(fd, spec)
        except BaseException:
            os.close(fd)
            raise
        # Kept while mapped, so another process (a worker serving a queue
        # pair) can map the same pages: share_fd().
        self._fd = fd
        delta = spec.mmap_offset % mmap.ALLOCATIONGRANULARITY
        base = memoryview(self._mm)
        self.view = base[delta : delta + spec.size]
        base.release()
        # Where the region's first byte is in this process: the address a
        # kernel datapath is given (VHOST_SET_MEM_TABLE's userspace_addr).
        self.host_address = buffer_address(self._mm) + delta
        self._mm_ref = weakref.ref(self._mm)
        self.state = RegionState.MAPPED

    @property
    def guest_addr(self) -> GuestAddress:
        return self.spec.guest_addr

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def frontend_addr(self) -> FrontendAddress:
        return self.spec.frontend_addr

    @property
    def is_unmapped(self) -> bool:
        """True once the pages are really gone from this process (munmap done)."""
        mm = self._mm_ref()
        return mm is None or mm.closed

    # --- lifetime, driven by GuestMemory and Pin ------------------------------

    def _pin(self) -> None:
        self.pins += 1

    def _unpin(self) -> None:
        self.pins -= 1
        if self.pins == 0 and self.state is RegionState.RETIRED:
            self._unmap()

    def _retire(self) -> None:
        """Unpublished: unmap now, or at the last unpin."""
        if self.state is not RegionState.MAPPED:
            return
        self.state = RegionState.RETIRED
        if self.pins == 0:
            self._unmap()

    def share_fd(self) -> int:
        """A new fd of the region's file, for another process to map it; the
        caller owns (and closes) it."""
        if self._fd < 0:
            raise GuestMemoryError(f"region {self!r} is unmapped: nothing to share")
        return os.dup(self._fd)

    def _unmap(self) -> None:
        self.state = RegionState.UNMAPPED
        fd, self._fd = self._fd, -1
        os.close(fd)
        mm, self._mm = self._mm, None
        self.view.release()
        try:
            mm.close()  # munmap and close the fd, now
        except BufferError:
            # Views handed out without a pin are still alive; CPython unmaps
            # (and closes the fd) when the last of them is dropped.
            log.debug("region %s: views still alive; unmap deferred to the last one", self)

    def __repr__(self) -> str:
        return (
            f"MemoryRegion(guest=0x{self.start:x}-0x{self.end:x}, "
            f"frontend=0x{int(self.spec.frontend_addr):x}, "
            f"offset=0x{self.spec.mmap_offset:x}, {'ro' if self.readonly else 'rw'}, "
            f"{self.state.value})"
        )


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer: only `buf` is read."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def buffer_address(obj: object) -> int:
    """The address of an object's buffer (an mmap's first byte), read-only ones too.

    The buffer export is released at once: the mapping's lifetime stays the
    region's business.
    """
    view = _PyBuffer()
    if _get_buffer(obj, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE
        raise InvalidRegionError(f"cannot take the address of {type(obj).__name__}")
    try:
        return view.buf
    finally:
        _release_buffer(ctypes.byref(view))


def _map_file(fd: int, spec: RegionSpec) -> mmap.mmap:
    """mmap(MAP_SHARED) the file range of `spec`, validating it first.

    A hostile frontend can hand us a file shorter than the region claims;
    touching pages past its end would SIGBUS the whole process, so the file's
    size is checked before mapping.
    """
    granule = mmap.ALLOCATIONGRANULARITY
    aligned = spec.mmap_offset - spec.mmap_offset % granule
    length = spec.mmap_offset - aligned + spec.size
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise InvalidRegionError(f"region fd {fd} is not usable: {e.strerror}") from e
    if stat.S_ISREG(st.st_mode) and st.st_size < spec.mmap_offset + spec.size:
        raise InvalidRegionError(
            f"region {spec.guest_addr!r}+0x{spec.size:x} needs file bytes up to "
            f"0x{spec.mmap_offset + spec.size:x} but the file has only 0x{st.st_size:x}"
        )
    prot = mmap.PROT_READ if spec.readonly else mmap.PROT_READ | mmap.PROT_WRITE
    try:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot, offset=aligned)
    except (OSError, ValueError, OverflowError) as e:
        raise InvalidRegionError(f"cannot map region {spec.guest_addr!r}: {e}") from e
