"""Write-protecting the guest page tables that map the protected code (integrity-monitor mode
``trap-pt``): the software answer to the page-table remapping attack.

A remapping attacker never writes the code page: it edits a guest paging entry on the path of
the code's linear address (the PML4E of a root, the PDPTE, the PDE) so that the address maps
another guest-physical page. EPT write traps on the code's GPAs and PML see nothing. The guard
takes write permission away (in the EPT) from every page that holds one of those entries. Every
guest store to such a page then exits: the monitor emulates it when it leaves the path's
entries as they were (the guest's ordinary page-table writes land in the same pages and pay an
exit each), and denies and reports it otherwise.

The processor's own writes there need care. With EPT accessed/dirty flags on, *every* access of
the walker to a guest paging entry counts as a write for EPT (SDM Vol. 3C §29.3.3.2), so every
walk through a protected page would exit: the guard therefore turns EPT A/D off (a trapping
monitor does not use them; the hardware answer to this is the paging-write bit, modelled only
on the reference walker, :mod:`eptlab.apps.integrity_hlat`). Without EPT A/D the walker's
setting of a guest accessed/dirty flag in a protected page is still a write and exits; the
guard emulates it (sets the flag; the walk is retried).
"""

from __future__ import annotations

from dataclasses import replace

from ..arch.bits import PAGE_SIZE
from ..arch.paging import Pte
from ..hv import VM


class PageTableGuard:
    """The protected entries (GPA -> value they must keep) and the pages holding them."""

    def __init__(self, entries: dict[int, int]) -> None:
        self.entries = dict(entries)
        self.pages = frozenset(gpa & ~(PAGE_SIZE - 1) for gpa in self.entries)

    def protect(self, vm: VM) -> int:
        """Split the pages to 4 KiB EPT pages and make them read-only; turn EPT A/D off on
        every vCPU of ``vm`` (see the module docstring). Returns the EPT splits made."""
        ept, splits = vm.ept, 0
        for page in sorted(self.pages):
            leaf = ept.lookup(page)
            if leaf is None:
                vm.back(page)
                leaf = ept.lookup(page)
                assert leaf is not None
            splits += ept.split_to_4k(page)[1]
            ept.protect(page, PAGE_SIZE, "r--")
        ept.tables.ad_enabled = False
        for vcpu in vm.vcpus:
            vcpu.vmcs.eptp = replace(vcpu.vmcs.eptp, ad_enabled=False)
        return splits

    def allows(self, gpa: int, value: int) -> bool:
        """Whether a guest store of ``value`` at ``gpa`` keeps every protected entry as it was."""
        slot = gpa & ~7
        flags = int(Pte.A | Pte.D)  # the processor's own bookkeeping, not a remapping
        return slot not in self.entries or (value ^ self.entries[slot]) & ~flags == 0

    def paging_write(self, vm: VM, gpa: int) -> None:
        """Emulate the walker's flag update on the entry at ``gpa``: accessed, then dirty
        (a retried walk that still needs the dirty flag exits again and gets it)."""
        slot = gpa & ~7
        value = vm.read_u64(slot)
        vm.write_u64(slot, value | (Pte.D if value & Pte.A else Pte.A))
