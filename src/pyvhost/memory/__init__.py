"""Guest memory: regions shared by the VMM, mapped once, translated safely.

See DESIGN.md for how this answers the 2010 RAM API debate.
"""

from pyvhost.memory.address import FrontendAddress, GuestAddress
from pyvhost.memory.guest_memory import DEFAULT_MAX_REGIONS, GuestMemory, MemoryListener, Pin
from pyvhost.memory.region import MemoryRegion, RegionSpec, RegionState

__all__ = [
    "DEFAULT_MAX_REGIONS",
    "FrontendAddress",
    "GuestAddress",
    "GuestMemory",
    "MemoryListener",
    "MemoryRegion",
    "Pin",
    "RegionSpec",
    "RegionState",
]
