"""Small helpers for bit fields and the page geometry shared by guest paging and EPT."""

from __future__ import annotations

from enum import IntEnum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
ENTRIES_PER_TABLE = 512
ENTRY_BYTES = 8


def bit(n: int) -> int:
    """The mask with bit ``n`` set."""
    return 1 << n


def bits(hi: int, lo: int) -> int:
    """The mask with bits ``hi:lo`` (inclusive) set; ``bits(hi, lo) == 0`` when ``hi < lo``."""
    if hi < lo:
        return 0
    return ((1 << (hi - lo + 1)) - 1) << lo


def field(value: int, hi: int, lo: int) -> int:
    """Bits ``hi:lo`` of ``value``, shifted down."""
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


class PageSize(IntEnum):
    """The three page sizes of 4-level and 5-level paging and of EPT."""

    SIZE_4K = 1 << 12
    SIZE_2M = 1 << 21
    SIZE_1G = 1 << 30

    @property
    def level(self) -> int:
        """The paging level whose entry maps a page of this size (1 = PTE, 2 = PDE, 3 = PDPTE)."""
        return {PageSize.SIZE_4K: 1, PageSize.SIZE_2M: 2, PageSize.SIZE_1G: 3}[self]

    @property
    def label(self) -> str:
        """Short name: ``4k``, ``2m`` or ``1g``."""
        return {PageSize.SIZE_4K: "4k", PageSize.SIZE_2M: "2m", PageSize.SIZE_1G: "1g"}[self]

    @classmethod
    def at_level(cls, level: int) -> PageSize:
        """The size of the page mapped by a leaf at ``level`` (1, 2 or 3)."""
        try:
            return {1: cls.SIZE_4K, 2: cls.SIZE_2M, 3: cls.SIZE_1G}[level]
        except KeyError:
            raise ValueError(f"no page can be mapped at level {level}") from None

    @classmethod
    def parse(cls, text: str) -> PageSize:
        """``"4k"``, ``"2m"`` or ``"1g"`` (case-insensitive)."""
        for size in cls:
            if size.label == text.lower():
                return size
        raise ValueError(f"unknown page size {text!r} (expected 4k, 2m or 1g)")


def level_shift(level: int) -> int:
    """Shift of the address bits that index the table at ``level`` (1 -> 12, 2 -> 21, ...)."""
    return PAGE_SHIFT + 9 * (level - 1)


def table_index(address: int, level: int) -> int:
    """The 9-bit index that ``address`` selects in the table at ``level``."""
    return (address >> level_shift(level)) & 0x1FF


LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
"""Names of the entry at each level (SDM Vol. 3A §4.5; EPT uses the same names with 'EPT ')."""
