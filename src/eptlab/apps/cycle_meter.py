"""What the hypervisor's work costs and what each guest access costs with it.

:class:`Costs` holds the cycles charged for work the engine does not model, taken from the active
cost profile (:mod:`eptlab.costs`): a VM exit round trip, an INVEPT, an EPT entry write, a frame
allocation, zeroing or copying, a guest page fault. :class:`CycleMeter` (an observer of
:class:`~eptlab.apps.observed.ObservedEngine` in per-access mode) gives each access of the guest
(runs labelled "guest") its engine cycles plus what it caused: the failed attempt of an access that
exited (costed from the engine's statistics), the exit, and the hypervisor work charged to the vCPU
(added to its next access).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..costs import active_profile
from .observed import ObservedRun

I64 = npt.NDArray[np.int64]


def _cycles(key: str) -> int:
    return active_profile().cycles(key)


@dataclass(frozen=True)
class Costs:
    """Cycles charged for work the engine does not model (see the module docstring)."""

    exit_cycles: int = field(default_factory=lambda: _cycles("vmexit_cycles"))
    invept_cycles: int = field(default_factory=lambda: _cycles("invept_cycles"))
    entry_cycles: int = field(default_factory=lambda: _cycles("ept_edit_cycles"))
    alloc_cycles: int = field(default_factory=lambda: _cycles("frame_alloc_cycles"))
    bytes_per_cycle: float = field(
        default_factory=lambda: active_profile()["copy_bytes_per_cycle"]
    )
    guest_fault_cycles: int = field(default_factory=lambda: _cycles("guest_fault_cycles"))
    backing_wait_cycles: int = 0  # host latency of making a page present beyond zeroing it

    def page(self, size: int) -> int:
        """Allocate, zero (or copy) and map one page of ``size`` bytes."""
        return self.alloc_cycles + int(size // self.bytes_per_cycle) + self.entry_cycles

    def back(self, size: int) -> int:
        """Back one page of guest memory: :meth:`page` plus the host's wait for its contents
        (``backing_wait_cycles``: 0 for zero-filled memory, a read for swapped-out memory)."""
        return self.page(size) + self.backing_wait_cycles

    @property
    def ipi_cycles(self) -> int:
        """What a shootdown costs each vCPU it interrupts."""
        return self.exit_cycles + self.invept_cycles


class CycleMeter:
    """Per-access cycles of the guest's own accesses (runs labelled "guest"), with the costs
    they caused added (see the module docstring). Needs ``ObservedEngine(per_access_cycles=
    True)``."""

    def __init__(self, costs: Costs | None = None) -> None:
        self.costs = costs or Costs()
        self.pending: Counter[int] = Counter()
        self.samples: defaultdict[int, list[I64]] = defaultdict(list)
        self.exits = 0
        self.failed_walk_cycles = 0  # walks that ended in an exit or fault (not in the stats)
        self.spent: Counter[int] = Counter()  # by vCPU: cycles of its metered accesses so far
        self.idle: Counter[int] = Counter()  # by vCPU: halted, every task waiting (in spent)

    def charge(self, vid: int, cycles: int) -> None:
        """Add ``cycles`` to vCPU ``vid``'s next access."""
        self.pending[vid] += cycles

    def clock(self, vid: int) -> int:
        """vCPU ``vid``'s time so far: its accesses' cycles and what is charged to the next."""
        return self.spent[vid] + self.pending[vid]

    def __call__(self, run: ObservedRun) -> None:
        if run.label != "guest" or run.cycles is None:
            return
        vids = run.vcpu
        cycles = run.cycles.copy()
        for vid in np.unique(vids).tolist():
            sel = np.nonzero(vids == vid)[0]
            if self.pending[vid]:
                cycles[sel[0]] += self.pending.pop(vid)
            self.samples[vid].append(cycles[sel])
            self.spent[vid] += int(cycles[sel].sum())
        if run.exit is not None or run.fault is not None:
            vid = int(run.accesses.vcpu[run.stop])
            extra = (
                self.costs.exit_cycles if run.exit is not None else self.costs.guest_fault_cycles
            )
            self.pending[vid] += run.failed_cycles + extra
            self.failed_walk_cycles += run.failed_cycles
            self.exits += run.exit is not None

    def per_access(self) -> I64:
        """Every metered access's cycles (vCPU by vCPU)."""
        parts = [c for chunks in self.samples.values() for c in chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


__all__ = ["Costs", "CycleMeter"]
