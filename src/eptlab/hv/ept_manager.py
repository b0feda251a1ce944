"""The hypervisor's EPT manager: the software that edits one VM's EPT.

It maps, unmaps and protects guest-physical ranges, splits large mappings and merges them back,
changes memory types, and backs memory lazily. It only edits entries: invalidating what the
processors cached is a separate, explicit step (:meth:`eptlab.hv.vm.VM.invept`), as on hardware.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..arch.bits import ENTRIES_PER_TABLE, ENTRY_BYTES, PageSize
from ..arch.ept import (
    MEMTYPE_MASK,
    MEMTYPE_SHIFT,
    Ept,
    MemoryType,
    ept_address,
    ept_is_leaf,
    ept_is_present,
    parse_permissions,
)
from ..errors import AddressError, MappingError
from ..tables import EptTables, HostStore
from ..tables.radix import Leaf
from .host import HostMemory

RWX = int(Ept.R | Ept.W | Ept.X)


class EptManager:
    """One VM's EPT, with its host frames reference-counted in :class:`HostMemory`."""

    def __init__(
        self,
        host: HostMemory,
        *,
        levels: int = 4,
        maxphyaddr: int = 46,
        ad_enabled: bool = False,
        mbec: bool = False,
    ) -> None:
        self.host = host
        self.tables = EptTables(
            HostStore(host.memory),
            host.alloc,
            levels=levels,
            maxphyaddr=maxphyaddr,
            ad_enabled=ad_enabled,
            mbec=mbec,
        )
        self.maxphyaddr = maxphyaddr

    @property
    def eptp(self) -> int:
        """The EPTP value of these tables."""
        return self.tables.eptp.encode()

    def lookup(self, gpa: int) -> Leaf | None:
        """The leaf mapping ``gpa``, or None."""
        return self.tables.lookup(gpa)

    def host_address(self, gpa: int) -> int | None:
        """The HPA ``gpa`` maps to, or None when it is not mapped."""
        return self.tables.host_address(gpa)

    # -- mapping --------------------------------------------------------------------------------

    def map(
        self,
        gpa: int,
        size: PageSize = PageSize.SIZE_4K,
        *,
        hpa: int | None = None,
        at: int | None = None,
        perms: str = "rwx",
        memory_type: MemoryType = MemoryType.WB,
    ) -> int:
        """Map one page; with ``hpa=None`` a fresh host block backs it (placed at host address
        ``at`` if given, else where the host allocator chooses). Returns the HPA. A given
        ``hpa`` gains a reference (shared mappings)."""
        size = PageSize(size)
        if hpa is None:
            hpa = self.host.alloc(size, at=at)
        else:
            self.host.share(hpa, size)
        self.tables.map(gpa, hpa, size, memory_type=memory_type)
        if perms != "rwx":
            self.tables.set_permission_bits(gpa, parse_permissions(perms))
        return hpa

    def map_range(
        self, gpa: int, length: int, size: PageSize = PageSize.SIZE_4K, perms: str = "rwx"
    ) -> None:
        """Back ``length`` bytes with fresh host blocks of ``size``."""
        size = PageSize(size)
        if gpa % size or length % size:
            raise AddressError(f"{gpa:#x}+{length:#x} is not aligned to {size.label}")
        for offset in range(0, length, size):
            self.map(gpa + offset, size, perms=perms)

    def unmap(self, gpa: int) -> Leaf:
        """Remove the leaf mapping ``gpa`` and release its host block."""
        leaf = self.tables.unmap(gpa)
        self.host.release(ept_address(leaf.value, leaf.level, self.maxphyaddr), leaf.page_size)
        return leaf

    def destroy(self) -> None:
        """Unmap everything and release the EPT's own table frames."""
        for page, _ in list(self.tables.mapped()):
            self.unmap(page)
        for table in self.tables.tables:
            self.host.release(table)
        self.tables.tables.clear()

    def leaves(self, gpa: int, length: int) -> Iterator[tuple[int, Leaf]]:
        """``(page GPA, leaf)`` for the pages overlapping ``[gpa, gpa + length)``, in order."""
        return self.tables.mapped(gpa, gpa + length)

    def _leaf(self, gpa: int) -> Leaf:
        leaf = self.tables.lookup(gpa)
        if leaf is None:
            raise MappingError(f"GPA {gpa:#x} is not mapped")
        return leaf

    def protect(self, gpa: int, length: int, perms: str) -> int:
        """Set the permissions of every page in the range; a large page that sticks out of it
        is split first. Returns the number of leaves changed."""
        bits = parse_permissions(perms)
        changed = 0
        for page, leaf in list(self.leaves(gpa, length)):
            end = page + leaf.page_size
            if leaf.level > 1 and (page < gpa or end > gpa + length):
                self.split(page)
                first, last = max(gpa, page), min(gpa + length, end)
                changed += self.protect(first, last - first, perms)
                continue
            self.tables.set_permission_bits(page, bits)
            changed += 1
        return changed

    def set_leaf_permissions(self, gpa: int, perms: str) -> bool:
        """Set the permissions of the 4 KiB leaf mapping ``gpa``, present or not.

        Revoking every right (``"---"``) makes the entry not present (bits 2:0 = 0, SDM Vol. 3C
        §29.3.2) but it keeps its address and attributes, so the same call restores it, which
        :meth:`protect` (present leaves only) cannot do. Returns whether the entry changed."""
        return self.set_entry_permissions(self.leaf_slot(gpa), perms)

    def leaf_slot(self, gpa: int) -> int:
        """Host address of the 4 KiB leaf entry mapping ``gpa`` (present or not). A hypervisor
        that edits the same entries often keeps these (as KVM's reverse maps do) and passes them
        to :meth:`set_entry_permissions`, skipping the table walk."""
        slot = self.tables.entry_address(gpa, 1)  # MappingError if no 4 KiB table holds it
        if not self.host.memory.read_u64(slot) & ~RWX:
            raise MappingError(f"GPA {gpa:#x} has no 4 KiB EPT mapping")
        return slot

    def set_entry_permissions(self, slot: int, perms: str) -> bool:
        """Set bits 2:0 of the leaf entry at host address ``slot`` (from :meth:`leaf_slot`);
        returns whether it changed. Invalidation is the caller's business."""
        value = self.host.memory.read_u64(slot)
        new = (value & ~RWX) | parse_permissions(perms)
        if new == value:
            return False
        self.host.memory.write_u64(slot, new)
        return True

    def set_memory_type(self, gpa: int, memory_type: MemoryType) -> None:
        """Set the memory type (bits 5:3) of the leaf mapping ``gpa``."""
        leaf = self._leaf(gpa)
        value = (leaf.value & ~MEMTYPE_MASK) | (int(memory_type) << MEMTYPE_SHIFT)
        self.host.memory.write_u64(leaf.entry_address, value)

    # -- splitting and merging --------------------------------------------------------------------

    def split_to_4k(self, gpa: int) -> tuple[Leaf, int]:
        """Split the leaf mapping ``gpa`` down to a 4 KiB page (as many times as it takes);
        returns the 4 KiB leaf and how many splits that took (0 if it was one already)."""
        leaf, splits = self._leaf(gpa), 0
        while leaf.level > 1:
            self.split(gpa)
            splits += 1
            leaf = self._leaf(gpa)
        return leaf, splits

    def split(self, gpa: int) -> int:
        """Replace the 1 GiB or 2 MiB leaf mapping ``gpa`` by a table of 512 leaves of the next
        size down, with the same permissions, memory type and host frames. Returns the new
        table's address. Caches still hold the large translation until invalidated."""
        leaf = self._leaf(gpa)
        if leaf.level == 1:
            raise MappingError(f"GPA {gpa:#x} is mapped by a 4 KiB page: nothing to split")
        small = PageSize.at_level(leaf.level - 1)
        base_hpa = ept_address(leaf.value, leaf.level, self.maxphyaddr)
        keep = leaf.value & (
            RWX
            | int(Ept.XU)
            | MEMTYPE_MASK
            | int(Ept.IGNORE_PAT)
            | int(Ept.A)
            | int(Ept.D)
            | int(Ept.SUPPRESS_VE)
        )
        if small == PageSize.SIZE_2M:
            keep |= int(Ept.PS)
        table = self.host.alloc()
        self.tables.tables.append(table)
        frame = self.host.memory.frame(table >> 12)
        for i in range(ENTRIES_PER_TABLE):
            frame[i] = base_hpa + i * small | keep
        # reference counts are per 4 KiB frame: 512 smaller leaves map the same frames
        self.host.memory.write_u64(leaf.entry_address, table | RWX | int(Ept.XU))
        return table

    def merge(self, gpa: int, size: PageSize) -> bool:
        """Merge the table under the ``size`` entry of ``gpa`` back into one leaf if its 512
        leaves map contiguous, aligned host memory with identical attributes. Returns whether
        it merged."""
        size = PageSize(size)
        if size == PageSize.SIZE_4K:
            raise MappingError("a 4 KiB mapping cannot be merged into")
        entry = self.tables.entry_address(gpa, size.level)
        value = self.host.memory.read_u64(entry)
        if not ept_is_present(value) or ept_is_leaf(value, size.level):
            return False
        table = value & ((1 << self.maxphyaddr) - 1) & ~0xFFF
        small = PageSize.at_level(size.level - 1)
        words = [self.host.memory.read_u64(table + i * ENTRY_BYTES) for i in range(512)]
        first = words[0]
        if not ept_is_present(first) or not ept_is_leaf(first, size.level - 1):
            return False
        base = ept_address(first, size.level - 1, self.maxphyaddr)
        attrs = first & ~((1 << self.maxphyaddr) - 1 & ~0xFFF) & ~int(Ept.A | Ept.D)
        if base % size:
            return False
        for i, word in enumerate(words):
            if not ept_is_present(word) or not ept_is_leaf(word, size.level - 1):
                return False
            if ept_address(word, size.level - 1, self.maxphyaddr) != base + i * small:
                return False
            if word & ~((1 << self.maxphyaddr) - 1 & ~0xFFF) & ~int(Ept.A | Ept.D) != attrs:
                return False
        dirty = any(w & Ept.D for w in words)
        leaf = base | (attrs & ~int(Ept.PS)) | int(Ept.PS) | (int(Ept.D) if dirty else 0)
        self.host.memory.write_u64(entry, leaf)  # the frames' reference counts do not change
        self.host.release(table)
        self.tables.tables.remove(table)
        return True
