"""Copy-on-write VM snapshots, VM fork (eager or lazy) and snapshot reset through EPT entries.

A snapshot or a fork maps the same host frames in several EPTs with write permission removed.
The first write by any VM to such a page is an EPT violation; :meth:`CopyOnWrite.handle` copies
that page into a private frame, maps it writable in the faulting VM's EPT, invalidates (INVEPT
single-context on the VM's vCPUs) and the guest resumes. Host frames are reference-counted
(:class:`~eptlab.hv.host.HostMemory`): the last owner of a page takes it back without copying;
destroying a clone releases its references, which frees only its private frames.

Two ways to fork:

eager (``fork(vm, n)``)
    Every EPT leaf of the parent is write-protected and copied into each clone's EPT up front.
lazy (``fork(vm, n, lazy=True)``, Xen's ``mem_sharing`` fork as DRAKVUF and KF/x use it)
    The clone starts with an empty EPT. Its first access to a page is an EPT violation that fills
    the entry from the parent: a read shares the parent's frame read-only (the parent's entry
    loses write permission too), a write copies the page into a private frame. Filling a
    not-present entry needs no INVEPT (SDM Vol. 3C §29.4.3.3: a not-present EPT entry is never
    cached); taking write permission from the parent does, before the parent runs again.

After either fork the parent is *paused* (Xen's rule for forks): its frames are the clones'
source. :meth:`CopyOnWrite.resume` lets it run on: every one of its frames gains a reference
held by a snapshot (the clones' source from then on) and loses write permission, so the
parent's first writes fault and copy.

Snapshot reset (kAFL/Nyx, KF/x): :meth:`CopyOnWrite.reset` copies the fork-time contents back
into the pages a clone dirtied (its private frames stay mapped), found by PML
(:class:`~eptlab.hv.dirty_log.PmlLog`) or by write protection (the policy's own write faults:
``reset(..., rearm=True)`` write-protects the restored pages again and runs INVEPT).

With 2 MiB EPT mappings, a first write either copies the whole 2 MiB (``granularity="2m-copy"``)
or splits the mapping into 4 KiB pages and copies one of them (``"2m-split"``).

Cost model (cycles, from the cost profile active when the policy is made, see
:mod:`eptlab.hv.costs`): touching an EPT entry costs ``ept_edit_cycles``, an INVEPT
``invept_cycles``, a VM exit round trip ``vmexit_cycles``, copying ``copy_bytes_per_cycle``
bytes per cycle, a fresh frame (copy or EPT table) ``frame_alloc_cycles``, creating a clone's VM
and vCPU state ``vm_create_cycles``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..arch.ept import Ept, ept_address
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..costs import active_profile
from ..errors import ConfigError
from ..hv import VM, Exit, ExitAction, Hypervisor
from ..hv.costs import hv_costs
from ..mmu.context import GuestState

GRANULARITIES = ("4k", "2m-copy", "2m-split")
_SIZES = (PageSize.SIZE_4K, PageSize.SIZE_2M, PageSize.SIZE_1G)


def _perms(bits: int) -> str:
    """EPT permission bits 2:0 as ``"rwx"`` with ``-`` for a clear bit."""
    return "".join(c if bits >> i & 1 else "-" for i, c in enumerate("rwx"))


def copy_cycles(size: int) -> int:
    """Cycles to copy ``size`` bytes at the active profile's bandwidth."""
    return hv_costs().copy_cycles(size)


def vm_create_cycles() -> int:
    """Cycles to create one clone's VM and vCPU state (the active profile's price)."""
    return active_profile().cycles("vm_create_cycles")


@dataclass
class Snapshot:
    """The frames a VM had when the snapshot was taken: gpa -> (hpa, page size, permissions)."""

    vm: VM
    pages: dict[int, tuple[int, PageSize, int]]

    def frame(self, gpa: int) -> tuple[int, int, PageSize, int] | None:
        """``(page base, hpa, size, permissions)`` of the snapshot page holding ``gpa``."""
        for size in _SIZES:
            base = gpa & ~(size - 1)
            page = self.pages.get(base)
            if page is not None and page[1] == size:
                return base, page[0], page[1], page[2]
        return None


@dataclass
class CowCounters:
    """What the policy did, and its modelled cycles."""

    cow_faults: int = 0  # writes to a shared read-only page
    pages_copied: int = 0  # 4 KiB pages of data copied
    reclaimed: int = 0  # writes by the last owner: made writable without copying
    splits: int = 0
    entries_touched: int = 0
    fork_cycles: int = 0
    fault_cycles: int = 0
    fills: int = 0  # lazy-fork first accesses filled from the source (one exit each)
    pages_shared: int = 0  # 4 KiB pages a lazy fill shared read-only
    wp_faults: int = 0  # writes to pages write-protected again by a reset (dirty tracking)
    resume_cycles: int = 0  # write-protecting a paused parent's memory when it resumes
    reset_cycles: int = 0
    pages_restored: int = 0
    destroy_cycles: int = 0
    per_vm: Counter[str] = field(default_factory=Counter)  # pages copied, by VM
    exits_by_vm: Counter[str] = field(default_factory=Counter)  # exits this policy took
    cycles_by_vm: Counter[str] = field(default_factory=Counter)  # fault cycles, by VM


@dataclass
class _Source:
    """Where a clone's pages come from: the paused parent, or the snapshot taken at resume."""

    parent: VM
    snapshot: Snapshot | None = None

    def frame(self, gpa: int) -> tuple[int, int, PageSize, int, bool] | None:
        """``(base, hpa, size, permissions, from_parent)`` of the source page of ``gpa``."""
        if self.snapshot is not None:
            found = self.snapshot.frame(gpa)
            return None if found is None else (*found, False)
        leaf = self.parent.ept.lookup(gpa)
        if leaf is None:
            return None
        size = leaf.page_size
        hpa = ept_address(leaf.value, leaf.level, self.parent.ept.maxphyaddr)
        return gpa & ~(size - 1), hpa, size, leaf.value & 7, True


class CopyOnWrite:
    """The copy-on-write policy of one hypervisor: snapshots, eager and lazy forks, resets."""

    def __init__(self, hv: Hypervisor, granularity: str = "4k") -> None:
        if granularity not in GRANULARITIES:
            raise ConfigError("granularity", f"{granularity!r} is not one of {GRANULARITIES}")
        self.hv, self.granularity = hv, granularity
        self.counters = CowCounters()
        self.costs = hv_costs()
        self.vm_create = vm_create_cycles()
        self._cow: dict[int, dict[int, PageSize]] = {}  # id(vm) -> page base -> size
        self._source: dict[int, _Source] = {}  # id(clone) -> its pages' source
        self._paused: dict[int, list[VM]] = {}  # id(parent) -> its live clones
        self._armed: dict[int, set[int]] = {}  # id(vm) -> pages write-protected by a reset
        self._dirty: dict[int, set[int]] = {}  # id(vm) -> 4 KiB pages written (write faults)
        self._forks: Counter[int] = Counter()  # id(parent) -> clones made (unique names)
        hv.on(ExitReason.EPT_VIOLATION, self.handle)

    # -- sharing ------------------------------------------------------------------------------

    def _leaves(self, vm: VM) -> list[tuple[int, int, PageSize, int, int]]:
        """(gpa, hpa, size, value, entry address) of every leaf of the VM's EPT."""
        out = []
        for gpa, leaf in vm.ept.leaves(0, vm.memory):
            hpa = ept_address(leaf.value, leaf.level, vm.ept.maxphyaddr)
            out.append((gpa, hpa, leaf.page_size, leaf.value, leaf.entry_address))
        return out

    def _write_protect(self, vm: VM, gpa: int, size: PageSize,
                       leaf: tuple[int, int] | None = None) -> int:
        """Take write permission from the leaf (``leaf``: its value and entry address when the
        caller has them); returns the cycles (0 when it had none)."""
        if leaf is None:
            found = vm.ept.lookup(gpa)
            assert found is not None
            leaf = found.value, found.entry_address
        value, slot = leaf
        self._cow.setdefault(id(vm), {})[gpa] = size
        if not value & Ept.W:
            return 0
        vm.hv.host.memory.write_u64(slot, value & ~int(Ept.W))
        self.counters.entries_touched += 1
        return self.costs.ept_edit

    def snapshot(self, vm: VM) -> Snapshot:
        """Freeze the VM's current memory: its frames gain a reference held by the snapshot and
        become copy-on-write for the VM."""
        snap, cycles = self._snapshot(vm)
        self.counters.fork_cycles += cycles
        return snap

    def _snapshot(self, vm: VM) -> tuple[Snapshot, int]:
        pages = {}
        cycles = 0
        for gpa, hpa, size, value, slot in self._leaves(vm):
            self.hv.host.share(hpa, size)
            pages[gpa] = (hpa, size, value & 7)
            cycles += self._write_protect(vm, gpa, size, (value, slot))
        if cycles:
            vm.invept()
            cycles += self.costs.invept
        return Snapshot(vm, pages), cycles

    def restore(self, snapshot: Snapshot) -> None:
        """Put the VM's memory back to the snapshot (which stays valid for later restores)."""
        vm = snapshot.vm
        for gpa, _, _, _, _ in self._leaves(vm):
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

    # -- fork -----------------------------------------------------------------------------------

    def fork(self, vm: VM, n: int, *, lazy: bool = False, pml: bool = False) -> list[VM]:
        """``n`` clones of ``vm``; each clone gets vCPUs with the parent's guest registers (the
        guest page tables are shared memory too). Eager: every leaf is write-protected in the
        parent and mapped read-only in each clone now. Lazy: each clone starts with an empty EPT
        and fills it on first access. ``pml``: the clones log their writes (PML, EPT A/D on).
        The parent is paused until :meth:`resume` (or until its clones are destroyed)."""
        leaves = [] if lazy else self._leaves(vm)
        cycles = 0
        for gpa, _, size, value, slot in leaves:
            cycles += self._write_protect(vm, gpa, size, (value, slot))
        clones = []
        for _ in range(n):
            self._forks[id(vm)] += 1
            clone = self.hv.create_vm(
                f"{vm.name}.{self._forks[id(vm)]}",
                vm.memory,
                ept_levels=vm.ept.tables.levels,
                lazy=vm.lazy,
                backing=vm.backing,
                pml=pml,
            )
            tables_before = len(clone.ept.tables.tables)
            shared = self._cow.setdefault(id(clone), {})
            for gpa, hpa, size, value, _ in leaves:  # EptManager.map(hpa=..., perms=r-x/r--)
                self.hv.host.share(hpa, size)
                clone.ept.tables.map(gpa, hpa, size, write=False, execute=bool(value & Ept.X))
                shared[gpa] = size
            tables = len(clone.ept.tables.tables)  # the root and what the leaves needed
            new_tables = tables - tables_before
            touched = len(leaves) + new_tables
            self.counters.entries_touched += touched
            cycles += (self.vm_create + touched * self.costs.ept_edit
                       + tables * self.costs.frame_alloc)
            for parent_vcpu in vm.vcpus:
                g = parent_vcpu.guest
                clone.add_vcpu(
                    guest=GuestState(
                        cr3=g.cr3, cr0=g.cr0, cr4=g.cr4, efer=g.efer, pkru=g.pkru, rflags=g.rflags
                    )
                )
            self._source[id(clone)] = _Source(vm)
            self._paused.setdefault(id(vm), []).append(clone)
            clones.append(clone)
        if leaves:
            vm.invept()
            cycles += self.costs.invept
        self.counters.fork_cycles += cycles
        return clones

    def paused(self, vm: VM) -> bool:
        """True while ``vm`` is the paused source of live clones."""
        return bool(self._paused.get(id(vm)))

    def resume(self, vm: VM) -> int:
        """Let a paused parent run on while its clones live: a snapshot keeps every frame as it
        was at the fork (the clones' source from now on) and the parent loses write permission
        on each leaf that still had it (then INVEPT). Returns the cycles (also in
        ``counters.resume_cycles``); 0 when the parent was not paused."""
        clones = self._paused.pop(id(vm), [])
        if not clones:
            return 0
        snap, cycles = self._snapshot(vm)
        if not cycles:  # eager fork: no edit now, but the parent's stale entries are flushed
            vm.invept()
            cycles = self.costs.invept
        for clone in clones:
            self._source[id(clone)].snapshot = snap
        self.counters.resume_cycles += cycles
        return cycles

    def destroy(self, vm: VM) -> int:
        """Tear a VM down: release all its mappings and EPT tables. Returns the host frames
        freed (its private copies and tables; shared frames live on in the other VMs)."""
        before = self.hv.host.live_bytes
        self.counters.destroy_cycles += (
            sum(1 for _ in vm.ept.leaves(0, vm.memory)) + len(vm.ept.tables.tables)
        ) * self.costs.ept_edit
        vm.ept.destroy()
        for table in (self._cow, self._armed, self._dirty):
            table.pop(id(vm), None)
        source = self._source.pop(id(vm), None)
        if source is not None:
            clones = self._paused.get(id(source.parent), [])
            if vm in clones:
                clones.remove(vm)
                if not clones:  # the parent may run: lazy fills took write permission from it
                    del self._paused[id(source.parent)]
                    source.parent.invept()
                    self.counters.destroy_cycles += self.costs.invept
        self.hv.vms.remove(vm)
        return (before - self.hv.host.live_bytes) // PAGE_SIZE

    # -- snapshot reset -------------------------------------------------------------------------

    def source_frame(self, clone: VM, gpa: int) -> int | None:
        """The host address holding ``gpa``'s fork-time contents for ``clone`` (None when the
        clone's source does not map it)."""
        source = self._source.get(id(clone))
        found = None if source is None else source.frame(gpa)
        if found is None:
            return None
        base, hpa, _, _, _ = found
        return hpa + (gpa & ~(PAGE_SIZE - 1)) - base

    def written(self, vm: VM) -> set[int]:
        """The 4 KiB pages whose writes faulted (copy-on-write, lazy write fills, and writes to
        pages a reset write-protected) since the last call: dirty tracking by write protection."""
        pages = self._dirty.get(id(vm), set())
        self._dirty[id(vm)] = set()
        return pages

    def reset(self, clone: VM, pages: Iterable[int], *, rearm: bool = False) -> int:
        """Reset ``clone`` to its fork-time contents on ``pages`` (the dirty set, 4 KiB GPAs):
        each page's snapshot contents are copied into the clone's private frame, which stays
        mapped. With ``rearm`` (dirty tracking by write protection), the restored pages lose
        write permission again and INVEPT flushes the clone's translations; PML tracking
        re-arms itself (:meth:`PmlLog.collect`). Returns the pages restored (pages still
        shared with the source hold its contents and are skipped)."""
        if id(clone) not in self._source:
            raise ConfigError("reset", f"{clone.name} is not a clone of this policy")
        memory = self.hv.host.memory
        restored = cycles = 0
        armed = self._armed.setdefault(id(clone), set())
        for page in sorted({p & ~(PAGE_SIZE - 1) for p in pages}):
            leaf = clone.ept.lookup(page)
            if leaf is None:
                continue  # never filled: the source holds its contents
            if leaf.level != 1:
                raise ConfigError("reset", f"GPA {page:#x}: reset needs 4 KiB EPT mappings")
            source = self.source_frame(clone, page)
            hpa = ept_address(leaf.value, leaf.level, clone.ept.maxphyaddr)
            if source is None or source == hpa:
                continue
            memory.copy_frame(source >> PAGE_SHIFT, hpa >> PAGE_SHIFT)
            restored += 1
            cycles += self.costs.copy_cycles(PAGE_SIZE)
            if rearm and leaf.value & Ept.W:
                memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.W))
                armed.add(page)
                cycles += self.costs.ept_edit
        if rearm and restored:
            clone.invept()  # permissions shrank: cached translations must go
            cycles += self.costs.invept
        self.counters.pages_restored += restored
        self.counters.reset_cycles += cycles
        return restored

    # -- the write fault --------------------------------------------------------------------------

    def _charge(self, vm: VM, cycles: int) -> None:
        self.counters.fault_cycles += cycles
        self.counters.cycles_by_vm[vm.name] += cycles
        self.counters.exits_by_vm[vm.name] += 1

    def handle(self, exit_: Exit) -> ExitAction | None:
        """EPT-violation handler: lazy fills, writes to write-protected reset pages, and
        copy-on-write breaks, after which the guest retries the access; None for exits that
        are not this policy's."""
        return ExitAction.RETRY if self._handle(exit_) else None

    def _handle(self, exit_: Exit) -> bool:
        record = exit_.record
        if not isinstance(record, EptViolation):
            return False
        vm = exit_.vcpu.vm
        write = bool(record.qualification & EptQual.WRITE)
        leaf = vm.ept.lookup(record.gpa)
        if leaf is None:
            return self._fill(vm, record.gpa, write)
        if not write:
            return False
        page = record.gpa & ~(PAGE_SIZE - 1)
        armed = self._armed.get(id(vm))
        if armed is not None and page in armed:
            self.hv.host.memory.write_u64(leaf.entry_address, leaf.value | Ept.W)
            armed.discard(page)  # permissions only grew: no INVEPT
            self._dirty.setdefault(id(vm), set()).add(page)
            self.counters.wp_faults += 1
            self._charge(vm, self.costs.vmexit + self.costs.ept_edit)
            return True
        cycles = self._break(vm, record.gpa)
        if cycles is None:
            return False
        self.counters.cow_faults += 1
        self._charge(vm, self.costs.vmexit + cycles)
        return True

    def _break(self, vm: VM, gpa: int) -> int | None:
        """Give ``vm`` a writable page at ``gpa`` (copy, or reclaim as the last owner); the
        cycles besides the exit, or None when the page is not copy-on-write in ``vm``."""
        cow = self._cow.get(id(vm), {})
        leaf = vm.ept.lookup(gpa)
        if leaf is None:
            return None
        base = gpa & ~(leaf.page_size - 1)
        if cow.get(base) != leaf.page_size:
            return None
        cycles = self.costs.invept
        if leaf.page_size > PAGE_SIZE and self.granularity == "2m-split":
            vm.ept.split(base)
            del cow[base]
            small = PageSize.at_level(leaf.level - 1)
            for offset in range(0, leaf.page_size, small):
                cow[base + offset] = small
            self.counters.splits += 1
            cycles += 512 * self.costs.ept_edit + self.costs.frame_alloc
            leaf = vm.ept.lookup(gpa)
            assert leaf is not None
            base = gpa & ~(leaf.page_size - 1)
        size = leaf.page_size
        hpa = ept_address(leaf.value, leaf.level, vm.ept.maxphyaddr)
        memory = self.hv.host.memory
        if all(self.hv.host.refs(hpa + o) == 1 for o in range(0, size, PAGE_SIZE)):
            memory.write_u64(leaf.entry_address, leaf.value | Ept.W)  # last owner: no copy
            self.counters.reclaimed += 1
            cycles += self.costs.ept_edit
        else:
            new = self.hv.host.alloc(PageSize(size))
            for offset in range(0, size, PAGE_SIZE):
                memory.copy_frame((hpa + offset) >> PAGE_SHIFT, (new + offset) >> PAGE_SHIFT)
            keep = leaf.value & ~((1 << vm.ept.maxphyaddr) - 1 & ~0xFFF)
            memory.write_u64(leaf.entry_address, new | keep | Ept.W)
            self.hv.host.release(hpa, size)
            self._copied(vm, size)
            cycles += self.costs.ept_edit + self.costs.frame_alloc + self.costs.copy_cycles(size)
        del cow[base]
        self._dirty.setdefault(id(vm), set()).add(gpa & ~(PAGE_SIZE - 1))
        vm.invept()  # INVEPT single-context on the VM's vCPUs: the read-only entry is gone
        return cycles

    def _copied(self, vm: VM, size: int) -> None:
        self.counters.pages_copied += size // PAGE_SIZE
        self.counters.per_vm[vm.name] += size // PAGE_SIZE

    def _fill(self, vm: VM, gpa: int, write: bool) -> bool:
        """A lazy clone's first access to ``gpa``: share the source's frame read-only (a read)
        or copy it into a private frame (a write). False when ``vm`` is not a lazy clone or its
        source does not map ``gpa`` (the clone's own lazy backing may then take it)."""
        source = self._source.get(id(vm))
        if source is None or not 0 <= gpa < vm.memory:
            return False
        found = source.frame(gpa)
        if found is None:
            return False
        base, hpa, size, perms, from_parent = found
        tables = len(vm.ept.tables.tables)
        cycles = self.costs.vmexit + self.costs.ept_edit
        split_later = write and size > PAGE_SIZE and self.granularity == "2m-split"
        if write and not split_later:  # copy (SDM §29.4.3.3: not present before, no INVEPT)
            new = vm.ept.map(base, size, perms=_perms(perms | int(Ept.W)))
            memory = self.hv.host.memory
            for offset in range(0, size, PAGE_SIZE):
                memory.copy_frame((hpa + offset) >> PAGE_SHIFT, (new + offset) >> PAGE_SHIFT)
            self._copied(vm, size)
            self._dirty.setdefault(id(vm), set()).add(gpa & ~(PAGE_SIZE - 1))
            cycles += self.costs.frame_alloc + self.costs.copy_cycles(size)
        else:  # share read-only; the parent's entry loses write permission too
            vm.ept.map(base, size, hpa=hpa, perms=_perms(perms & ~int(Ept.W)))
            self._cow.setdefault(id(vm), {})[base] = size
            self.counters.pages_shared += size // PAGE_SIZE
            if from_parent:
                cycles += self._write_protect(source.parent, base, size)
        new_tables = len(vm.ept.tables.tables) - tables
        cycles += new_tables * (self.costs.ept_edit + self.costs.frame_alloc)
        self.counters.entries_touched += 1 + new_tables
        self.counters.fills += 1
        if split_later:
            extra = self._break(vm, gpa)
            assert extra is not None
            self.counters.cow_faults += 1
            cycles += extra
        self._charge(vm, cycles)
        return True
