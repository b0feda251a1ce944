"""The EPT builder: maps guest-physical to host-physical pages by writing EPT entries into
host memory (SDM Vol. 3C §29.3.2).

With TME-MK key IDs (``keyids``, ``key_id``) every leaf the builder writes carries the VM's key
ID in the top bits of its address (Intel Memory Encryption Technologies Specification, Fig.
5-1: the VMM assigns a key to a VM's pages through the physical addresses in its EPT); the
tables themselves are the hypervisor's memory and are referenced without a key ID (key 0)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SHIFT, PageSize, bits
from ..arch.ept import (
    Ept,
    EptEntry,
    Eptp,
    MemoryType,
    ept_address,
    ept_is_leaf,
    ept_is_present,
)
from ..arch.mktme import KeyIdLayout
from ..errors import ConfigError
from .radix import RadixTables
from .store import WordStore

FULL_ACCESS = Ept.R | Ept.W | Ept.X | Ept.XU
"""Permissions of entries that reference tables: the leaf alone decides (rights are ANDed)."""


class EptTables(RadixTables):
    """EPT paging structures in host memory, rooted at :attr:`root` (the EPTP address)."""

    kind = "EPT"

    def __init__(
        self,
        store: WordStore,
        alloc_table: Callable[[], int],
        *,
        levels: int = 4,
        maxphyaddr: int = 46,
        ad_enabled: bool = False,
        mbec: bool = False,
        keyids: KeyIdLayout | None = None,
        key_id: int = 0,
    ) -> None:
        self.maxphyaddr, self.ad_enabled, self.mbec = maxphyaddr, ad_enabled, mbec
        if keyids is None and key_id:
            raise ConfigError("key_id", f"{key_id} needs key-ID bits (CpuFeatures.keyid_bits)")
        if keyids is not None:
            if keyids.maxphyaddr != maxphyaddr:
                raise ConfigError("keyids", f"laid out for MAXPHYADDR {keyids.maxphyaddr}")
            keyids.check_key(key_id)
        self.keyids, self.key_id = keyids, key_id
        super().__init__(store, alloc_table, levels)

    def _keyed(self, hpa: int) -> int:
        """The address a leaf holds for host frame ``hpa``: with the VM's key ID on top."""
        return hpa if self.keyids is None else self.keyids.compose(hpa, self.key_id)

    @property
    def eptp(self) -> Eptp:
        return Eptp(root=self.root, levels=self.levels, ad_enabled=self.ad_enabled)

    def _present(self, value: int) -> bool:
        return ept_is_present(value, self.mbec)

    def _is_leaf(self, value: int, level: int) -> bool:
        return ept_is_leaf(value, level)

    def _table_address(self, value: int) -> int:
        return value & bits(self.maxphyaddr - 1, PAGE_SHIFT)

    def _leaf_address(self, value: int, level: int) -> int:
        return ept_address(value, level, self.maxphyaddr)

    def _table_entry(self, table: int) -> int:
        return table | FULL_ACCESS

    def map(
        self,
        gpa: int,
        hpa: int,
        size: PageSize = PageSize.SIZE_4K,
        *,
        read: bool = True,
        write: bool = True,
        execute: bool = True,
        user_execute: bool = False,
        memory_type: MemoryType = MemoryType.WB,
        ignore_pat: bool = False,
        replace: bool = False,
    ) -> int:
        """Map the ``size`` page at ``gpa`` to ``hpa``; returns the leaf value written.

        Permissions ``write`` without ``read`` are refused (that would be a misconfiguration);
        write such entries raw with :meth:`write_entry` to provoke one on purpose.
        """
        size = PageSize(size)
        entry = EptEntry(
            level=size.level,
            address=self._keyed(hpa),
            read=read,
            write=write,
            execute=execute,
            user_execute=user_execute,
            memory_type=memory_type,
            ignore_pat=ignore_pat,
            page_size=size != PageSize.SIZE_4K,
        )
        value = entry.encode(self.maxphyaddr)
        self._install(gpa, size, value, replace=replace)
        return value

    def map_range(
        self,
        gpa: int,
        hpa: int,
        length: int,
        size: PageSize = PageSize.SIZE_4K,
        *,
        perms: str = "rwx",
        memory_type: MemoryType = MemoryType.WB,
    ) -> int:
        """Map ``length`` bytes of guest-physical memory linearly onto host memory with ``size``
        pages (vectorized: fast for millions of pages); returns the number of pages."""
        from ..arch.ept import parse_permissions

        size = PageSize(size)
        flags = EptEntry(
            level=size.level, address=0, memory_type=memory_type, page_size=size != PageSize.SIZE_4K
        ).encode(self.maxphyaddr)
        flags = (flags & ~int(Ept.R | Ept.W | Ept.X)) | parse_permissions(perms)
        if self.keyids is not None:
            self._keyed(hpa + length - 1)  # the whole range must fit below the key ID
        return self._install_range(gpa, self._keyed(hpa), length, size, flags)

    def map_pages(
        self,
        gpas: npt.NDArray[np.int64],
        hpas: npt.NDArray[np.int64],
        size: PageSize = PageSize.SIZE_4K,
        *,
        memory_type: MemoryType = MemoryType.WB,
    ) -> int:
        """Map each ``gpas[i]`` to ``hpas[i]`` with ``size`` pages, full permissions
        (vectorized; scattered placements); returns the number of pages."""
        size = PageSize(size)
        flags = EptEntry(
            level=size.level, address=0, memory_type=memory_type, page_size=size != PageSize.SIZE_4K
        ).encode(self.maxphyaddr)
        hpas = np.asarray(hpas, np.int64)
        if self.keyids is not None:
            hpas = np.array([self._keyed(int(h)) for h in hpas.tolist()], np.uint64).astype(
                np.int64
            )
        return self._install_pages(gpas, hpas, size, flags)

    def host_address(self, gpa: int) -> int | None:
        """The HPA that ``gpa`` maps to, ignoring permissions (a software lookup); with key
        IDs, the VM's key ID included."""
        leaf = self.lookup(gpa)
        return None if leaf is None else leaf.target

    def write_entry(self, gpa: int, level: int, value: int) -> int:
        """Write a raw value into the entry at ``level`` on the path of ``gpa`` (creating
        tables above it); returns the entry's address. For experiments and tests that need an
        entry no builder would write (e.g. a misconfiguration)."""
        slot = self.entry_address(gpa, level, create=True)
        self.store.write_u64(slot, value)
        return slot

    def set_permissions(self, gpa: int, *, read: bool, write: bool, execute: bool) -> int:
        """Change R/W/X of the leaf mapping ``gpa`` (no invalidation: caches are the caller's
        business, as on hardware); returns the new value."""
        perms = (Ept.R if read else 0) | (Ept.W if write else 0) | (Ept.X if execute else 0)
        return self.set_permission_bits(gpa, int(perms))

    def set_permission_bits(self, gpa: int, bits: int) -> int:
        """Write ``bits`` into bits 2:0 of the leaf mapping ``gpa``, as they are: any
        combination, ``-w-`` included (an EPT misconfiguration on the next use)."""
        leaf = self.lookup(gpa)
        if leaf is None:
            from ..errors import MappingError

            raise MappingError(f"{gpa:#x} is not mapped (EPT)")
        value = (leaf.value & ~int(Ept.R | Ept.W | Ept.X)) | (bits & 7)
        self.store.write_u64(leaf.entry_address, value)
        return value
