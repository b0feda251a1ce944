"""The prefetch hypercall: a guest announces a guest-physical region before touching it, and the
hypervisor backs and maps it ahead and warms the calling vCPU's GPA->HPA caches, so that the
accesses that follow take fewer EPT violations and shorter walks. The two halves are separate
flags, so that what each buys can be measured on its own.

The hypercall
    ``VMCALL`` with RAX = :data:`PREFETCH_HYPERCALL`, arguments ``(gpa, length, flags)``:
    ``[gpa, gpa + length)`` must be 4 KiB aligned and inside guest memory (else ``-EINVAL``).
    ``flags``: :data:`PREFETCH_2M` backs holes with 2 MiB pages where a whole 2 MiB region of the
    range is unmapped (4 KiB elsewhere); :data:`PREFETCH_NO_WARM` skips the warming ("back
    only"); :data:`PREFETCH_NO_BACK` leaves holes alone and warms only what is already mapped
    ("warm only": meaningful where the pages are backed). The handler returns 0 at once and
    queues the work as steps on the calling vCPU (it runs no guest code until the last step), so
    the prefetch takes time and other vCPUs run between its steps.

The prefetch, batch by batch (``batch`` 4 KiB pages, or one 2 MiB page)
    1. *scan* (takes the EPT lock, :mod:`eptlab.apps.ept_lock`): read each entry of the batch; a
       hole gets a frame (from the :class:`~eptlab.apps.ept_lock.FramePool`, zeroed) and the
       leaf value to install (not with :data:`PREFETCH_NO_BACK`); a present leaf is read to be
       rewritten with the software bit :data:`PREFETCHED` (bit 52: ignored by the processor,
       SDM Vol. 3C Table 29-6) -- a read-modify-write of the entry.
    2. *commit*: store every planned entry value, release the lock. Time passes between scan and
       commit (the scheduler runs a quantum of every other vCPU), as while a real handler zeroes
       frames; the lock is what keeps another EPT editor (:mod:`eptlab.apps.ept_editor`) out of
       that window. No INVEPT is needed: entries only go from not present to present, or change
       an ignored bit.
    3. *warm*: a read through the guest kernel's direct map on the calling vCPU, for the first
       page of every 2 MiB region of the range (and every 2 MiB page) and for the first
       ``warm_pages`` pages (64: what the nested TLB holds), of the pages the batch covered. Its
       two-dimensional walk fills that vCPU's EPT paging-structure caches for the region -- a
       later walk of any GPA in it reads only the last EPT entry -- and its nested TLB
       (GPA->HPA) for the page: GPA-side caches that the guest's own accesses hit whatever their
       guest-virtual address. It also leaves direct-map entries in the TLBs and lines in the
       data caches. Its cost is the engine cycles of those reads (plus any exit they take),
       charged to the prefetch, not to the guest's accesses. Without a guest kernel (no direct
       map) nothing is warmed.

Costs: the VMCALL exit, each page backed (:meth:`~eptlab.apps.cycle_meter.Costs.back`), each
entry stored and the warming reads are ``prefetch_cycles`` of the calling vCPU.

Modelling limits: the commit stores whole entries, which would also overwrite EPT accessed/dirty
flags the processor set since the scan; the scenarios run without EPT A/D. Pages are backed one
after another (a handler reading swapped-out pages would issue the reads together).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np

from ..arch.access import Access
from ..arch.bits import PAGE_SIZE, PageSize
from ..arch.ept import ept_is_leaf, ept_is_present
from ..errors import ConfigError, MappingError
from ..guest import GuestKernel
from ..guest.layout import DIRECT_MAP_BASE
from ..hv import VCPU, VM, Exit, ExitAction, GuestAction, Hypervisor
from ..hv.program import Segment
from ..mmu.engine import Accesses
from .cycle_meter import Costs, CycleMeter
from .ept_editor import BALLOON_HYPERCALL, EINVAL, PREFETCHED, EptEditor, ProtocolName
from .observed import labelled

PREFETCH_HYPERCALL = 0x5046  # "PF"
PREFETCH_2M = 1 << 0
PREFETCH_NO_WARM = 1 << 1
PREFETCH_NO_BACK = 1 << 2
_2M = PageSize.SIZE_2M.value
_4K = PageSize.SIZE_4K


class PrefetchApp(EptEditor):
    """The prefetch hypercall, on top of the VM's EPT editors (:class:`EptEditor`: lazy backing,
    copy-on-write breaks, migration, balloon, merging) under one protocol.

    One per hypervisor (hypercall numbers are global)::

        hv = Hypervisor()
        engine = ObservedEngine.install(hv)       # optional: to check or to meter accesses
        vm = hv.create_vm("guest", 64 << 20)      # lazily backed
        app = PrefetchApp(hv, vm)                 # registers the hypercalls and the handler
        engine.observers.append(checker := StaleUseChecker(hv, holders=[app.pool]))
        ...                                       # vCPUs, a guest, programs with
        vcpu.load([Hypercall(PREFETCH_HYPERCALL, (gpa, length, 0)), Run(chunk)])
        hv.run()
        assert checker.stale_uses == 0

    :func:`eptlab.apps.prefetch_scenario.play` does all of it for a scenario.
    """

    def __init__(
        self,
        hv: Hypervisor,
        vm: VM,
        *,
        protocol: ProtocolName = "correct",
        batch: int = 16,
        warm_pages: int = 64,
        costs: Costs | None = None,
        pool_capacity: int = 64,
        meter: CycleMeter | None = None,
        number: int = PREFETCH_HYPERCALL,
        balloon_number: int = BALLOON_HYPERCALL,
    ) -> None:
        if batch < 1:
            raise ConfigError("batch", f"{batch} is not a positive number of pages")
        super().__init__(
            hv,
            vm,
            protocol=protocol,
            costs=costs,
            pool_capacity=pool_capacity,
            meter=meter,
            balloon_number=balloon_number,
        )
        self.batch, self.warm_pages = batch, warm_pages
        self.prefetch_cycles: Counter[int] = Counter()  # by vCPU engine id
        self.warm_translation_cycles: Counter[int] = Counter()
        self.warm_accesses: Counter[int] = Counter()
        self.warm_nested_tlb_hits = 0  # of the warming reads (not the guest's)
        self.warm_ept_psc_hits = 0
        self.prefetches: list[Prefetch] = []
        self._busy: dict[int, Prefetch] = {}  # engine id -> prefetch in progress
        hv.hypercall(number, "prefetch")(self._prefetch_hypercall)

    def absorb(self, vcpu: VCPU, cycles: int) -> bool:
        """Work done while the vCPU is inside a prefetch is the prefetch's cost."""
        if vcpu.engine_id not in self._busy:
            return False
        self.prefetch_cycles[vcpu.engine_id] += cycles
        return True

    def busy(self, vcpu: VCPU) -> bool:
        """Whether ``vcpu`` is inside a prefetch."""
        return vcpu.engine_id in self._busy

    # -- the hypercall ------------------------------------------------------------------------

    def _prefetch_hypercall(self, vcpu: VCPU, args: tuple[int, ...]) -> int:
        gpa, length, flags = (tuple(args) + (0, 0, 0))[:3]
        if vcpu.vm is not self.vm or vcpu.engine_id in self._busy:
            return -EINVAL
        if length <= 0 or gpa % PAGE_SIZE or length % PAGE_SIZE or gpa + length > self.vm.memory:
            self.counters["prefetch_rejected"] += 1
            return -EINVAL
        prefetch = Prefetch(
            self,
            vcpu,
            gpa,
            length,
            PageSize.SIZE_2M if flags & PREFETCH_2M else _4K,
            warm=not flags & PREFETCH_NO_WARM,
            back=not flags & PREFETCH_NO_BACK,
        )
        self.prefetches.append(prefetch)
        self._busy[vcpu.engine_id] = prefetch
        self.counters["prefetches"] += 1
        self.prefetch_cycles[vcpu.engine_id] += self.costs.exit_cycles
        vcpu.program = itertools.chain(prefetch.segments(), vcpu.program)
        return 0

    def _done(self, prefetch: Prefetch) -> None:
        self._busy.pop(prefetch.vcpu.engine_id, None)

    def warm_address(self, vcpu: VCPU, gpa: int) -> int | None:
        """A guest-virtual address the vCPU can read ``gpa`` through (the guest kernel's direct
        map, as a signed 64-bit value), or None if there is none."""
        if not isinstance(vcpu.guest_os, GuestKernel):
            return None
        return DIRECT_MAP_BASE - (1 << 64) + gpa

class Prefetch:
    """One prefetch hypercall in progress: steps (scan, commit, warm per batch) that run as
    :class:`~eptlab.hv.GuestAction` segments on the calling vCPU."""

    def __init__(
        self,
        app: PrefetchApp,
        vcpu: VCPU,
        gpa: int,
        length: int,
        size: PageSize,
        *,
        warm: bool = True,
        back: bool = True,
    ) -> None:
        self.app, self.vcpu, self.gpa, self.length, self.size = app, vcpu, gpa, length, size
        self.warm, self.back = warm, back
        self.name = f"prefetch@{vcpu.name}"
        self.batches = self._batches()
        phases = ("scan", "commit", "warm") if warm else ("scan", "commit")
        self.steps = [(p, b) for b in range(len(self.batches)) for p in phases]
        self.next_step = 0
        self._plan: list[tuple[int, int]] = []  # (entry address, value) to store at commit
        self._touched: list[int] = []  # GPAs of the pages (or 2 MiB pages) of the batch
        self.pages_backed = 0
        self.entries_rewritten = 0
        self._new_frames = 0

    def _batches(self) -> list[list[tuple[int, PageSize]]]:
        units: list[tuple[int, PageSize]] = []
        end = self.gpa + self.length
        address = self.gpa
        while address < end:
            base = address & ~(_2M - 1)
            if self.size == PageSize.SIZE_2M and base == address and base + _2M <= end:
                units.append((base, PageSize.SIZE_2M))
                address += _2M
            else:
                units.append((address, _4K))
                address += PAGE_SIZE
        batches: list[list[tuple[int, PageSize]]] = []
        for unit in units:
            if unit[1] != _4K or not batches or len(batches[-1]) >= self.app.batch:
                batches.append([])
            if batches[-1] and batches[-1][0][1] != _4K:
                batches.append([])
            batches[-1].append(unit)
        return batches

    def segments(self) -> Iterator[Segment]:
        for k, (phase, b) in enumerate(self.steps):
            yield GuestAction(self._action(k), label=f"prefetch-{phase}-{b}")

    def _action(self, k: int) -> Callable[[VCPU], None]:
        def step(_vcpu: VCPU) -> None:
            self.advance_to(k)

        return step

    @property
    def done(self) -> bool:
        return self.next_step >= len(self.steps)

    def advance_to(self, k: int) -> None:
        """Run the steps up to ``k`` that have not run yet (a lock waiter may have run some)."""
        while self.next_step <= k:
            phase, b = self.steps[self.next_step]
            self.next_step += 1
            getattr(self, f"_{phase}")(b)
        if self.done:
            self.app._done(self)

    def finish_critical_section(self) -> None:
        while self.app.lock.holder is self:
            self.advance_to(self.next_step)

    # -- the steps ------------------------------------------------------------------------------

    def _scan(self, b: int) -> None:
        app = self.app
        app.lock.acquire(self)
        tables, costs = app.vm.ept.tables, app.costs
        self._plan, self._touched, self._new_frames = [], [], 0
        for gpa, size in self.batches[b]:
            if size == PageSize.SIZE_2M:
                try:
                    slot = tables.entry_address(gpa, 2, create=True)
                except MappingError:
                    continue  # inside a 1 GiB page: already mapped
                value = app._read(slot)
                if not ept_is_present(value):
                    if not self.back:
                        continue
                    hpa = app.hv.host.alloc(size)
                    self._plan.append((slot, app.leaf_value(hpa, size)))
                    self._touched.append(gpa)
                    self.pages_backed += 1
                    self._new_frames += 1
                    app.prefetch_cycles[self.vcpu.engine_id] += costs.back(size)
                    continue
                if ept_is_leaf(value, 2):
                    self._plan.append((slot, value | PREFETCHED))
                    self._touched.append(gpa)
                    self.entries_rewritten += 1
                    continue
                for page in range(gpa, gpa + _2M, PAGE_SIZE):  # a 4 KiB table: page by page
                    self._scan_4k(page)
            else:
                self._scan_4k(gpa)

    def _scan_4k(self, gpa: int) -> None:
        app = self.app
        try:
            slot = app.vm.ept.tables.entry_address(gpa, 1, create=True)
        except MappingError:
            return  # inside a large page: already mapped
        value = app._read(slot)
        if ept_is_present(value):
            self._plan.append((slot, value | PREFETCHED))
            self.entries_rewritten += 1
        elif not self.back:
            return  # warm only: a hole stays a hole (and is not warmed)
        else:
            hpa = app.pool.alloc()
            self._plan.append((slot, app.leaf_value(hpa, _4K)))
            self.pages_backed += 1
            self._new_frames += 1
            app.prefetch_cycles[self.vcpu.engine_id] += app.costs.back(PAGE_SIZE)
        self._touched.append(gpa)

    def _commit(self, b: int) -> None:
        app = self.app
        for slot, value in self._plan:  # blind stores: the lock made the scan's view current
            app._write(slot, value)
        app.prefetch_cycles[self.vcpu.engine_id] += len(self._plan) * app.costs.entry_cycles
        app.vm.counters["pages_backed"] += self._new_frames
        app.counters["prefetch_entries"] += len(self._plan)
        app.lock.release(self)

    def _worth_warming(self, gpa: int) -> bool:
        """The first page of each 2 MiB region of the range (its EPT paging-structure-cache
        entries serve every page of the region) and the first ``warm_pages`` pages (what the
        nested TLB can hold of the pages the guest touches first)."""
        first_in_region = gpa % _2M == 0 or gpa == self.gpa
        return first_in_region or gpa < self.gpa + self.app.warm_pages * PAGE_SIZE

    def _warm(self, b: int) -> None:
        app, vcpu = self.app, self.vcpu
        chosen = [g for g in self._touched if self._worth_warming(g)]
        addresses = [app.warm_address(vcpu, gpa) for gpa in chosen]
        gvas = [a for a in addresses if a is not None]
        if len(gvas) < len(addresses):
            app.counters["warm_skipped"] += len(addresses) - len(gvas)  # no direct map
        if not gvas:
            return
        engine = app.hv.engine
        vid = vcpu.engine_id
        accesses = Accesses.build(np.array(gvas, np.int64), Access.READ, 0, vid)
        before = engine.stats(vid)
        pos = 0
        with labelled(engine, "warm"):
            while pos < len(accesses):
                result = engine.run(accesses, pos)
                pos = result.stopped_at
                if result.fault is not None:
                    os_ = vcpu.guest_os
                    if os_ is None or not os_.handle_fault(vcpu, result.fault):
                        pos += 1
                        app.counters["warm_unresolved"] += 1
                elif result.exit is not None:
                    app.prefetch_cycles[vid] += app.costs.exit_cycles
                    app.hv.handle(Exit(vcpu, result.exit), expect=ExitAction.RETRY)
        after = engine.stats(vid)
        app.prefetch_cycles[vid] += after.cycles - before.cycles
        app.warm_translation_cycles[vid] += after.translation_cycles - before.translation_cycles
        app.warm_accesses[vid] += after.accesses - before.accesses
        app.warm_nested_tlb_hits += after.nested_tlb_hits - before.nested_tlb_hits
        app.warm_ept_psc_hits += after.ept_psc_hits - before.ept_psc_hits
        app.counters["warmed"] += len(gvas)


__all__ = [
    "PREFETCH_2M",
    "PREFETCH_HYPERCALL",
    "PREFETCH_NO_BACK",
    "PREFETCH_NO_WARM",
    "Prefetch",
    "PrefetchApp",
]
