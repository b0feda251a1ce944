"""The guest page-table builder: maps guest-linear to guest-physical pages by writing 4-level or
5-level paging entries into guest memory (SDM Vol. 3A §4.5)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SHIFT, PageSize, bits
from ..arch.paging import GuestEntry, Pte, frame_mask, is_leaf
from .radix import RadixTables
from .store import WordStore

TABLE_FLAGS = Pte.P | Pte.RW | Pte.US
"""Flags of entries that reference tables: permissive, so the leaf decides (rights are ANDed)."""


class GuestPageTables(RadixTables):
    """One address space's guest paging structures; :attr:`root` is the value for CR3."""

    kind = "guest"

    def __init__(
        self,
        store: WordStore,
        alloc_table: Callable[[], int],
        *,
        levels: int = 4,
        maxphyaddr: int = 46,
    ) -> None:
        self.maxphyaddr = maxphyaddr
        super().__init__(store, alloc_table, levels)

    def _present(self, value: int) -> bool:
        return bool(value & Pte.P)

    def _is_leaf(self, value: int, level: int) -> bool:
        return is_leaf(value, level)

    def _table_address(self, value: int) -> int:
        return value & bits(self.maxphyaddr - 1, PAGE_SHIFT)

    def _leaf_address(self, value: int, level: int) -> int:
        return value & frame_mask(level, self.maxphyaddr)

    def _table_entry(self, table: int) -> int:
        return table | TABLE_FLAGS

    def map(
        self,
        gva: int,
        gpa: int,
        size: PageSize = PageSize.SIZE_4K,
        *,
        writable: bool = True,
        user: bool = False,
        xd: bool = False,
        global_: bool = False,
        pkey: int = 0,
        pwt: bool = False,
        pcd: bool = False,
        pat: bool = False,
        replace: bool = False,
    ) -> int:
        """Map the ``size`` page at ``gva`` to ``gpa``; returns the leaf value written.

        ``gva`` may be given canonical (sign-extended) or as its low 48/57 bits.
        """
        size = PageSize(size)
        entry = GuestEntry(
            level=size.level,
            address=gpa,
            writable=writable,
            user=user,
            xd=xd,
            global_=global_,
            pkey=pkey,
            pwt=pwt,
            pcd=pcd,
            pat=pat,
            page_size=size != PageSize.SIZE_4K,
        )
        value = entry.encode(self.maxphyaddr)
        self._install(gva, size, value, replace=replace)
        return value

    def map_range(
        self,
        gva: int,
        gpa: int,
        length: int,
        size: PageSize = PageSize.SIZE_4K,
        *,
        writable: bool = True,
        user: bool = False,
        xd: bool = False,
    ) -> int:
        """Map ``length`` bytes linearly with ``size`` pages (vectorized); returns pages."""
        size = PageSize(size)
        flags = self._leaf_flags(size, writable, user, xd)
        return self._install_range(gva, gpa, length, size, flags)

    def _leaf_flags(self, size: PageSize, writable: bool, user: bool, xd: bool) -> int:
        """The flag bits of a leaf entry mapping a ``size`` page (address 0)."""
        return GuestEntry(
            level=size.level,
            address=0,
            writable=writable,
            user=user,
            xd=xd,
            page_size=size != PageSize.SIZE_4K,
        ).encode(self.maxphyaddr)

    def map_pages(
        self,
        gvas: npt.NDArray[np.int64],
        gpas: npt.NDArray[np.int64],
        size: PageSize = PageSize.SIZE_4K,
        *,
        writable: bool = True,
        user: bool = False,
        xd: bool = False,
    ) -> int:
        """Map each ``gvas[i]`` to ``gpas[i]`` with ``size`` pages (vectorized; scattered
        placements); returns pages."""
        size = PageSize(size)
        flags = self._leaf_flags(size, writable, user, xd)
        return self._install_pages(gvas, gpas, size, flags)

    def guest_physical(self, gva: int) -> int | None:
        """The GPA ``gva`` maps to, ignoring permissions (a software lookup)."""
        leaf = self.lookup(gva)
        return None if leaf is None else leaf.target
