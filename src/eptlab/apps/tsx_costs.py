"""What a run of critical sections costs in cycles, priced by the cost profile: the engine's
cycles of every access (translation and data, from :class:`~eptlab.apps.tsx.TsxStats`) plus

* ``rtm_commit_cycles`` per committed attempt (XBEGIN + XEND),
* ``rtm_abort_cycles`` per aborted attempt (XBEGIN + abort processing),
* ``lock_cycles`` per section run under the lock (the fallback, or plain locking),
* ``vmexit_cycles`` per VM exit (IPIs and timer ticks included), ``guest_fault_cycles`` per
  delivered guest fault.

Wasted cycles are those of the aborted attempts: the engine cycles of the accesses they
performed plus ``rtm_abort_cycles`` each. The exit an abort came with is not counted as wasted:
the hypervisor's work happens whether or not a transaction was open (plain locking takes the
same exits).

Time (the model's rule, not a measurement): ``vcpus`` lanes run in parallel, so a run takes its
total work divided by ``vcpus``, but no less than the work done under the lock (fallback bodies
and lock operations), which is serial. Plain locking (``elide=False``) is serial throughout.
Lock waiting and cache-line transfers of a contended lock are not priced.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..costs import CostProfile, active_profile
from .tsx import TsxStats


@dataclass(frozen=True, slots=True)
class TsxCosts:
    """The prices, in cycles, and the clock."""

    commit: int
    abort: int
    lock: int
    vmexit: int
    guest_fault: int
    clock_ghz: float

    @classmethod
    def from_profile(cls, profile: CostProfile | None = None) -> TsxCosts:
        """The prices of ``profile`` (the active one by default)."""
        p = active_profile() if profile is None else profile
        return cls(
            commit=p.cycles("rtm_commit_cycles"),
            abort=p.cycles("rtm_abort_cycles"),
            lock=p.cycles("lock_cycles"),
            vmexit=p.cycles("vmexit_cycles"),
            guest_fault=p.cycles("guest_fault_cycles"),
            clock_ghz=p["clock_ghz"],
        )


@dataclass(frozen=True, slots=True)
class RunCycles:
    """A run priced: ``total`` work of all vCPUs, ``wasted`` by aborted attempts (of which
    ``wasted_accesses`` the engine cycles of their accesses), ``serial`` under the lock, and
    the modelled time ``makespan`` (see the module docstring)."""

    total: int
    wasted: int
    wasted_accesses: int
    serial: int
    makespan: float
    sections: int
    clock_ghz: float

    @property
    def sections_per_us(self) -> float:
        """Throughput: sections completed per microsecond of modelled time."""
        return self.sections * self.clock_ghz * 1_000 / self.makespan if self.makespan else 0.0

    @property
    def wasted_share(self) -> float:
        """Wasted cycles / all cycles."""
        return self.wasted / self.total if self.total else 0.0


def price(stats: TsxStats, vcpus: int, *, elided: bool, costs: TsxCosts | None = None) -> RunCycles:
    """Price one run's statistics (``elided``: lock elision; False: plain locking)."""
    c = TsxCosts.from_profile() if costs is None else costs
    exits = sum(stats.exits.values())
    total = (
        stats.cycles
        + stats.commits * c.commit
        + stats.aborts * c.abort
        + stats.fallbacks * c.lock
        + exits * c.vmexit
        + stats.guest_faults * c.guest_fault
    )
    wasted = stats.wasted_cycles + stats.aborts * c.abort
    serial = stats.fallback_cycles + stats.fallbacks * c.lock
    makespan = max(total / vcpus, serial) if elided else float(total)
    return RunCycles(
        total, wasted, stats.wasted_cycles, serial, makespan, stats.sections, c.clock_ghz
    )


__all__ = ["RunCycles", "TsxCosts", "price"]
