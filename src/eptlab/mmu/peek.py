"""Side-effect-free translation: where a guest-linear address lands in host-physical memory now.

A software walk of the guest page tables (SDM Vol. 3A §4.5) and of the EPT (Vol. 3C §29.3.2)
that only reads entries: it sets no accessed/dirty flag, checks no permission, fills no TLB and
creates no storage. It answers "which host frame would this access use if it completed", which
is what a model that must reason about an access *before* the engine performs it needs (the RTM
model uses it to find conflicts and capacity overflows ahead of the run). It agrees with the
engine as long as no processor holds a stale translation (every remap was invalidated).

:class:`Peeker` memoizes GPA -> HPA page lookups (the guest's paging-structure pages are walked
through the EPT over and over); :meth:`Peeker.forget` drops them after the tables change.
"""

from __future__ import annotations

from ..arch.bits import PAGE_SHIFT, bits
from ..arch.paging import paging_levels
from ..memory.physical import PhysicalMemory
from .context import GuestState, Vmcs

_PRESENT = 1  # guest entry bit 0
_PS = 1 << 7  # guest PS / EPT bit 7 (page size)
_EPT_RWX = 7  # an EPT entry with bits 2:0 = 0 is not present
_EPT_XU = 1 << 10  # user-execute under MBEC: present too


class Peeker:
    """Read-only walks over one host memory (see the module docstring)."""

    def __init__(self, memory: PhysicalMemory, maxphyaddr: int) -> None:
        self.memory = memory
        self.table_mask = bits(maxphyaddr - 1, PAGE_SHIFT)
        self.leaf_mask = {
            level: bits(maxphyaddr - 1, PAGE_SHIFT + 9 * (level - 1)) for level in (1, 2, 3)
        }
        self._pages: dict[tuple[int, int], int] = {}  # (EPTP root, GPA page) -> HPA page, -1

    def forget(self) -> None:
        """Drop the cached view of host pages (call after the tables change)."""
        self._pages.clear()

    def gpa_to_hpa(self, vmcs: Vmcs | None, gpa: int) -> int | None:
        """The HPA the EPT maps ``gpa`` to, or None if an entry on the way is not present."""
        if vmcs is None:
            return gpa
        key = (vmcs.eptp.root, gpa >> PAGE_SHIFT)
        page = self._pages.get(key)
        if page is None:
            page = self._walk_ept(vmcs, gpa)
            self._pages[key] = page
        return None if page < 0 else (page << PAGE_SHIFT) | (gpa & 0xFFF)

    def _walk_ept(self, vmcs: Vmcs, gpa: int) -> int:
        present = _EPT_RWX | (_EPT_XU if vmcs.mbec else 0)
        read = self.memory.read_u64
        table = vmcs.eptp.root
        for level in range(vmcs.eptp.levels, 0, -1):
            shift = PAGE_SHIFT + 9 * (level - 1)
            value = read(table + 8 * ((gpa >> shift) & 511))
            if not value & present:
                return -1
            if level == 1 or (level < 4 and value & _PS):
                frame = value & self.leaf_mask[level]
                return (frame | (gpa & ((1 << shift) - 1))) >> PAGE_SHIFT
            table = value & self.table_mask
        return -1

    def gpa(self, guest: GuestState, vmcs: Vmcs | None, gva: int) -> int | None:
        """The guest-physical address ``gva`` translates to through the guest page tables
        (read through the EPT), or None if the guest mapping or the EPT mapping of one of its
        paging-structure pages is missing."""
        read = self.memory.read_u64
        table = guest.cr3 & self.table_mask
        for level in range(paging_levels(guest.cr4), 0, -1):
            shift = PAGE_SHIFT + 9 * (level - 1)
            slot = self.gpa_to_hpa(vmcs, table + 8 * ((gva >> shift) & 511))
            if slot is None:
                return None
            value = read(slot)
            if not value & _PRESENT:
                return None
            if level == 1 or (level < 4 and value & _PS):
                return (value & self.leaf_mask[level]) | (gva & ((1 << shift) - 1))
            table = value & self.table_mask
        return None

    def hpa(self, guest: GuestState, vmcs: Vmcs | None, gva: int) -> int | None:
        """The HPA ``gva`` translates to through the guest page tables and the EPT, or None if
        the guest mapping or an EPT mapping on the way (a paging-structure page or the data
        page) is missing."""
        gpa = self.gpa(guest, vmcs, gva)
        return None if gpa is None else self.gpa_to_hpa(vmcs, gpa)


def peek_hpa(
    memory: PhysicalMemory, guest: GuestState, vmcs: Vmcs | None, maxphyaddr: int, gva: int
) -> int | None:
    """One read-only walk of ``gva`` (no memoization kept)."""
    return Peeker(memory, maxphyaddr).hpa(guest, vmcs, gva)
