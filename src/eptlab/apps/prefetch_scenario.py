"""One configuration of the prefetch application, run end to end: a lazily backed VM, a guest
kernel, a buffer the guest has mapped, vCPUs running a seeded workload over it with or without
the prefetch hint (back ahead, warm, both) or with asynchronous page faults, remaps landing
meanwhile, the stale-use checker and the cycle meter on every access.

Per-access cycles (:class:`~eptlab.apps.cycle_meter.CycleMeter`): the engine's translation and
data cycles of the access (accesses run one at a time), plus what it caused -- the failed
attempt, the exit and the handler's work (backing, copy, shootdown) are added to the access that
exited; an IPI is added to the next access of the vCPU it interrupted; a remap placed in a vCPU's
program is charged to that vCPU; with guest tasks, task switches and idle time (every task
waiting) go to the access that follows. The engine charges no cycles for a walk that ends in an
exit (its references do fill the caches); the meter costs it from the engine's statistics.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SIZE
from ..hv import VCPU, GuestAction, Hypercall, Hypervisor, Run
from ..hv.program import Segment
from ..mmu.config import CacheConfig, MmuConfig
from ..traces.model import TraceChunk
from .async_pf import AsyncCosts, AsyncPageFaults, GuestTasks
from .cycle_meter import Costs, CycleMeter
from .ept_editor import BALLOON_HYPERCALL, ProtocolName
from .observed import ObservedEngine, Observer
from .prefetch import (
    PREFETCH_2M,
    PREFETCH_HYPERCALL,
    PREFETCH_NO_BACK,
    PREFETCH_NO_WARM,
    PrefetchApp,
)
from .scenario import Buffer, boot_guest, cut, populate, region_run
from .stale_use import StaleUse, StaleUseChecker

I64 = npt.NDArray[np.int64]
_2M = 2 << 20


@dataclass(frozen=True)
class RemapOp:
    """A remap placed in vCPU ``vcpu``'s program after ``after`` of its accesses, on page
    ``page`` of the region (``other``: the duplicate page of a merge)."""

    vcpu: int
    after: int
    kind: Literal["migrate", "balloon", "merge"]
    page: int
    other: int = 0


@dataclass(frozen=True)
class Scenario:
    """A lazily backed VM, a guest kernel, a buffer of ``pages`` 4 KiB pages that the guest has
    mapped (GVA -> contiguous GPAs), ``vcpus`` vCPUs running a seeded workload over it
    (``shared``: every vCPU over the whole buffer, and vCPU 0 hints all of it; else each over its
    own slice, hinting that), remap operations, and the protocol.

    The hint: ``back`` (back the holes ahead) and ``warm`` (warm the caches); ``memory="backed"``
    backs every page of the buffer before the run (caches cold), where warming alone means
    something. ``tasks`` guest tasks per vCPU (each over its share of the vCPU's slice,
    switched every ``timeslice`` accesses); ``async_pf`` serves first touches with asynchronous
    page faults (:mod:`eptlab.apps.async_pf`)."""

    protocol: ProtocolName = "correct"
    hint: bool = True
    vcpus: int = 2
    pages: int = 32
    shared: bool = True
    accesses: int = 500  # per vCPU
    workload: str = "random"
    write_fraction: float = 0.3
    prebacked: tuple[int, ...] = ()
    merged: tuple[tuple[int, int], ...] = ()
    remaps: tuple[RemapOp, ...] = ()
    page_size: str = "4k"
    warm: bool = True
    back: bool = True
    memory: Literal["lazy", "backed"] = "lazy"
    tasks: int = 1
    timeslice: int = 10_000
    async_pf: bool = False
    batch: int = 8
    seed: int = 0
    quantum: tuple[int, int] = (16, 64)
    preempt_at: tuple[tuple[int, int], ...] = ()  # (lane, access index)
    lane_order: tuple[int, ...] = ()  # a permutation of the vCPUs (scheduler lanes)
    pool_capacity: int = 16
    per_access_cycles: bool = False
    data_cache: bool = True
    costs: Costs = field(default_factory=Costs)
    async_costs: AsyncCosts = field(default_factory=AsyncCosts)

    @property
    def flags(self) -> int:
        """The hint's flags."""
        flags = PREFETCH_2M if self.page_size == "2m" else 0
        flags |= 0 if self.warm else PREFETCH_NO_WARM
        return flags | (0 if self.back else PREFETCH_NO_BACK)


@dataclass
class Outcome:
    """What one scenario measured."""

    scenario: Scenario
    buffer: Buffer
    accesses: int
    ept_violations: int
    translation_cycles: int
    access_cycles: I64
    prefetch_cycles: int
    pending_cycles: int  # charged to vCPUs after their last access
    idle_cycles: int  # vCPUs halted with every task waiting for a page (in access_cycles)
    stale_uses: int
    stale_by_kind: dict[str, int]
    examples: list[StaleUse]
    checked: int
    unresolved: int
    counters: dict[str, int]
    lock_acquisitions: int
    lock_contended: int
    nested_tlb_hits: int  # of the guest's accesses (warming reads excluded)
    ept_psc_hits: int

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.access_cycles, q)) if len(self.access_cycles) else 0.0


def _slice_of(s: Scenario, k: int) -> tuple[int, int]:
    """First page and page count of vCPU ``k``'s part of the buffer."""
    if s.shared:
        return 0, s.pages
    per = s.pages // s.vcpus
    return k * per, per if k < s.vcpus - 1 else s.pages - k * per


def _stream(s: Scenario, buffer: Buffer, first: int, count: int, n: int, salt: int) -> TraceChunk:
    from ..workloads import make_workload

    workload = make_workload(
        s.workload,
        footprint=count * PAGE_SIZE,
        seed=s.seed * 7919 + salt,
        write_fraction=s.write_fraction,
    )
    chunk: TraceChunk = workload.chunk_at(  # type: ignore[attr-defined]
        buffer.gva + first * PAGE_SIZE, 0, n
    )
    return chunk


def _program(
    s: Scenario, app: PrefetchApp, buffer: Buffer, k: int, chunk: TraceChunk
) -> list[Segment]:
    """One vCPU's program without guest tasks: the workload with the remaps placed in it."""
    program: list[Segment] = []
    position = 0
    for op in sorted((o for o in s.remaps if o.vcpu == k), key=lambda o: o.after):
        at = min(max(op.after, position), s.accesses)
        if at > position:
            program.append(Run(cut(chunk, position, at)))
            position = at
        program.append(_remap_segment(app, buffer, op))
    if position < s.accesses:
        program.append(Run(cut(chunk, position, s.accesses)))
    return program


def _tasks(
    s: Scenario, app: PrefetchApp, buffer: Buffer, k: int, vcpu: VCPU, meter: CycleMeter
) -> GuestTasks:
    """vCPU ``k``'s guest tasks: task j works over the j-th share of the vCPU's slice."""
    first, count = _slice_of(s, k)
    streams = []
    for j in range(s.tasks):
        pages = count // s.tasks if j < s.tasks - 1 else count - (s.tasks - 1) * (count // s.tasks)
        n = s.accesses // s.tasks if j < s.tasks - 1 else s.accesses - j * (s.accesses // s.tasks)
        start = first + j * (count // s.tasks)
        streams.append(_stream(s, buffer, start, max(1, pages), n, k * 64 + j))
    events = [(op.after, _remap_segment(app, buffer, op)) for op in s.remaps if op.vcpu == k]
    return GuestTasks(
        vcpu, streams, meter=meter, timeslice=s.timeslice, events=events, costs=s.async_costs
    )


def play(s: Scenario, observers: Sequence[Observer] = ()) -> Outcome:
    """Run one scenario with the checker (and the cycle meter) attached; ``observers`` see
    every run of the engine too (after them)."""
    mmu = MmuConfig() if s.data_cache else MmuConfig(cache=CacheConfig.disabled())
    hv = Hypervisor(mmu=mmu, seed=s.seed)
    engine = ObservedEngine.install(hv, per_access_cycles=s.per_access_cycles)
    run = region_run(hv, s.pages * PAGE_SIZE)
    memory = hv.layout.guest_memory((8 << 20) + (run or -(-s.pages * PAGE_SIZE // _2M) * _2M))
    vm = hv.create_vm("guest", memory)
    meter = CycleMeter(s.costs)
    app = PrefetchApp(
        hv, vm, protocol=s.protocol, batch=s.batch, costs=s.costs, pool_capacity=s.pool_capacity
    )
    app.meter = meter
    policy = AsyncPageFaults(app, meter, s.async_costs) if s.async_pf else None
    checker = StaleUseChecker(hv, holders=[app.pool])
    engine.observers += [checker, meter, *observers]
    guest = boot_guest(vm, vcpus=s.vcpus, seed=s.seed, cma=run)
    buffer = populate(guest.kernel, guest.process, s.pages * PAGE_SIZE)
    backed = range(s.pages) if s.memory == "backed" else s.prebacked
    for page in backed:
        app.back(buffer.gpa + page * PAGE_SIZE)
    for keep, dup in s.merged:
        app.merge(None, buffer.gpa + keep * PAGE_SIZE, buffer.gpa + dup * PAGE_SIZE)
    setup = app.counters + vm.counters  # the backing and merging above: not the run's
    all_tasks: list[GuestTasks] = []
    for k, vcpu in enumerate(guest.vcpus):
        first, count = _slice_of(s, k)
        hint: list[Segment] = []
        if s.hint and (not s.shared or k == 0):
            gpa = buffer.gpa + first * PAGE_SIZE
            hint.append(Hypercall(PREFETCH_HYPERCALL, (gpa, count * PAGE_SIZE, s.flags)))
        if s.tasks > 1 or s.async_pf:
            tasks = _tasks(s, app, buffer, k, vcpu, meter)
            all_tasks.append(tasks)
            if policy is not None:
                policy.serve(tasks)
            vcpu.load(itertools.chain(hint, tasks.segments()))
        else:
            chunk = _stream(s, buffer, first, count, s.accesses, k)
            vcpu.load(hint + _program(s, app, buffer, k, chunk))
    order = list(s.lane_order) if sorted(s.lane_order) == list(range(s.vcpus)) else []
    lanes = [guest.vcpus[i] for i in order] if order else guest.vcpus
    preempt: dict[int, set[int]] = defaultdict(set)
    for lane, index in s.preempt_at:
        preempt[lane % s.vcpus].add(index)
    hv.run(lanes, seed=s.seed, quantum=s.quantum, preempt_at=dict(preempt))
    return _outcome(s, buffer, guest.vcpus, app, meter, checker, policy, all_tasks, setup)


def _outcome(
    s: Scenario,
    buffer: Buffer,
    vcpus: list[VCPU],
    app: PrefetchApp,
    meter: CycleMeter,
    checker: StaleUseChecker,
    policy: AsyncPageFaults | None,
    tasks: list[GuestTasks],
    setup: Counter[str],
) -> Outcome:
    stats = [v.stats for v in vcpus]
    warm_translation = sum(app.warm_translation_cycles.values())
    counters = app.counters + app.vm.counters
    counters.subtract(setup)
    if policy is not None:
        counters += policy.counters
    counters["task_switches"] = sum(t.switches for t in tasks)
    return Outcome(
        scenario=s,
        buffer=buffer,
        accesses=sum(st.accesses for st in stats) - sum(app.warm_accesses.values()),
        ept_violations=sum(st.ept_violations for st in stats),
        translation_cycles=sum(st.translation_cycles for st in stats)
        - warm_translation
        + meter.failed_walk_cycles,
        access_cycles=meter.per_access(),
        prefetch_cycles=sum(app.prefetch_cycles.values()),
        pending_cycles=sum(meter.pending.values()),
        idle_cycles=sum(meter.idle.values()),
        stale_uses=checker.stale_uses,
        stale_by_kind=dict(checker.by_kind),
        examples=list(checker.examples),
        checked=checker.checked,
        unresolved=checker.unresolved,
        counters=dict(counters),
        lock_acquisitions=app.lock.acquisitions,
        lock_contended=app.lock.contended,
        nested_tlb_hits=sum(st.nested_tlb_hits for st in stats) - app.warm_nested_tlb_hits,
        ept_psc_hits=sum(st.ept_psc_hits for st in stats) - app.warm_ept_psc_hits,
    )


def _remap_segment(app: PrefetchApp, buffer: Buffer, op: RemapOp) -> Segment:
    page = buffer.gpa + (op.page * PAGE_SIZE) % buffer.length
    other = buffer.gpa + (op.other * PAGE_SIZE) % buffer.length
    if op.kind == "balloon":
        return Hypercall(BALLOON_HYPERCALL, (page,))

    def migrate(vcpu: VCPU) -> None:
        app.migrate(vcpu, page)

    def merge(vcpu: VCPU) -> None:
        app.merge(vcpu, page, other)

    return GuestAction(migrate if op.kind == "migrate" else merge, label=op.kind)


__all__ = ["Outcome", "RemapOp", "Scenario", "play"]
