"""Guest memory: regions shared by the VMM, mapped once, translated safely.

See DESIGN.md for how this answers the 2010 RAM API debate.
"""

from pyvhost.memory.address import FrontendAddress, GuestAddress
from pyvhost.memory.dirty_log import LOG_PAGE, DirtyLog, logging_supported
from pyvhost.memory.guest_memory import DEFAULT_MAX_REGIONS, GuestMemory, MemoryListener, Pin
from pyvhost.memory.region import MemoryRegion, RegionSpec, RegionState

__all__ = [
    "LOG_PAGE",
    "DirtyLog",
    "logging_supported",
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
