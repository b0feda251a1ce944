"""Page-table builders: guest paging structures and EPT, written as real entries into memory."""

from .ept import EptTables
from .guest import GuestPageTables
from .radix import Leaf
from .store import GuestPhysicalStore, HostStore, WordStore

__all__ = ["EptTables", "GuestPageTables", "GuestPhysicalStore", "HostStore", "Leaf", "WordStore"]
