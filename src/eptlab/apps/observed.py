"""Observing every access the engine performs: :class:`ObservedEngine` is the engine with the
HPA of every performed access recorded and each run handed to observers right after it (before any
Python changes a table); with ``per_access_cycles`` it runs accesses one at a time and reports each
one's cycles. Observers: the stale-use checker (:mod:`eptlab.apps.stale_use`) and the cycle meter
(:mod:`eptlab.apps.cycle_meter`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.exits import GuestFault, VmExit
from ..errors import ConfigError
from ..hv import Hypervisor
from ..memory.physical import PhysicalMemory
from ..mmu.config import MmuConfig
from ..mmu.context import CpuFeatures
from ..mmu.engine import Accesses, ChunkResult, Engine
from ..mmu.kernels import layout as L

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ObservedRun:
    """One engine run as observers see it: ``accesses[start:stop]`` were performed."""

    accesses: Accesses
    start: int
    stop: int
    hpa: I64  # HPA of each performed access
    cycles: I64 | None  # engine cycles of each performed access (per-access mode)
    exit: VmExit | None
    fault: GuestFault | None
    failed_cycles: int  # cycles of the attempt that stopped the run (per-access mode)
    label: str

    @property
    def vcpu(self) -> npt.NDArray[np.int32]:
        return self.accesses.vcpu[self.start : self.stop]

    @property
    def gva(self) -> I64:
        return self.accesses.gva[self.start : self.stop]


Observer = Callable[[ObservedRun], None]


class ObservedEngine(Engine):
    """The engine, recording the HPA of every performed access and handing each run to the
    observers right after it (before any software changes a table). With
    ``per_access_cycles`` it runs accesses one at a time and reports each one's cycles."""

    def __init__(
        self,
        memory: PhysicalMemory,
        config: MmuConfig | None = None,
        features: CpuFeatures | None = None,
        *,
        per_access_cycles: bool = False,
    ) -> None:
        super().__init__(memory, config, features)
        self.observers: list[Observer] = []
        self.per_access_cycles = per_access_cycles
        self.label = "guest"

    @classmethod
    def install(cls, hv: Hypervisor, *, per_access_cycles: bool = False) -> ObservedEngine:
        """Replace ``hv``'s engine (same memory, configuration and features) before any vCPU
        exists."""
        if any(vm.vcpus for vm in hv.vms):
            raise ConfigError("ObservedEngine", "install it before adding vCPUs")
        engine = cls(
            hv.host.memory, hv.engine.config, hv.features, per_access_cycles=per_access_cycles
        )
        hv.engine = engine
        return engine

    def run(
        self,
        accesses: Accesses,
        start: int = 0,
        *,
        record_hpa: bool = False,
        log_references: int = 0,
    ) -> ChunkResult:
        if not self.observers:
            return super().run(
                accesses, start, record_hpa=record_hpa, log_references=log_references
            )
        cycles: I64 | None = None
        failed = 0
        if self.per_access_cycles and not log_references:
            result, cycles, failed = self._run_singly(accesses, start)
        else:
            result = super().run(accesses, start, record_hpa=True, log_references=log_references)
        assert result.hpa is not None
        observed = ObservedRun(
            accesses,
            start,
            result.stopped_at,
            result.hpa[start : result.stopped_at],
            cycles,
            result.exit,
            result.fault,
            failed,
            self.label,
        )
        for observer in self.observers:
            observer(observed)
        return result if record_hpa else dataclasses.replace(result, hpa=None)

    def _run_singly(self, accesses: Accesses, start: int) -> tuple[ChunkResult, I64, int]:
        n = len(accesses)
        hpa = np.full(n, -1, np.int64)
        cycles = np.zeros(max(0, n - start), np.int64)
        for i in range(start, n):
            v = int(accesses.vcpu[i])
            one = Accesses(
                accesses.gva[i : i + 1],
                accesses.kind[i : i + 1],
                accesses.user[i : i + 1],
                accesses.vcpu[i : i + 1],
            )
            before = self.stats_rows[v].copy()
            r = super().run(one, 0, record_hpa=True)
            spent = int(self.stats_rows[v, L.ST_CYCLES] - before[L.ST_CYCLES])
            if not r.done:
                failed = self._failed_walk_cycles(self.stats_rows[v] - before)
                return ChunkResult(i, r.exit, r.fault, hpa), cycles[: i - start], failed
            assert r.hpa is not None
            hpa[i] = r.hpa[0]
            cycles[i - start] = spent
        return ChunkResult(n, None, None, hpa), cycles, 0

    def _failed_walk_cycles(self, delta: I64) -> int:
        """Cycles of an attempt that ended in an exit or a fault. The kernels charge it
        nothing, but its statistics are counted: the walk start and each walk reference at the
        latency of the cache level that served it (paging-structure-cache probes, 1 cycle
        each, are not counted: a slight underestimate)."""
        served = delta[L.ST_WALK_CACHE : L.ST_WALK_CACHE + 4]
        cost = self.cost_vector
        latency = cost[L.COST_CACHE : L.COST_CACHE + 4]
        return int(delta[L.ST_WALKS] * cost[L.COST_WALK_START] + served @ latency)


@contextmanager
def labelled(engine: Engine, label: str) -> Iterator[None]:
    """Label the accesses run inside the block (e.g. "warm"), if the engine is observed."""
    if not isinstance(engine, ObservedEngine):
        yield
        return
    previous, engine.label = engine.label, label
    try:
        yield
    finally:
        engine.label = previous



__all__ = ["ObservedEngine", "ObservedRun", "Observer", "labelled"]
