"""A prime+probe attacker that has to measure: the hardware it times, and what it may know.

The exact-posterior :class:`~eptlab.apps.cache_attacker.Attacker` is handed one set index per
reference. This one is handed nothing of the host: it holds a :class:`Knowledge` (public facts,
its own buffer's virtual addresses) and an :class:`Oracle` (time its own accesses, let the victim
run). The :class:`Machine` behind the oracle (the guest, the victim, the EPT and the cache model
of :mod:`eptlab.apps.cache_sim`) is never handed to it.

Same-core setting of AnC (the victim's access runs on the attacker's vCPU after the attacker
flushed the TLBs and paging-structure caches): each victim round is the victim's read of its
secret plus ``victim_lines`` reads of random lines of its own working set, each with its full
two-dimensional walk (guest and EPT entries: the reference walker's addresses), all through the
cache model. The attacker's own accesses go through it too; under a 4 KiB EPT layout each of
them also reads its EPT leaf entry (its buffer's translations do not fit the TLB), an assumed
simplification of its walk in which the paging-structure caches supply every other level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.access import Access
from ..arch.bits import PAGE_SIZE, PageSize
from ..errors import ConfigError
from ..guest import DIRECT_MAP_BASE
from ..mmu.walker import ReferenceWalker
from .cache_attacker import Probe, Target, Victim, VictimAccess
from .cache_sim import CacheSim
from .ept_layout import EptLayout
from .rerandomize import Rerandomizer

CHUNK = int(PageSize.SIZE_2M)  # the attacker's buffer is made of 2 MiB-aligned guest chunks
LINES_PER_PAGE = PAGE_SIZE >> 6


@dataclass(frozen=True)
class Knowledge:
    """Everything the prime+probe attacker is given: the secret's geometry (not its slot), the
    layout policy and, for ``linear``, its offset (learned from its own pages, as the exact
    attacker's), the shape of the victim's walk (``probes``: no addresses), the published slice
    hash and cache geometry and latencies, and its own buffer (``chunks`` 2 MiB chunks from
    ``buffer_gva`` in the direct map, so it knows their guest-physical addresses too)."""

    target: Target
    layout: EptLayout
    offset: int | None
    probes: tuple[Probe, ...]
    slice_hash: str
    l1_ways: int
    llc_sets: int
    llc_ways: int
    latencies: tuple[int, int, int, int]  # L1, L2, LLC, DRAM hit, in cycles
    chunk_gvas: tuple[int, ...]

    @property
    def chunks(self) -> int:
        """How many 2 MiB chunks the buffer has."""
        return len(self.chunk_gvas)

    def line(self, chunk: int, offset: int) -> int:
        """The GVA at byte ``offset`` of buffer chunk ``chunk``."""
        if not 0 <= chunk < self.chunks or not 0 <= offset < CHUNK:
            raise ConfigError("buffer", f"chunk {chunk} offset {offset:#x} is outside the buffer")
        return self.chunk_gvas[chunk] + offset


class Machine:
    """The simulated hardware and guest under attack: the victim's VM, the cache model, the
    modelled clock (cycles of every access, the attacker's and the victim's, and of the
    hypervisor's migrations) and an optional :class:`Rerandomizer`."""

    def __init__(
        self,
        victim: Victim,
        sim: CacheSim,
        chunks: int,
        *,
        victim_lines: int,
        working_set: int = 16,
        seed: int = 0,
        rerandomizer: Rerandomizer | None = None,
    ) -> None:
        if victim_lines < 0:
            raise ConfigError("victim_lines", f"{victim_lines} is negative")
        self.victim, self.sim, self.rerandomizer = victim, sim, rerandomizer
        self.victim_lines = victim_lines
        self.rng = np.random.default_rng([seed, 0x71C7])
        self.clock = 0
        self.accesses = 0
        self.rounds = 0
        self.tlb_misses_after_migration = 0
        vm = victim.laid.vm
        self._four_k = victim.laid.layout.page == PageSize.SIZE_4K
        self._labels: dict[int, tuple[int, int]] = {}  # GVA line -> (label, EPT entry label)
        self._leaves: dict[int, int] = {}  # EPT page number -> HPA - GPA
        vcpu = vm.vcpus[0]
        kernel = victim.kernel
        # the attacker's buffer: 2 MiB blocks from the guest kernel (a huge-page mapping)
        self.chunk_gpas = tuple(kernel.frames.alloc(PageSize.SIZE_2M) for _ in range(chunks))
        self._chunk_set = {gpa // CHUNK for gpa in self.chunk_gpas}
        self._pages = [kernel.frames.alloc(PageSize.SIZE_4K) for _ in range(working_set)]
        for gpa in self._pages:  # the victim's working set, backed and in the direct map
            vcpu.write_u64(DIRECT_MAP_BASE + gpa, 1)
        self._walker = ReferenceWalker(vm.hv.host.memory, vcpu.guest, vcpu.vmcs, vm.hv.features)
        self._walks: dict[int, VictimAccess] = {}
        self._migrated = False

    # -- the attacker's side (through the Oracle) ---------------------------------------------

    def _hpa(self, gpa: int) -> int:
        """The HPA of ``gpa`` (backing its page on first touch, as the guest's touch would),
        looked up once per EPT page."""
        key = gpa >> 12 if self._four_k else gpa >> 21
        delta = self._leaves.get(key)
        if delta is None:
            vm = self.victim.laid.vm
            vm.host_address(gpa)  # lazy backing
            leaf = vm.ept.lookup(gpa)
            assert leaf is not None
            delta = leaf.target - gpa
            self._leaves[key] = delta
        return gpa + delta

    def _label(self, gva: int) -> tuple[int, int]:
        got = self._labels.get(gva)
        if got is None:
            gpa = gva - DIRECT_MAP_BASE
            if gpa // CHUNK not in self._chunk_set:
                raise ConfigError("gva", f"{gva:#x} is not in the attacker's buffer")
            data = self.sim.label(self._hpa(gpa))  # backs the page first
            ept = self.sim.label(self.victim.laid.vm.ept.leaf_slot(gpa)) if self._four_k else -1
            got = (data, ept)
            self._labels[gva] = got
        return got

    @property
    def chunk_gvas(self) -> tuple[int, ...]:
        """Where the attacker's buffer chunks are in the direct map."""
        return tuple(DIRECT_MAP_BASE + gpa for gpa in self.chunk_gpas)

    def time(self, gvas: Sequence[int]) -> list[int]:
        """Perform the attacker's reads of ``gvas`` in order; each one's latency."""
        known = self._labels
        pairs = [known.get(gva) or self._label(gva) for gva in gvas]  # (data, EPT leaf)
        order = np.array(pairs, np.int64).reshape(-1, 2)[:, ::-1]  # the EPT leaf's read first
        cycles = self.sim.latencies(order.ravel()).reshape(-1, 2).sum(axis=1)  # -1: no read
        out: list[int] = cycles.tolist()
        self.clock += int(cycles.sum())
        self.accesses += len(out)
        return out

    # -- the victim's side ----------------------------------------------------------------------

    def _walk(self, gva: int) -> VictimAccess:
        page = gva & ~(PAGE_SIZE - 1)
        got = self._walks.get(page)
        if got is None:
            got = VictimAccess.from_translation(self._walker.translate(page, Access.READ))
            self._walks[page] = got
        return got

    def victim_round(self) -> None:
        """The victim's read of its secret and of ``victim_lines`` random lines of its working
        set, each walked in full; a migration first if one is due."""
        if self.rerandomizer is not None and self.rerandomizer.due(self.clock):
            self.clock += self.rerandomizer.migrate()
            self._walks.clear()
            self._migrated = True
        target = self.victim.target
        gvas = [target.gva(self.victim.slot)]
        pages = self.rng.integers(len(self._pages), size=self.victim_lines)
        lines = self.rng.integers(LINES_PER_PAGE, size=self.victim_lines)
        gvas += [DIRECT_MAP_BASE + self._pages[p] + 64 * int(k) for p, k in
                 zip(pages, lines, strict=True)]
        if self._migrated:  # the INVEPT dropped every translation: each page walks again
            self.tlb_misses_after_migration += len({g & ~(PAGE_SIZE - 1) for g in gvas})
            self._migrated = False
        label = self.sim.label
        reads: list[int] = []
        for gva in gvas:
            walk = self._walk(gva)
            reads += [label(hpa) for hpa in walk.hpas[1:]]  # the walk's references, then data
            reads.append(label(walk.hpas[0] + (gva & (PAGE_SIZE - 1))))
        self.clock += int(self.sim.latencies(np.array(reads, np.int64)).sum())
        self.rounds += 1


class Oracle:
    """What the attacker may do to the machine: time its own reads, let the victim run, read
    the clock. Holds the machine privately; the attacker's code never reaches through it."""

    __slots__ = ("_machine",)

    def __init__(self, machine: Machine) -> None:
        self._machine = machine

    def time(self, gvas: Sequence[int]) -> list[int]:
        """Latency of each of the attacker's reads of ``gvas`` (its own buffer only)."""
        return self._machine.time(gvas)

    def trigger(self) -> None:
        """Make the victim run once (after flushing the TLBs, as AnC does)."""
        self._machine.victim_round()

    def now(self) -> int:
        """The modelled time stamp counter, in cycles."""
        return self._machine.clock


B = npt.NDArray[np.bool_]
F64 = npt.NDArray[np.float64]
