"""One contiguous view of guest pages that are not contiguous: an alias mapping.

Behind an IOMMU a ring can be contiguous in I/O virtual addresses and
scattered in guest memory (Linux allocates coherent DMA memory page by page
when an IOMMU is there to make it look contiguous). The rings are read and
written through one view each, so such a ring gets a mapping of its own:
an address range reserved in this process, and each guest page's existing
shared mapping aliased into it in order with mremap(old_size=0), which maps
the same pages again rather than moving them. The 2010 thread's "aliases and
discontiguous RAM", met from the other side.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

from pyvhost.errors import GuestMemoryError

PAGE = mmap.PAGESIZE
_PROT_NONE = 0
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long)  # fmt: skip
_mremap = _libc.mremap
_mremap.restype = ctypes.c_void_p
_mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                    ctypes.c_void_p)  # fmt: skip
_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


class AliasMapping:
    """Host pages (this process's addresses, page-aligned) mapped again, in order,
    as one range; `view` covers [offset, offset + length) of it."""

    def __init__(self, pages: list[tuple[int, int]], offset: int, length: int) -> None:
        """`pages`: (host address, page count) runs, each page-aligned."""
        total = sum(n for _, n in pages) * PAGE
        if not 0 <= offset and offset + length <= total:
            raise ValueError("the view must lie inside the pages")
        base = _mmap(None, total, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if base == _FAILED or base is None:
            raise GuestMemoryError(f"reserving {total} bytes for a ring's alias mapping failed")
        self._base, self._total = base, total
        pos = base
        for host, n in pages:
            got = _mremap(host, 0, n * PAGE, _MREMAP_MAYMOVE | _MREMAP_FIXED, pos)
            if got == _FAILED or got != pos:
                err = ctypes.get_errno()
                self.close()
                raise GuestMemoryError(f"aliasing a ring's guest pages failed: {os.strerror(err)}")
            pos += n * PAGE
        self._buffer = (ctypes.c_char * length).from_address(base + offset)
        self.view = memoryview(self._buffer).cast("B")

    def close(self) -> None:
        """Unmap. Every view of it (the ring's own, derived ones) must be released first."""
        view = getattr(self, "view", None)
        if view is not None:
            view.release()
            self.view = None
        self._buffer = None
        if self._base is not None:
            _munmap(self._base, self._total)
            self._base = None
