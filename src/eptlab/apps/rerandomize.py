"""Periodic re-randomization of the layout: the hypervisor migrates a guest-physical window.

Every ``period`` cycles of modelled time the hypervisor moves every backed EPT page of the
window to a fresh host block (the layout's random choice again; for ``linear``, the window
moves as a whole to a new random base, so an offset learned before no longer applies): it
kicks each vCPU out (one exit each), takes a block, copies the page, rewrites the EPT leaf,
releases the old block, and shoots the TLBs down (INVEPT on each vCPU). What the guest then
pays in TLB misses is counted where the guest runs (:class:`eptlab.apps.prime_probe.Machine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arch.bits import PAGE_SIZE, PageSize
from ..costs import active_profile
from ..errors import ConfigError
from .ept_layout import LaidOutVm

_2M = int(PageSize.SIZE_2M)


@dataclass
class MigrationCounts:
    """What the migrations did, summed."""

    migrations: int = 0
    pages: int = 0  # EPT pages moved (of their own size)
    bytes_copied: int = 0
    ept_edits: int = 0
    frames_allocated: int = 0
    exits: int = 0
    invepts: int = 0

    def cycles(self) -> int:
        """Their price in the active cost profile (exits, copies, EPT edits, allocations,
        per-page migration bookkeeping, INVEPTs)."""
        p = active_profile()
        return round(
            self.exits * p["vmexit_cycles"]
            + self.bytes_copied / p["copy_bytes_per_cycle"]
            + self.ept_edits * p["ept_edit_cycles"]
            + self.frames_allocated * p["frame_alloc_cycles"]
            + self.pages * p["page_migration_cycles"]
            + self.invepts * p["invept_cycles"]
        )


class Rerandomizer:
    """Moves the backed pages of ``[start, start + length)`` every ``period`` cycles."""

    def __init__(self, laid: LaidOutVm, start: int, length: int, period: int, *, seed: int) -> None:
        if period <= 0:
            raise ConfigError("rerandomize_ms", f"a period of {period} cycles is not positive")
        if start % _2M or length <= 0:
            raise ConfigError("window", f"{start:#x}+{length:#x} is not a 2 MiB-aligned window")
        self.laid, self.start, self.length, self.period = laid, start, length, period
        self.next = period
        self.counts = MigrationCounts()
        self.rng = np.random.default_rng([seed, 0x4E4D])

    def due(self, now: int) -> bool:
        """Whether a migration is due at modelled time ``now``."""
        return now >= self.next

    def migrate(self) -> int:
        """Move every backed page of the window; returns the cycles it took."""
        before = self.counts.cycles()
        vm = self.laid.vm
        ept, host = vm.ept, vm.hv.host
        base = None
        if self.laid.layout.randomized_from is None:  # linear: the window moves as a whole
            low, high = host.frames.size // 4, host.frames.size // 2 - self.length
            base = low + int(self.rng.integers((high - low) // _2M)) * _2M
        for gpa, leaf in list(ept.leaves(self.start, self.length)):
            size = leaf.page_size
            old = leaf.target
            new = host.alloc(size, at=None if base is None else base + gpa - self.start)
            for i in range(size // PAGE_SIZE):
                host.memory.copy_frame((old >> 12) + i, (new >> 12) + i)
            ept.unmap(gpa)
            ept.tables.map(gpa, new, size)
            self.counts.pages += 1
            self.counts.bytes_copied += int(size)
            self.counts.ept_edits += 1
            self.counts.frames_allocated += 1
        self.counts.exits += len(vm.vcpus)
        self.counts.invepts += len(vm.vcpus)
        vm.shootdown()
        self.counts.migrations += 1
        self.next += self.period
        return self.counts.cycles() - before
