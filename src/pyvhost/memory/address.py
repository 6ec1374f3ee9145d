"""The kinds of address a vhost-user backend meets, each its own type.

- GuestAddress: a guest-physical address, what descriptors and the memory map use.
- FrontendAddress: an address in the VMM's own virtual address space
  ("userspace_addr" in vhost-user); ring addresses arrive in this form.

Both are ints (so they cost nothing in a hot loop once checked) with checked
arithmetic for the layer boundaries, where a wrap past 2**64 is an attack.
"""

from __future__ import annotations

from pyvhost.errors import RangeOverflowError

ADDRESS_LIMIT = 1 << 64  # one past the highest address of a 64-bit space


class _Address(int):
    __slots__ = ()
    _space = "address"

    def __new__(cls, value: int) -> _Address:
        if not 0 <= value < ADDRESS_LIMIT:
            raise RangeOverflowError(value, 0, cls._space)
        return super().__new__(cls, value)

    def checked_add(self, offset: int) -> _Address:
        """self + offset, raising RangeOverflowError instead of wrapping."""
        end = int(self) + offset
        if offset < 0 or end >= ADDRESS_LIMIT:
            raise RangeOverflowError(int(self), offset, self._space)
        return type(self)(end)

    def checked_end(self, length: int) -> int:
        """One past the last byte of [self, self+length); may equal 2**64."""
        end = int(self) + length
        if length < 0 or end > ADDRESS_LIMIT:
            raise RangeOverflowError(int(self), length, self._space)
        return end

    def __repr__(self) -> str:
        return f"{type(self).__name__}(0x{int(self):x})"


class GuestAddress(_Address):
    """A guest-physical address."""

    __slots__ = ()
    _space = "guest"


class FrontendAddress(_Address):
    """An address in the frontend's (VMM's) virtual address space."""

    __slots__ = ()
    _space = "frontend"
