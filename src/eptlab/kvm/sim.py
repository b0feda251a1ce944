"""The simulator side of the cross-checks: the KVM guests' access patterns run through eptlab's
simulated machine (``eptlab.hv`` with PML, write-protection and a copy-on-write fork), with the
same guest-physical layout as the KVM guests (boot region, then data at ``DATA_BASE``,
identity-mapped by the guest's page tables).

What both engines can answer is compared by :mod:`eptlab.kvm.apps.crosscheck`: pages copied by
a fork, the dirty page set, exits per write when every write traps. Times from this side are
modelled (cycles priced by the active cost profile, :func:`eptlab.hv.costs.hv_costs`, read when
each function runs), never measured.

The fork here is the 4 KiB case of :class:`eptlab.apps.cow.CopyOnWrite`, written again in a few
lines so that ``kvm/`` imports nothing from ``apps/``: the parent's leaves lose write permission,
each clone maps the same frames read-only, and a clone's first write to a page copies it (or,
when the clone is the page's last owner, takes the frame back without copying). It is priced
as ``CopyOnWrite`` prices an eager fork (EPT edits, table frames, ``vm_create_cycles`` per
clone; exit, INVEPT, edit, frame and copy per fault); a test checks it against ``CopyOnWrite``
on the same pattern.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..arch.access import Access
from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..arch.ept import Ept, ept_address
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..costs import active_profile
from ..errors import ConfigError
from ..hv import VCPU, VM, Exit, ExitAction, Hypervisor, Run
from ..hv.costs import HvCosts, hv_costs
from ..mmu.context import GuestState
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


class _CowFork:
    """Copy-on-write clones of one VM mapped with 4 KiB EPT pages, priced with ``costs``."""

    def __init__(self, hv: Hypervisor, costs: HvCosts) -> None:
        self.hv, self.costs = hv, costs
        self.vm_create = active_profile().cycles("vm_create_cycles")  # a clone's VM and vCPUs
        self.shared: dict[int, set[int]] = {}  # id(vm) -> pages still shared (write-protected)
        self.copied: Counter[str] = Counter()  # pages copied, by VM name
        self.fork_cycles = self.fault_cycles = 0
        hv.on(ExitReason.EPT_VIOLATION, self.on_write)

    def fork(self, vm: VM, n: int) -> list[VM]:
        """``n`` clones sharing every frame of ``vm``, each with the parent's vCPU registers."""
        memory = self.hv.host.memory
        leaves = []
        for gpa, leaf in vm.ept.leaves(0, vm.memory):
            if leaf.page_size != PageSize.SIZE_4K:
                raise ConfigError("memory", f"GPA {gpa:#x} is not a 4 KiB EPT page")
            leaves.append((gpa, ept_address(leaf.value, leaf.level, vm.ept.maxphyaddr), leaf))
            if leaf.value & Ept.W:
                memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.W))
                self.fork_cycles += self.costs.ept_edit
        self.shared[id(vm)] = {gpa for gpa, _, _ in leaves}
        clones = []
        for i in range(n):
            clone = self.hv.create_vm(f"{vm.name}.{i + 1}", vm.memory, lazy=False,
                                      ept_levels=vm.ept.tables.levels)
            tables_before = len(clone.ept.tables.tables)
            for gpa, hpa, leaf in leaves:
                clone.ept.map(gpa, hpa=hpa, perms="r-x" if leaf.value & Ept.X else "r--")
            self.shared[id(clone)] = {gpa for gpa, _, _ in leaves}
            tables = len(clone.ept.tables.tables)  # the root and what the leaves needed
            touched = len(leaves) + tables - tables_before
            self.fork_cycles += (self.vm_create + touched * self.costs.ept_edit
                                 + tables * self.costs.frame_alloc)
            for parent_vcpu in vm.vcpus:
                g = parent_vcpu.guest
                clone.add_vcpu(guest=GuestState(cr3=g.cr3, cr0=g.cr0, cr4=g.cr4, efer=g.efer,
                                                pkru=g.pkru, rflags=g.rflags))
            clones.append(clone)
        vm.invept()
        self.fork_cycles += self.costs.invept
        return clones

    def on_write(self, exit_: Exit) -> ExitAction | None:
        """A write to a shared page: copy it, or take it back when no one else maps it."""
        record, vm = exit_.record, exit_.vcpu.vm
        if not (isinstance(record, EptViolation) and record.qualification & EptQual.WRITE):
            return None
        page = record.gpa & PAGE_MASK
        leaf = vm.ept.lookup(page)
        if leaf is None or page not in self.shared.get(id(vm), ()):
            return None
        self.fault_cycles += self.costs.vmexit + self.costs.invept
        hpa = ept_address(leaf.value, leaf.level, vm.ept.maxphyaddr)
        host = self.hv.host
        self.fault_cycles += self.costs.ept_edit
        if host.refs(hpa) == 1:  # the last owner: no copy
            host.memory.write_u64(leaf.entry_address, leaf.value | Ept.W)
        else:
            new = host.alloc(PageSize.SIZE_4K)
            host.memory.copy_frame(hpa >> PAGE_SHIFT, new >> PAGE_SHIFT)
            keep = leaf.value & ~((1 << vm.ept.maxphyaddr) - 1 & ~0xFFF)
            host.memory.write_u64(leaf.entry_address, new | keep | Ept.W)
            host.release(hpa, PAGE_SIZE)
            self.copied[vm.name] += 1
            self.fault_cycles += self.costs.frame_alloc + self.costs.copy_cycles(PAGE_SIZE)
        self.shared[id(vm)].discard(page)
        vm.invept()
        return ExitAction.RETRY


def fork(memory: int, parent_writes: Sequence[int], clone_writes: Sequence[Sequence[int]]) -> (
    SimFork
):
    """The parent writes its pages (the snapshot's state), is forked copy-on-write into one
    clone per list, and each clone writes its addresses."""
    hv, parent, vcpu = _machine(memory)
    vcpu.load([_writes(parent_writes)])
    hv.run([vcpu])
    cow = _CowFork(hv, hv_costs())
    clones = cow.fork(parent, len(clone_writes))
    for clone, writes in zip(clones, clone_writes, strict=True):
        clone.vcpus[0].load([_writes(writes)])
        hv.run([clone.vcpus[0]])
    return SimFork([cow.copied[clone.name] for clone in clones], cow.fork_cycles,
                   cow.fault_cycles)


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
    costs = hv_costs()
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
        cycles += costs.invept
        dirty.append(pages)
    exits = hv.exits[ExitReason.PML_FULL]
    writes = sum(len(r) for r in rounds)
    return SimDirtyLog(dirty, exits, writes, cycles + exits * costs.vmexit)


def dirty_log_trap(memory: int, rounds: Sequence[Sequence[int]]) -> SimDirtyLog:
    """Every write traps: the data region is read-only in the EPT; the handler records the page,
    lets the one write through (the emulation KVM's userspace does) and protects it again."""
    costs = hv_costs()
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
    return SimDirtyLog(dirty, exits, writes, exits * (costs.vmexit + 2 * costs.invept))
