"""aslr-side-channel, the measured attacker: prime+probe through the cache model, and periodic
re-randomization of the layout (rows of :mod:`eptlab.experiments.aslr_side_channel`).

For each target, layout policy and slice hash, ``pp_trials`` trials (the same secrets and
layouts as the exact attacker's first trials): boot the victim's VM with the attacker's buffer,
let the :class:`~eptlab.apps.pp_attacker.PrimeProbeAttacker` build its eviction sets and observe
``max(observations)`` victim rounds, and score its ranking of the candidates against the secret
it never saw. With ``rerandomize_ms``, more rows (first target and slice hash) where the
hypervisor moves the secret's window every period of modelled time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..apps.cache_attacker import Target, Victim
from ..apps.cache_sim import CacheSim
from ..apps.ept_layout import EptLayout
from ..apps.pp_attacker import PrimeProbeAttacker, rank_of
from ..apps.prime_probe import CHUNK, Knowledge, Machine, Oracle
from ..apps.rerandomize import MigrationCounts, Rerandomizer
from ..costs import active_profile
from ..errors import ConfigError

WORKING_SET = 16  # 4 KiB pages the victim's other reads fall in
MEASURED_COLUMNS = (
    "guessing_bits", "success_rate", "evsets", "l1_sets", "build_accesses",
    "probe_cycles_per_round", "migrations", "pages_migrated", "bytes_copied", "migration_exits",
    "invepts", "tlb_misses", "rerandomize_cycles", "rerandomize_overhead_pct",
)


def buffer_chunks(slice_hash: CacheSim | str, ways: int) -> int:
    """2 MiB chunks of the attacker's buffer: twice the ways per slice, so that each slice's
    class of chunks can hold an eviction set."""
    sim = slice_hash if isinstance(slice_hash, CacheSim) else CacheSim(slices=slice_hash)
    return 2 * ways * sim.slices.slices


def ms_to_cycles(ms: float) -> int:
    """Modelled milliseconds in cycles at the profile's clock."""
    return round(ms * 1e6 * active_profile()["clock_ghz"])


@dataclass
class MeasuredTally:
    """Sums over trials, per checkpoint: expected rank and first-guess success; plus what the
    attack and the migrations did."""

    trials: int = 0
    rank: dict[int, float] = field(default_factory=dict)
    success: dict[int, float] = field(default_factory=dict)
    evsets: int = 0
    l1_sets: int = 0
    build_accesses: int = 0
    cycles_per_round: float = 0.0
    modelled_cycles: int = 0
    migrations: MigrationCounts = field(default_factory=MigrationCounts)
    tlb_misses: int = 0

    def add(self, k: int, rank: float, success: float) -> None:
        self.rank[k] = self.rank.get(k, 0.0) + rank
        self.success[k] = self.success.get(k, 0.0) + success

    def add_counts(self, counts: MigrationCounts) -> None:
        for name in counts.__dataclass_fields__:
            setattr(self.migrations, name,
                    getattr(self.migrations, name) + getattr(counts, name))

    def row(self, k: int) -> dict[str, Any]:
        """The measured columns at checkpoint ``k`` (means over trials)."""
        n = max(1, self.trials)
        p = active_profile()
        tlb_cycles = self.tlb_misses * p["walk_penalty_4k_cycles"]
        spent = self.migrations.cycles() + tlb_cycles
        return {
            "guessing_bits": round(float(np.log2(self.rank[k] / n)), 4),
            "success_rate": round(self.success[k] / n, 6),
            "evsets": round(self.evsets / n, 1),
            "l1_sets": round(self.l1_sets / n, 1),
            "build_accesses": round(self.build_accesses / n),
            "probe_cycles_per_round": round(self.cycles_per_round / n),
            "migrations": round(self.migrations.migrations / n, 2),
            "pages_migrated": round(self.migrations.pages / n, 2),
            "bytes_copied": round(self.migrations.bytes_copied / n),
            "migration_exits": round(self.migrations.exits / n, 2),
            "invepts": round(self.migrations.invepts / n, 2),
            "tlb_misses": round(self.tlb_misses / n, 2),
            "rerandomize_cycles": round(spent / n),
            "rerandomize_overhead_pct": round(100 * spent / max(1, self.modelled_cycles), 4),
        }


def measured_trial(
    target: Target,
    policy: str,
    slice_hash: str,
    slot: int,
    layout_seed: int,
    *,
    checkpoints: tuple[int, ...],
    victim_lines: int,
    period_ms: float,
    tally: MeasuredTally,
) -> None:
    """One trial: boot, build, observe, rank; added to ``tally``."""
    if period_ms < 0:
        raise ConfigError("rerandomize_ms", f"{period_ms} is negative")
    layout = EptLayout.named(policy)
    sim = CacheSim(slices=slice_hash)
    config = sim.config
    chunks = buffer_chunks(sim, config.llc.ways)
    victim = Victim.boot(layout, target, slot, seed=layout_seed,
                         extra_memory=(chunks + WORKING_SET) * CHUNK)
    rerandomizer = None
    if period_ms > 0:
        rerandomizer = Rerandomizer(victim.laid, target.window, target.size,
                                    ms_to_cycles(period_ms), seed=layout_seed)
    machine = Machine(victim, sim, chunks, victim_lines=victim_lines,
                      working_set=WORKING_SET, seed=layout_seed, rerandomizer=rerandomizer)
    probes = victim.access().probes  # the walk's shape: which references, no addresses
    know = Knowledge(
        target, layout, victim.laid.offset, probes, slice_hash, config.l1.ways,
        config.llc.sets, config.llc.ways, sim.latency, machine.chunk_gvas,
    )
    attacker = PrimeProbeAttacker(know, Oracle(machine))
    attacker.build()
    tally.build_accesses += machine.accesses
    machine.clock = 0  # the hypervisor's period runs from the first observation
    rounds = max(checkpoints)
    l1, llc, times = attacker.observe(rounds)
    predicted = attacker.predictions()
    for k in checkpoints:
        rank, success = rank_of(attacker.scores(l1, llc, k, predicted), slot)
        tally.add(k, rank, success)
    tally.trials += 1
    tally.evsets += len(attacker.evsets)
    tally.l1_sets += len(attacker.l1_sets)
    tally.cycles_per_round += (times[-1] / rounds) if rounds else 0.0
    tally.modelled_cycles += machine.clock
    tally.tlb_misses += machine.tlb_misses_after_migration
    if rerandomizer is not None:
        tally.add_counts(rerandomizer.counts)
