"""Copy-on-write VM snapshots and VM fork through read-only EPT entries.

A snapshot or a fork maps the same host frames in several EPTs with write permission removed.
The first write by any VM to such a page is an EPT violation; :meth:`CopyOnWrite.handle` copies
that page into a private frame, maps it writable in the faulting VM's EPT, invalidates (INVEPT
single-context on the VM's vCPUs) and the guest resumes. Host frames are reference-counted
(:class:`~eptlab.hv.host.HostMemory`): the last owner of a page takes it back without copying;
destroying a clone releases its references, which frees only its private frames.

With 2 MiB EPT mappings, a first write either copies the whole 2 MiB (``granularity="2m-copy"``)
or splits the mapping into 4 KiB pages and copies one of them (``"2m-split"``).

Cost model (cycles, from the cost profile active when the policy is made, see
:mod:`eptlab.hv.costs`): touching an EPT entry costs ``ept_edit_cycles``, an INVEPT
``invept_cycles``, a VM exit round trip ``vmexit_cycles``, copying ``copy_bytes_per_cycle``
bytes per cycle.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..arch.ept import Ept, ept_address
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..errors import ConfigError
from ..hv import VM, Exit, ExitAction, Hypervisor
from ..hv.costs import hv_costs
from ..mmu.context import GuestState

GRANULARITIES = ("4k", "2m-copy", "2m-split")


def copy_cycles(size: int) -> int:
    """Cycles to copy ``size`` bytes at the active profile's bandwidth."""
    return hv_costs().copy_cycles(size)


@dataclass
class Snapshot:
    """The frames a VM had when the snapshot was taken: gpa -> (hpa, page size, permissions)."""

    vm: VM
    pages: dict[int, tuple[int, PageSize, int]]


@dataclass
class CowCounters:
    cow_faults: int = 0
    pages_copied: int = 0  # 4 KiB pages of data copied
    reclaimed: int = 0  # writes by the last owner: made writable without copying
    splits: int = 0
    entries_touched: int = 0
    fork_cycles: int = 0
    fault_cycles: int = 0
    per_vm: Counter[str] = field(default_factory=Counter)  # pages copied, by VM


class CopyOnWrite:
    """The copy-on-write policy of one hypervisor."""

    def __init__(self, hv: Hypervisor, granularity: str = "4k") -> None:
        if granularity not in GRANULARITIES:
            raise ConfigError("granularity", f"{granularity!r} is not one of {GRANULARITIES}")
        self.hv, self.granularity = hv, granularity
        self.counters = CowCounters()
        self.costs = hv_costs()
        self._cow: dict[int, dict[int, PageSize]] = {}  # id(vm) -> page base -> size
        hv.on(ExitReason.EPT_VIOLATION, self.handle)

    # -- sharing ------------------------------------------------------------------------------

    def _leaves(self, vm: VM) -> list[tuple[int, int, PageSize, int]]:
        """(gpa, hpa, size, value) of every leaf of the VM's EPT."""
        out = []
        for gpa, leaf in vm.ept.leaves(0, vm.memory):
            hpa = ept_address(leaf.value, leaf.level, vm.ept.maxphyaddr)
            out.append((gpa, hpa, leaf.page_size, leaf.value))
        return out

    def _write_protect(self, vm: VM, gpa: int, size: PageSize) -> None:
        leaf = vm.ept.lookup(gpa)
        assert leaf is not None
        if leaf.value & Ept.W:
            vm.hv.host.memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.W))
        self._cow.setdefault(id(vm), {})[gpa] = size
        self.counters.entries_touched += 1
        self.counters.fork_cycles += self.costs.ept_edit

    def snapshot(self, vm: VM) -> Snapshot:
        """Freeze the VM's current memory: its frames gain a reference held by the snapshot and
        become copy-on-write for the VM."""
        pages = {}
        for gpa, hpa, size, value in self._leaves(vm):
            self.hv.host.share(hpa, size)
            pages[gpa] = (hpa, size, value & 7)
            self._write_protect(vm, gpa, size)
        vm.invept()
        self.counters.fork_cycles += self.costs.invept
        return Snapshot(vm, pages)

    def restore(self, snapshot: Snapshot) -> None:
        """Put the VM's memory back to the snapshot (which stays valid for later restores)."""
        vm = snapshot.vm
        for gpa, _, _, _ in self._leaves(vm):
            vm.ept.unmap(gpa)
        self._cow[id(vm)] = {}
        for gpa, (hpa, size, _) in snapshot.pages.items():
            vm.ept.map(gpa, size, hpa=hpa, perms="r-x")
            self._cow[id(vm)][gpa] = size
        vm.invept()

    def release(self, snapshot: Snapshot) -> None:
        """Drop the snapshot's references."""
        for hpa, size, _ in snapshot.pages.values():
            self.hv.host.release(hpa, size)
        snapshot.pages.clear()

    def fork(self, vm: VM, n: int) -> list[VM]:
        """``n`` clones of ``vm`` sharing all its frames copy-on-write; each clone gets vCPUs
        with the parent's guest registers (the guest page tables are shared memory too)."""
        leaves = self._leaves(vm)
        for gpa, _, size, _ in leaves:
            self._write_protect(vm, gpa, size)
        clones = []
        for i in range(n):
            clone = self.hv.create_vm(
                f"{vm.name}.{i + 1}",
                vm.memory,
                ept_levels=vm.ept.tables.levels,
                lazy=vm.lazy,
                backing=vm.backing,
            )
            tables_before = len(clone.ept.tables.tables)
            for gpa, hpa, size, value in leaves:
                clone.ept.map(gpa, size, hpa=hpa, perms="r-x" if value & Ept.X else "r--")
                self._cow.setdefault(id(clone), {})[gpa] = size
            new_tables = len(clone.ept.tables.tables) - tables_before
            touched = len(leaves) + new_tables
            self.counters.entries_touched += touched
            self.counters.fork_cycles += touched * self.costs.ept_edit
            for parent_vcpu in vm.vcpus:
                g = parent_vcpu.guest
                clone.add_vcpu(
                    guest=GuestState(
                        cr3=g.cr3, cr0=g.cr0, cr4=g.cr4, efer=g.efer, pkru=g.pkru, rflags=g.rflags
                    )
                )
            clones.append(clone)
        vm.invept()
        self.counters.fork_cycles += self.costs.invept
        return clones

    def destroy(self, vm: VM) -> int:
        """Tear a VM down: release all its mappings and EPT tables. Returns the host frames
        freed (its private copies and tables; shared frames live on in the other VMs)."""
        before = self.hv.host.live_bytes
        vm.ept.destroy()
        self._cow.pop(id(vm), None)
        self.hv.vms.remove(vm)
        return (before - self.hv.host.live_bytes) // PAGE_SIZE

    # -- the write fault --------------------------------------------------------------------------

    def handle(self, exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if not isinstance(record, EptViolation) or not record.qualification & EptQual.WRITE:
            return None
        vm = exit_.vcpu.vm
        cow = self._cow.get(id(vm), {})
        leaf = vm.ept.lookup(record.gpa)
        if leaf is None:
            return None
        base = record.gpa & ~(leaf.page_size - 1)
        if cow.get(base) != leaf.page_size:
            return None
        self.counters.cow_faults += 1
        self.counters.fault_cycles += self.costs.vmexit + self.costs.invept
        if leaf.page_size > PAGE_SIZE and self.granularity == "2m-split":
            vm.ept.split(base)
            del cow[base]
            small = PageSize.at_level(leaf.level - 1)
            for offset in range(0, leaf.page_size, small):
                cow[base + offset] = small
            self.counters.splits += 1
            self.counters.fault_cycles += 512 * self.costs.ept_edit
            leaf = vm.ept.lookup(record.gpa)
            assert leaf is not None
            base = record.gpa & ~(leaf.page_size - 1)
        size = leaf.page_size
        hpa = ept_address(leaf.value, leaf.level, vm.ept.maxphyaddr)
        memory = self.hv.host.memory
        if all(self.hv.host.refs(hpa + o) == 1 for o in range(0, size, PAGE_SIZE)):
            memory.write_u64(leaf.entry_address, leaf.value | Ept.W)  # last owner: no copy
            self.counters.reclaimed += 1
        else:
            new = self.hv.host.alloc(PageSize(size))
            for offset in range(0, size, PAGE_SIZE):
                memory.copy_frame((hpa + offset) >> PAGE_SHIFT, (new + offset) >> PAGE_SHIFT)
            keep = leaf.value & ~((1 << vm.ept.maxphyaddr) - 1 & ~0xFFF)
            memory.write_u64(leaf.entry_address, new | keep | Ept.W)
            self.hv.host.release(hpa, size)
            self.counters.pages_copied += size // PAGE_SIZE
            self.counters.per_vm[vm.name] += size // PAGE_SIZE
            self.counters.fault_cycles += self.costs.copy_cycles(size)
        del cow[base]
        vm.invept()  # INVEPT single-context on the VM's vCPUs: the read-only entry is gone
        return ExitAction.RETRY
