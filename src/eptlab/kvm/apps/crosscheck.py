"""crosscheck: the same guest access pattern through the simulator and through KVM.

Compared where both engines can answer: a fork's pages copied (per clone), counted by the
simulator's copy-on-write (:func:`eptlab.kvm.sim.fork`, the 4 KiB case of
:class:`eptlab.apps.cow.CopyOnWrite`, run on the same pattern) and by
the host kernel (``Private_Dirty``), each against the pages the clone wrote (distinct pages,
one store each: either engine copying a page more or less fails the row); the dirty page set
of every round (KVM's bitmap and dirty ring against the simulator's PML log; KVM's
read-only-slot traps against the simulator's write-protected EPT); exits per write when every
write traps. Times are reported beside, never compared: KVM's are measured
(``kvm_us``), the simulator's modelled (``sim_cycles``, :mod:`eptlab.hv.costs`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .. import abi, sim
from ..backend import PAGE
from ..fds import Kvm
from .common import Row, WritePattern, flavour_columns
from .dirty_log import run_mode
from .fork import fork_once


@dataclass(frozen=True)
class CrosscheckParams:
    """Parameters of the simulator-vs-KVM cross-check."""
    memory_mib: int = 16
    pages: int = 64
    rounds: int = 2
    clones: int = 2
    seed: int = 0


def _row(check: str, sim_value: object, kvm_value: object, *, equal: bool | None = None,
         kvm_us: float | None = None, sim_cycles: int | None = None) -> Row:
    return {
        "check": check,
        "sim": sim_value,
        "kvm": kvm_value,
        "equal": sim_value == kvm_value if equal is None else equal,
        "kvm_us": None if kvm_us is None else round(kvm_us, 1),
        "sim_cycles": sim_cycles,
        **flavour_columns(),
    }


class Crosscheck:
    """The same questions through the simulator and through KVM, one row per check."""
    name = "crosscheck"

    def rows(self, p: CrosscheckParams) -> Iterator[Row]:
        """Every check's row (fork, dirty logging, TSX where available)."""
        memory = p.memory_mib << 20
        with Kvm.open() as kvm:
            yield from self.fork(kvm, memory, p)
            yield from self.dirty_log(kvm, memory, p)

    def fork(self, kvm: Kvm, memory: int, p: CrosscheckParams) -> Iterator[Row]:
        """Rows comparing the pages each clone copies on KVM and in the simulator."""
        o = fork_once(kvm, memory, p.clones, p.pages, p.seed)
        union = [int(a) for pattern in o.patterns for a in pattern.addresses]
        s = sim.fork(memory, union, [[int(a) for a in q.addresses] for q in o.patterns])
        for i in range(p.clones):
            yield _row(f"fork: clone {i} pages copied, sim CopyOnWrite and kvm Private_Dirty, "
                       f"each = its {o.pages_written[i]} pages written",
                       s.pages_copied[i], o.private_bytes[i] // PAGE,
                       equal=s.pages_copied[i] == o.private_bytes[i] // PAGE == o.pages_written[i],
                       kvm_us=1e6 * o.fork_seconds[i],
                       sim_cycles=s.fork_cycles // p.clones + s.fault_cycles // p.clones)

    def dirty_log(self, kvm: Kvm, memory: int, p: CrosscheckParams) -> Iterator[Row]:
        """Rows comparing the pages KVM's dirty log and the simulator report dirty."""
        pattern = WritePattern.random(memory, p.pages, p.seed)
        rounds = [[int(a) for a in pattern.addresses]] * p.rounds
        pml = sim.dirty_log_pml(memory, rounds)
        trap = sim.dirty_log_trap(memory, rounds)
        ring = kvm.check_extension(abi.Cap.DIRTY_LOG_RING) > 0
        modes = ("log", "ring", "trap") if ring else ("log", "trap")
        for mode in modes:
            o = run_mode(kvm, mode, pattern, memory, p.rounds)
            reference = trap if mode == "trap" else pml
            yield _row(
                f"dirty-log {mode}: dirty set of every round (vs sim "
                f"{'write-protect' if mode == 'trap' else 'PML'})",
                sum(len(d) for d in reference.dirty), sum(len(d) for d in o.dirty),
                equal=reference.dirty == o.dirty and o.exact,
                kvm_us=1e6 * o.run_seconds, sim_cycles=reference.modelled_cycles,
            )
            if mode == "trap":
                yield _row("dirty-log trap: exits per write", trap.exits / trap.writes,
                           o.write_exits / o.writes,
                           kvm_us=1e6 * o.run_seconds / o.writes,
                           sim_cycles=trap.modelled_cycles // trap.writes)
