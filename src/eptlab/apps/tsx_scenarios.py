"""The tsx-aborts scenarios: a VM with a guest kernel, a populated region and the hypervisor
policy of the scenario (lazy backing, copy-on-write, dirty logging, ...), whose guest runs
critical sections with lock elision (:class:`~eptlab.apps.tsx.TsxRunner`) or plain locking."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..apps.cow import CopyOnWrite
from ..apps.prefetch import PrefetchApp
from ..apps.scenario import populate
from ..arch.bits import PAGE_SIZE
from ..errors import ConfigError, EptlabError
from ..guest import GuestKernel, KernelImage
from ..hv import VCPU, Hypervisor
from ..hv.dirty_log import PmlLog, WriteProtectLog
from ..mmu.rtm import Op, TxStream
from .tsx import RetryPolicy, Section, TsxRunner, TsxStats, install_timer_tick, prefetch_region

# -- scenarios ----------------------------------------------------------------------------------

SCENARIOS = (
    "backed", "lazy", "guest-pf", "cow", "wp-dirty", "pml-dirty", "timer", "conflict", "capacity"
)
MITIGATIONS = ("none", "pretouch", "prefetch")
LAZY_SCENARIOS = ("lazy",)  # where the prefetch hypercall applies


@dataclass(frozen=True)
class Scenario:
    """One run: what the hypervisor does to the guest's memory (``kind``; ``backed``: nothing,
    the region is mapped before the run), the mitigation, and
    the guest's sections (``sections`` per vCPU, each ``reads`` reads and ``writes`` atomic adds
    at random lines of a ``region_pages`` region)."""

    kind: str
    mitigation: str = "none"
    vcpus: int = 1
    sections: int = 1000
    region_pages: int = 2048
    reads: int = 8
    writes: int = 4
    max_retries: int = 4
    honor_retry_bit: bool = False  # the glibc policy: no retry unless EAX says RETRY
    round_every: int = 200  # wp-dirty, pml-dirty: sections per dirty-logging round
    timer_period: int = 2000  # timer: accesses of a vCPU between preemption-timer exits
    long_body: int = 256  # timer: accesses of each section
    hot_lines: int = 64  # conflict: the lines all writes go to
    capacity_lines: int = 16  # capacity: written lines, all in one L1 set
    seed: int = 0
    record: bool = False
    elide: bool = True  # False: plain locking (every section under the lock), the baseline

    def __post_init__(self) -> None:
        if self.kind not in SCENARIOS:
            raise ConfigError("scenario", f"{self.kind!r} is not one of {', '.join(SCENARIOS)}")
        if self.mitigation not in MITIGATIONS:
            raise ConfigError(
                "mitigation", f"{self.mitigation!r} is not one of {', '.join(MITIGATIONS)}"
            )
        if self.mitigation == "prefetch" and self.kind not in LAZY_SCENARIOS:
            raise ConfigError(
                "mitigation", f"prefetch backs lazily backed memory only; {self.kind} is not"
            )
        if self.vcpus < 1 or self.vcpus > 8:
            raise ConfigError("vcpus", "must be 1..8")
        if self.sections < 1 or self.region_pages < 1 or self.reads < 0 or self.writes < 0:
            raise ConfigError("sections/region_pages/reads/writes", "must be positive")
        if self.reads + self.writes < 1:
            raise ConfigError("reads/writes", "a section needs at least one access")
        if self.kind == "capacity" and self.capacity_lines > self.region_pages:
            raise ConfigError("capacity_lines", "one line per page: needs that many pages")
        if self.kind == "conflict" and not 1 <= self.hot_lines <= self.region_pages * 64:
            raise ConfigError("hot_lines", "must be 1..region lines")
        if self.kind == "timer" and self.long_body < self.writes:
            raise ConfigError("long_body", "must be at least writes")


@dataclass
class Outcome:
    scenario: Scenario
    stats: TsxStats
    region: int  # GVA of the region
    lock: int  # GVA of the lock word
    hv: Hypervisor
    vcpus: list[VCPU]


def make_sections(s: Scenario, region: int, lane: int) -> list[Section]:
    """The seeded sections of one vCPU."""
    rng = np.random.default_rng([s.seed, lane])
    lines = s.region_pages * 64
    out = []
    for _ in range(s.sections):
        reads, writes = s.reads, s.writes
        if s.kind == "timer":
            reads = s.long_body - writes
        read_at = rng.integers(0, lines, reads)
        if s.kind == "conflict":
            write_at = rng.integers(0, s.hot_lines, writes)
        elif s.kind == "capacity":
            first = int(rng.integers(0, s.region_pages - s.capacity_lines + 1))
            write_at = (first + np.arange(s.capacity_lines)) * 64 + int(rng.integers(64))
        else:
            write_at = rng.integers(0, lines, writes)
        gva = region + 64 * np.concatenate([read_at, write_at]).astype(np.int64)
        ops = np.r_[np.full(len(read_at), Op.READ), np.full(len(write_at), Op.ADD)]
        order = rng.permutation(len(gva))
        out.append(Section(TxStream.accesses(gva[order], ops[order].astype(np.int8), 1)))
    return out


def play(s: Scenario) -> Outcome:
    """Build the scenario's VM, guest and hypervisor policy; run the sections."""
    hv = Hypervisor(seed=s.seed)
    region_bytes = s.region_pages * PAGE_SIZE
    blocks = -(-region_bytes // (2 << 20))
    run = (2 << 20) << blocks.bit_length()  # aged: the lock's and the region's 2 MiB blocks
    cma = run if hv.layout.aged else 0
    memory = hv.layout.guest_memory((32 << 20) + (cma or blocks * (2 << 20)))
    vm = hv.create_vm("guest", memory, pml=s.kind == "pml-dirty")
    install_timer_tick(hv)
    if s.mitigation == "prefetch":
        PrefetchApp(hv, vm)
    image = KernelImage(code=2 << 20, rodata=2 << 20, data=2 << 20)
    kernel = GuestKernel(vm, seed=s.seed, image=image, cma=cma)
    process = kernel.spawn("app")
    vcpus = [vm.add_vcpu(cr3=process.cr3) for _ in range(s.vcpus)]
    for vcpu in vcpus:
        kernel.switch_to(vcpu, process)
    lock = populate(kernel, process, PAGE_SIZE)
    vm.back(lock.gpa)
    if s.kind == "guest-pf":
        region, region_gpa = kernel.mmap(process, region_bytes), None  # pages on first touch
    else:
        buffer = populate(kernel, process, region_bytes)
        region, region_gpa = buffer.gva, buffer.gpa
    if s.kind not in ("lazy", "guest-pf"):
        assert region_gpa is not None
        vm.ept.map_range(region_gpa, region_bytes)
    on_round: Callable[[], object] | None = None
    if s.kind == "cow":
        cow = CopyOnWrite(hv)
        vcpus = list(cow.fork(vm, 1)[0].vcpus)  # the clone runs the sections
    elif s.kind == "wp-dirty":
        assert region_gpa is not None
        wp = WriteProtectLog(vm)
        wp.start(region_gpa, region_bytes)
        on_round = wp.collect
    elif s.kind == "pml-dirty":
        assert region_gpa is not None
        pml = PmlLog(vm)
        pml.start(region_gpa, region_bytes)
        on_round = pml.collect
    if s.mitigation == "prefetch":
        assert region_gpa is not None
        if prefetch_region(hv, vcpus[0], region_gpa, region_bytes) != 0:
            raise EptlabError("the prefetch hypercall refused the region")
    hv.engine.reset_stats()
    runner = TsxRunner(
        hv,
        vcpus,
        lock=lock.gva,
        policy=RetryPolicy(s.max_retries, honor_retry_bit=s.honor_retry_bit),
        seed=s.seed,
        mitigation="pretouch" if s.mitigation == "pretouch" else "none",
        timer_period=s.timer_period if s.kind == "timer" else None,
        round_every=s.round_every if s.kind in ("wp-dirty", "pml-dirty") else None,
        on_round=on_round,
        record=s.record,
        elide=s.elide,
    )
    programs = [make_sections(s, region, k) for k in range(s.vcpus)]
    stats = runner.run(programs)
    return Outcome(s, stats, region, lock.gva, hv, vcpus)


__all__ = [
    "LAZY_SCENARIOS",
    "MITIGATIONS",
    "SCENARIOS",
    "Outcome",
    "Scenario",
    "make_sections",
    "play",
]
