"""The simulator side of the cross-checks: the KVM guests' access patterns run through eptlab's
simulated machine (``eptlab.hv`` with ``eptlab.apps.cow``, PML and write-protection), with the
same guest-physical layout as the KVM guests (boot region, then data at ``DATA_BASE``,
identity-mapped by the guest's page tables).

What both engines can answer is compared by :mod:`eptlab.kvm.apps.crosscheck`: pages copied by
a fork, the dirty page set, exits per write when every write traps. Times from this side are
modelled (cycles of ``eptlab.hv.costs``), never measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..apps.cow import CopyOnWrite
from ..arch.access import Access
from ..arch.bits import PAGE_SIZE
from ..arch.ept import Ept
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..hv import VCPU, VM, Exit, ExitAction, Hypervisor, Run
from ..hv.costs import INVEPT_CYCLES, VMEXIT_CYCLES
from ..tables import GuestPageTables
from ..traces.model import TraceChunk
from .backend import BOOT_SIZE, DATA_BASE

PAGE_MASK = ~(PAGE_SIZE - 1)


def _writes(addresses: Sequence[int]) -> Run:
    n = len(addresses)
    chunk = TraceChunk(np.asarray(addresses, np.int64), np.full(n, Access.WRITE, np.int8),
                       np.full(n, 8, np.int32))
    return Run(chunk, user=False)


def _machine(memory: int, *, pml: bool = False) -> tuple[Hypervisor, VM, VCPU]:
    """A VM laid out like the KVM guests: every page backed (4 KiB EPT), guest page tables in
    the boot region identity-mapping the data region."""
    hv = Hypervisor()
    vm = hv.create_vm("parent", memory, lazy=False, pml=pml)
    vm.ept.map_range(0, memory)
    tables = iter(range(PAGE_SIZE, BOOT_SIZE, PAGE_SIZE))
    pt = GuestPageTables(vm, lambda: next(tables))
    pt.map_range(DATA_BASE, DATA_BASE, memory - DATA_BASE)
    return hv, vm, vm.add_vcpu(cr3=pt.root)


@dataclass(frozen=True)
class SimFork:
    """The simulator's fork: pages copied per clone and modelled cycles."""
    pages_copied: list[int]  # per clone
    fork_cycles: int  # modelled
    fault_cycles: int  # modelled


def fork(memory: int, parent_writes: Sequence[int], clone_writes: Sequence[Sequence[int]]) -> (
    SimFork
):
    """The parent writes its pages (the snapshot's state), is forked copy-on-write into one
    clone per list, and each clone writes its addresses."""
    hv, parent, vcpu = _machine(memory)
    vcpu.load([_writes(parent_writes)])
    hv.run([vcpu])
    cow = CopyOnWrite(hv)
    clones = cow.fork(parent, len(clone_writes))
    for clone, writes in zip(clones, clone_writes, strict=True):
        clone.vcpus[0].load([_writes(writes)])
        hv.run([clone.vcpus[0]])
    c = cow.counters
    return SimFork([c.per_vm[clone.name] for clone in clones], c.fork_cycles, c.fault_cycles)


@dataclass(frozen=True)
class SimDirtyLog:
    """The simulator's dirty log: pages reported per round and exits."""
    dirty: list[set[int]]  # per round: data-region pages (GPA) reported dirty
    exits: int  # exits caused by the writes (PML full, or write-protection violations)
    writes: int
    modelled_cycles: int


def dirty_log_pml(memory: int, rounds: Sequence[Sequence[int]]) -> SimDirtyLog:
    """Page-modification logging (SDM Vol. 3C §29.3.6): writes run free, the log is drained after
    each round, and the dirty flags of the reported pages are cleared (then INVEPT)."""
    hv, vm, vcpu = _machine(memory, pml=True)
    dirty: list[set[int]] = []
    cycles = 0
    for addresses in rounds:
        vcpu.load([_writes(addresses)])
        hv.run([vcpu])
        vm.drain_pml(vcpu)
        pages = {gpa & PAGE_MASK for gpa in vm.dirty_log if gpa >= DATA_BASE}
        vm.dirty_log.clear()
        for page in pages:
            leaf = vm.ept.lookup(page)
            assert leaf is not None
            hv.host.memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.D))
        vm.invept()
        cycles += INVEPT_CYCLES
        dirty.append(pages)
    exits = hv.exits[ExitReason.PML_FULL]
    writes = sum(len(r) for r in rounds)
    return SimDirtyLog(dirty, exits, writes, cycles + exits * VMEXIT_CYCLES)


def dirty_log_trap(memory: int, rounds: Sequence[Sequence[int]]) -> SimDirtyLog:
    """Every write traps: the data region is read-only in the EPT; the handler records the page,
    lets the one write through (the emulation KVM's userspace does) and protects it again."""
    hv, vm, vcpu = _machine(memory)
    vm.ept.protect(DATA_BASE, memory - DATA_BASE, "r-x")
    vm.invept()
    trapped: list[int] = []
    opened: list[int] = []

    def on_violation(exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if not (isinstance(record, EptViolation) and record.qualification & EptQual.WRITE):
            return None
        page = record.gpa & PAGE_MASK
        trapped.append(page)
        vm.ept.protect(page, PAGE_SIZE, "rwx")
        vm.invept()
        opened.append(page)
        return ExitAction.RETRY

    hv.on(ExitReason.EPT_VIOLATION, on_violation)
    dirty: list[set[int]] = []
    for addresses in rounds:
        start = len(trapped)
        for gva in addresses:
            vcpu.access(gva, Access.WRITE)
            for page in opened:
                vm.ept.protect(page, PAGE_SIZE, "r-x")
            if opened:
                vm.invept()
            opened.clear()
        dirty.append(set(trapped[start:]))
    exits = hv.exits[ExitReason.EPT_VIOLATION]
    writes = sum(len(r) for r in rounds)
    return SimDirtyLog(dirty, exits, writes, exits * (VMEXIT_CYCLES + 2 * INVEPT_CYCLES))
