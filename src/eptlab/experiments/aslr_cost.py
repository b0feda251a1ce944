"""aslr-side-channel: what each EPT layout costs a workload (TLB misses, walk references,
cycles per access), measured through the fast engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..apps.ept_layout import EptLayout, back_range, boot, ept_leaf_sizes
from ..arch.bits import PageSize
from ..errors import EptlabError
from ..guest import GuestKernel
from ..hv import ExitAction, Run
from ..memory.layout import default_layout
from ..traces.model import TraceChunk
from ..workloads import make_workload

if TYPE_CHECKING:
    from .aslr_side_channel import AslrSideChannelParams

KERNEL_MEMORY = 64 << 20  # guest memory besides the workload's footprint
_2M = int(PageSize.SIZE_2M)


@dataclass(frozen=True)
class LayoutCost:
    """What the workload measured under one layout (after warm-up)."""

    policy: str
    ept_page: str
    accesses: int
    walks: int
    walk_references: int
    cycles: int
    ept_leaf_sizes: tuple[str, ...]

    @property
    def tlb_miss_rate(self) -> float:
        return self.walks / max(1, self.accesses)

    @property
    def walk_refs_per_access(self) -> float:
        return self.walk_references / max(1, self.accesses)

    @property
    def cycles_per_access(self) -> float:
        return self.cycles / max(1, self.accesses)


def measure_cost(p: AslrSideChannelParams, policy: str) -> LayoutCost:
    """Boot a VM laid out by ``policy``, pre-fault a ``footprint_mib`` region of a process
    (``guest_page`` pages, every EPT page backed by the layout), run the workload."""
    layout = EptLayout.named(policy)
    footprint = p.footprint_mib << 20
    laid = boot(layout, default_layout().guest_memory(footprint + KERNEL_MEMORY), seed=p.seed)
    guest_page = PageSize.parse(p.guest_page)
    kernel = GuestKernel(laid.vm, seed=p.seed, thp=guest_page == PageSize.SIZE_2M)
    process = kernel.spawn("workload")
    gva = kernel.mmap(process, footprint)
    for offset in range(0, footprint, _2M):  # MAP_POPULATE: the guest maps it all up front
        gpa = kernel.frames.alloc(PageSize.SIZE_2M)
        process.tables.map_range(gva + offset, gpa, _2M, guest_page, user=True)
        back_range(laid.vm, gpa, _2M)
    vcpu = laid.vm.add_vcpu(cr3=process.cr3)
    kernel.switch_to(vcpu, process)
    workload = make_workload(p.workload, footprint=footprint, seed=p.seed)
    chunks = list(workload.stream(gva, p.warmup + p.accesses))
    stream = TraceChunk(
        np.concatenate([c.address for c in chunks]),
        np.concatenate([c.kind for c in chunks]),
        np.concatenate([c.size for c in chunks]),
    )
    hv = laid.hv
    for start, stop in ((0, p.warmup), (p.warmup, p.warmup + p.accesses)):
        if start == p.warmup:
            hv.engine.reset_stats()
        part = TraceChunk(stream.address[start:stop], stream.kind[start:stop],
                          stream.size[start:stop])
        vcpu.load([Run(part, user=True)])
        action: ExitAction | None = None
        while (exit_ := vcpu.run(action)) is not None:
            action = hv.handle(exit_)
    s = vcpu.stats
    if s.guest_faults or s.ept_violations:
        raise EptlabError(f"{policy}: the pre-faulted workload took {s.guest_faults} guest "
                          f"faults and {s.ept_violations} EPT violations")
    sizes = sorted(ept_leaf_sizes(laid.vm))
    return LayoutCost(
        policy, layout.page.label, s.accesses, s.walks, s.walk_references, s.cycles,
        tuple(size.label for size in sizes),
    )


