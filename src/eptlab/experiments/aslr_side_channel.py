"""aslr-side-channel: how much of a guest's physical-address randomization does an AnC-style
cache attacker in the guest recover under each EPT layout, and what does each layout cost?

Threat model (:mod:`eptlab.apps.cache_attacker`): code in the guest makes a victim read its
secret (a region at a random guest-physical slot: 4 KiB slots, ``target=4k``, or 2 MiB slots like
a physically randomized kernel image, ``target=2m``) through the direct map, with every
translation cache flushed, and prime+probes a physically indexed LLC whose set index is HPA bits
6..6+log2(llc_sets)-1. Each measurement gives the set index of every reference of the walk and
of the data access, each one wrong (a random set) with probability ``noise``. The attacker knows
the hypervisor's layout policy (and a linear layout's offset) but not its random choices.

For each target, layout and trial, a real VM is booted with the layout (random host frames
from the frame allocator in random mode, seeded per trial), a guest kernel places the secret at
a random slot and touches it, and the reference walker makes the victim's walk: the set indices
come from the host-physical addresses it read. The attacker's posterior over the ``2**secret_bits``
slots after k measurements gives ``entropy_bits_after`` (Shannon entropy, averaged over trials)
and ``success_rate`` (probability that its best guess is the secret, averaged over trials).
Channel ``data`` uses only the data access's set index (the part the EPT layout controls);
``walk+data`` adds every page-walk reference, whose in-page line offset comes from table
indices (address bits of what is translated: the classic AnC leak, which no layout hides).

Attacker ``exact`` (above) runs at ``noise`` and at noise 0, the upper bound. Attacker
``prime+probe`` (:mod:`eptlab.experiments.aslr_measured`) is handed no set index: it builds its
eviction sets from its own timings through the engine's cache model (optionally with an LLC
slice hash), primes, lets the victim (and its walks, and ``victim_lines`` other reads) run,
probes, and ranks the slots; ``rerandomize_ms`` adds rows where the hypervisor moves the
secret's window every period of modelled time.

Costs: the same layouts back a guest whose process runs ``workload`` over ``footprint_mib``
(pre-faulted, ``guest_page`` guest pages) through the fast engine with the default MMU model;
``random-4k`` cannot use 2 MiB EPT pages, so the TLBs hold 4 KiB translations.

Columns:

| column | meaning |
|---|---|
| attacker | `exact` (handed set indices) or `prime+probe` (measures through the cache model) |
| policy | EPT layout: `linear`, `random-2m`, `random-4k` |
| ept_page | EPT page size the layout backs guest memory with |
| target | granule of the secret's slots (`4k`, `2m`) |
| channel | `data` or `walk+data` (exact); `l1+llc` (prime+probe) |
| llc_sets, index_bits | sets of the probed cache and the HPA bits of its set index |
| noise | probability that one observed set index is wrong (exact; 0 is the bound) |
| slice_hash | LLC slice hash of the prime+probe model (`off`, `maurice-N`) |
| rerandomize_ms | period of the window's migration (0: none) |
| observations | measurements the attacker made (k) |
| trials | random secrets and layouts averaged over |
| entropy_bits_before | log2 of the number of slots |
| entropy_bits_after | Shannon entropy of the attacker's posterior after k measurements (mean) |
| success_rate | probability that the attacker's best guess is the secret (mean) |
| guessing_bits | log2 of the secret's mean expected rank in the attacker's order of guesses |
| evsets, l1_sets | eviction sets the prime+probe attacker built (LLC column, L1) |
| build_accesses, probe_cycles_per_round | its accesses to build them; modelled cycles per round |
| migrations, pages_migrated, bytes_copied | re-randomization per trial: moves, pages, bytes |
| migration_exits, invepts, tlb_misses | its exits, INVEPTs and the victim's TLB misses after |
| rerandomize_cycles, rerandomize_overhead_pct | their price; share of the modelled time |
| tlb_miss_rate | the layout's cost: walks per access on the workload |
| walk_refs_per_access | paging-structure references (guest + EPT) per access |
| cycles_per_access | cost-model cycles per access (translation + data) |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.cache_attacker import (
    CHANNELS,
    Attacker,
    NoiseDraws,
    SetIndex,
    Target,
    Victim,
    observe,
)
from ..apps.cache_sim import CacheSim
from ..apps.ept_layout import LAYOUTS, EptLayout
from ..apps.llc_slices import SLICE_HASHES
from ..errors import ConfigError
from ..memory.layout import check_layout, in_layout
from ..mmu.config import CacheConfig
from ..workloads import WORKLOADS, make_workload
from .aslr_cost import LayoutCost, measure_cost
from .aslr_measured import MEASURED_COLUMNS, MeasuredTally, measured_trial
from .aslr_readings import cost_figure, entropy_figure, measured_figure, measured_readings
from .base import Progress, Row, check_choices
from .intervals import (
    OVERLAP,
    by_seed,
    change,
    interval,
    ratio,
    summarize,
    times,
)

DEFAULT_SETS = CacheConfig().llc.sets
ATTACKERS = ("exact", "prime+probe")
MAX_PROBES = 64  # references of one walk: at most 1 + 5 * 6 + 5 = 36


@dataclass(frozen=True)
class AslrSideChannelParams:
    def validate(self) -> None:
        """See :func:`check` (before anything runs)."""
        check_choices("workload", self.workload, WORKLOADS)
        check_choices("policies", self.policies, LAYOUTS)
        check(self)

    policies: tuple[str, ...] = LAYOUTS
    targets: tuple[str, ...] = ("4k", "2m")
    secret_bits: int = 12
    llc_sets: tuple[int, ...] = (DEFAULT_SETS, DEFAULT_SETS * 8)
    channels: tuple[str, ...] = CHANNELS
    observations: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)
    noise: float = 0.8
    trials: int = 100
    workload: str = "random"
    footprint_mib: int = 256
    accesses: int = 200_000
    warmup: int = 50_000
    guest_page: str = "2m"
    attackers: tuple[str, ...] = ATTACKERS
    slice_hashes: tuple[str, ...] = ("off", "maurice-8")  # the prime+probe attacker's LLC
    pp_trials: int = 3  # trials of the prime+probe attacker (the first of ``trials``' secrets)
    victim_lines: int = 4  # other lines the victim reads in each round (with their walks)
    rerandomize_ms: tuple[float, ...] = (0.5,)  # periods of the re-randomization rows
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


def check(p: AslrSideChannelParams) -> None:
    """Raise :class:`ConfigError` for any impossible parameter (before anything runs)."""
    for policy in p.policies:
        EptLayout.named(policy)
    if not p.policies:
        raise ConfigError("policies", f"choose from {', '.join(LAYOUTS)}")
    for target in p.targets:
        if target not in ("4k", "2m"):
            raise ConfigError("targets", f"{target!r} is not 4k or 2m")
        Target.named(target, p.secret_bits)
    if not p.targets:
        raise ConfigError("targets", "choose 4k and/or 2m")
    for sets in p.llc_sets:
        SetIndex(sets)
    if not p.llc_sets:
        raise ConfigError("llc_sets", "give at least one set count")
    if not p.channels or any(c not in CHANNELS for c in p.channels):
        raise ConfigError("channels", f"{p.channels}: choose from {', '.join(CHANNELS)}")
    if not p.observations or min(p.observations) < 0:
        raise ConfigError("observations", "give non-negative measurement counts")
    if not 0.0 <= p.noise <= 1.0:
        raise ConfigError("noise", f"{p.noise} is not a probability")
    if p.trials < 1:
        raise ConfigError("trials", f"{p.trials} is not positive")
    if p.footprint_mib < 2 or p.footprint_mib % 2:
        raise ConfigError("footprint_mib", f"{p.footprint_mib} is not a positive multiple of 2")
    if p.accesses < 1 or p.warmup < 0:
        raise ConfigError("accesses/warmup", "need accesses >= 1 and warmup >= 0")
    if p.guest_page not in ("4k", "2m"):
        raise ConfigError("guest_page", f"{p.guest_page!r} is not 4k or 2m")
    make_workload(p.workload, footprint=p.footprint_mib << 20, seed=p.seed)
    check_measured(p)


def check_measured(p: AslrSideChannelParams) -> None:
    """The prime+probe and re-randomization parameters (see :func:`check`)."""
    if not p.attackers or any(a not in ATTACKERS for a in p.attackers):
        raise ConfigError("attackers", f"{p.attackers}: choose from {', '.join(ATTACKERS)}")
    if not p.slice_hashes:
        raise ConfigError("slice_hashes", f"choose from {', '.join(SLICE_HASHES)}")
    for name in p.slice_hashes:
        CacheSim(slices=name)  # a known hash, invertible on the LLC's geometry
    if p.pp_trials < 1:
        raise ConfigError("pp_trials", f"{p.pp_trials} is not positive")
    if p.pp_trials > p.trials:
        raise ConfigError("pp_trials", f"{p.pp_trials} is more than trials ({p.trials})")
    if not 0 <= p.victim_lines <= 1024:
        raise ConfigError("victim_lines", f"{p.victim_lines} is not in 0..1024")
    if any(not 0 < ms <= 1000 for ms in p.rerandomize_ms):
        raise ConfigError("rerandomize_ms", f"{p.rerandomize_ms}: periods must be in (0, 1000]")


# -- the attack -----------------------------------------------------------------------------


TallyKey = tuple[int, str, float, int]  # llc_sets, channel, noise, observations


@dataclass
class AttackTally:
    """Sums over trials of entropy left, success and expected rank, by (llc_sets, channel,
    noise, observations)."""

    trials: int = 0
    entropy: dict[TallyKey, float] = field(default_factory=dict)
    success: dict[TallyKey, float] = field(default_factory=dict)
    rank: dict[TallyKey, float] = field(default_factory=dict)

    def add(self, key: TallyKey, entropy: float, success: float, rank: float = 1.0) -> None:
        self.entropy[key] = self.entropy.get(key, 0.0) + entropy
        self.success[key] = self.success.get(key, 0.0) + success
        self.rank[key] = self.rank.get(key, 0.0) + rank

    def mean(self, key: TallyKey) -> tuple[float, float, float]:
        """Mean entropy, mean success, log2 of the mean rank (guessing entropy in bits)."""
        n = self.trials
        return self.entropy[key] / n, self.success[key] / n, float(np.log2(self.rank[key] / n))


def trial_seeds(
    p: AslrSideChannelParams, target: Target, policy: str, trial: int
) -> tuple[int, np.random.Generator, int]:
    """The secret's slot and the measurement noise depend on (seed, target, trial) only, so
    every layout faces the same secrets and the same noise; the layout's own randomness (host
    frames, linear offset, guest KASLR) depends on the policy too."""
    shared = np.random.default_rng([p.seed, target.granule.bit_length(), trial])
    slot = int(shared.integers(1 << target.bits))
    layout_seed = int(
        np.random.default_rng([p.seed, target.granule.bit_length(), trial,
                               LAYOUTS.index(policy)]).integers(1 << 31)
    )
    return slot, shared, layout_seed


def noises(p: AslrSideChannelParams) -> tuple[float, ...]:
    """The exact attacker's noise levels: ``noise``, and 0 (the upper bound) besides."""
    return (p.noise,) if p.noise == 0 else (p.noise, 0.0)


def attack(
    p: AslrSideChannelParams, target: Target, policy: str, progress: Progress | None = None
) -> AttackTally:
    """Every trial of one target under one layout: boot, place, walk, measure, infer."""
    layout = EptLayout.named(policy)
    checkpoints = tuple(p.observations)
    count = max(checkpoints)
    tally = AttackTally()
    for trial in range(p.trials):
        slot, shared, layout_seed = trial_seeds(p, target, policy, trial)
        victim = Victim.boot(layout, target, slot, seed=layout_seed)
        access = victim.access()
        draws = NoiseDraws.draw(shared, count, MAX_PROBES, p.noise)
        for noise in noises(p):
            # the noiseless attacker (the bound) sees the same measurements, none flipped
            flips = draws if noise else NoiseDraws(np.zeros_like(draws.flips), draws.values)
            for sets in p.llc_sets:
                index = SetIndex(sets)
                observations = observe(access, index, flips)
                for channel in p.channels:
                    attacker = Attacker(
                        target, layout, victim.laid.offset, index, access.probes,
                        channel=channel, noise=noise,
                    )
                    for belief in attacker.beliefs(observations, checkpoints):
                        key = (sets, channel, noise, belief.observations)
                        tally.add(key, belief.entropy_bits, belief.success(slot),
                                  belief.rank(slot))
        tally.trials += 1
        if progress is not None:
            progress(trial + 1, p.trials)
    return tally


# -- the experiment -------------------------------------------------------------------------


def exact_view(table: pd.DataFrame, p: AslrSideChannelParams) -> pd.DataFrame:
    """The exact attacker's rows at ``noise`` (what the exact readings and figure show)."""
    if "attacker" not in table:
        return table
    return table[(table.attacker == "exact") & (table.noise == p.noise)]


def measured_runs(
    p: AslrSideChannelParams, targets: list[Target]
) -> list[tuple[Target, str, str, float]]:
    """(target, policy, slice hash, re-randomization period) of each prime+probe run: every
    target, policy and hash without re-randomization; the periods for the first target."""
    runs = [(t, policy, h, 0.0) for t in targets for policy in p.policies
            for h in p.slice_hashes]
    runs += [(targets[0], policy, h, ms) for ms in p.rerandomize_ms
             for policy in p.policies for h in p.slice_hashes]
    return runs


def _row(
    p: AslrSideChannelParams, target: Target, policy: str, cost: LayoutCost, k: int, trials: int
) -> Row:
    """Every column, in order (the exact attacker's defaults; NaN where not measured)."""
    nan = float("nan")
    row: Row = {
        "attacker": "exact",
        "policy": policy,
        "ept_page": cost.ept_page,
        "target": target.label,
        "channel": "",
        "llc_sets": 0,
        "index_bits": "",
        "noise": nan,
        "slice_hash": "off",
        "rerandomize_ms": 0.0,
        "observations": k,
        "trials": trials,
        "entropy_bits_before": float(target.bits),
        "entropy_bits_after": nan,
    }
    row.update(dict.fromkeys(MEASURED_COLUMNS, nan))
    row.update(
        tlb_miss_rate=round(cost.tlb_miss_rate, 5),
        walk_refs_per_access=round(cost.walk_refs_per_access, 3),
        cycles_per_access=round(cost.cycles_per_access, 2),
    )
    return row



class AslrSideChannel:
    name: ClassVar[str] = "aslr-side-channel"
    question: ClassVar[str] = (
        "How many bits of a guest's physical-address randomization does an AnC-style LLC "
        "attacker in the guest recover under a linear, a 2 MiB-randomized and a "
        "4 KiB-randomized EPT layout, and what does each layout cost in TLB misses, walk "
        "references and cycles?"
    )
    Params: ClassVar[type] = AslrSideChannelParams
    demo: ClassVar[dict[str, str]] = {
        "trials": "12", "footprint_mib": "32", "accesses": "30000", "warmup": "10000",
        "seeds": "3", "pp_trials": "1",
    }
    keys: ClassVar[tuple[str, ...]] = (
        "attacker", "policy", "ept_page", "target", "channel", "llc_sets", "index_bits",
        "noise", "slice_hash", "rerandomize_ms", "observations", "trials",
    )

    def rows(self, params: AslrSideChannelParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: AslrSideChannelParams, progress: Progress) -> Iterator[Row]:
        check(params)
        targets = [Target.named(t, params.secret_bits) for t in params.targets]
        exact = "exact" in params.attackers
        runs = measured_runs(params, targets) if "prime+probe" in params.attackers else []
        total = len(params.policies) * (1 + len(targets) * params.trials * exact) + len(
            runs) * params.pp_trials
        done = 0
        progress(done, total)
        costs: dict[str, LayoutCost] = {}
        for policy in params.policies:
            costs[policy] = measure_cost(params, policy)
            done += 1
            progress(done, total)
        for target in targets if exact else []:
            for policy in params.policies:
                base = done

                def report(d: int, _n: int, base: int = base) -> None:
                    progress(base + d, total)

                tally = attack(params, target, policy, report)
                done += params.trials
                yield from self._rows(params, target, policy, tally, costs[policy])
        checkpoints = tuple(params.observations)
        for target, policy, slice_hash, period in runs:
            measured = MeasuredTally()
            for trial in range(params.pp_trials):
                slot, _, layout_seed = trial_seeds(params, target, policy, trial)
                measured_trial(target, policy, slice_hash, slot, layout_seed,
                               checkpoints=checkpoints, victim_lines=params.victim_lines,
                               period_ms=period, tally=measured)
                done += 1
                progress(done, total)
            for k in params.observations:
                row = _row(params, target, policy, costs[policy], k, measured.trials)
                row.update(attacker="prime+probe", channel="l1+llc", llc_sets=DEFAULT_SETS,
                           index_bits=SetIndex(DEFAULT_SETS).label, noise=float("nan"),
                           slice_hash=slice_hash, rerandomize_ms=period,
                           entropy_bits_after=float("nan"), **measured.row(k))
                yield row

    @staticmethod
    def _rows(
        p: AslrSideChannelParams, target: Target, policy: str, tally: AttackTally,
        cost: LayoutCost,
    ) -> Iterator[Row]:
        for noise in noises(p):
            for channel in p.channels:
                for sets in p.llc_sets:
                    for k in p.observations:
                        entropy, success, guessing = tally.mean((sets, channel, noise, k))
                        row = _row(p, target, policy, cost, k, tally.trials)
                        row.update(channel=channel, llc_sets=sets, noise=noise,
                                   index_bits=SetIndex(sets).label,
                                   entropy_bits_after=round(entropy, 4),
                                   success_rate=round(success, 6),
                                   guessing_bits=round(guessing, 4))
                        yield row

    def interpret(self, table: pd.DataFrame, params: AslrSideChannelParams) -> list[str]:
        measured = measured_readings(table)
        table = exact_view(table, params)
        if not len(table):
            return measured
        return self._exact_readings(table, params) + measured

    def _exact_readings(self, table: pd.DataFrame, params: AslrSideChannelParams) -> list[str]:
        last = table[table.observations == table.observations.max()]
        sets = last.llc_sets.min()
        target = "4k" if "4k" in set(last.target) else last.target.iloc[0]
        view = last[(last.llc_sets == sets) & (last.target == target)]
        k = int(last.observations.iloc[0])
        policies = list(dict.fromkeys(view.policy))
        out = []
        data = {p: r for p in policies if len(r := by_seed(view, channel="data", policy=p))}
        if data:
            left = ", ".join(
                f"{interval(r.entropy_bits_after).text()} under {name} (success "
                f"{interval(r.success_rate).scaled(100).text('{:.0f}', '%')})"
                for name, r in data.items()
            )
            out.append(
                f"After {k} noisy observations of the cache set of the target's data line (set "
                f"index from host bits {view.index_bits.iloc[0]}), the attacker is left with, of "
                f"{params.secret_bits} secret bits ({target} target): {left}."
            )
            entropies = [interval(r.entropy_bits_after) for r in data.values()]
            if len(entropies) > 1 and all(a.overlaps(b) for a in entropies for b in entropies):
                out[-1] = out[-1][:-1] + f": {OVERLAP} between the layouts."
        walk = by_seed(view, channel="walk+data", policy="random-4k")
        if len(walk) and "random-4k" in data:
            bits = change(
                "random-4k's entropy left",
                interval(data["random-4k"].entropy_bits_after),
                interval(walk.entropy_bits_after),
            )
            out.append(
                f"Adding the page-walk references: {bits} bits; the EPT leaf is read at a cache "
                f"line chosen by guest-physical bits, wherever the hypervisor placed the data "
                f"frame."
            )
        one = view[view.channel == view.channel.iloc[0]]
        lin, r4k = by_seed(one, policy="linear"), by_seed(one, policy="random-4k")
        if len(lin) and len(r4k):
            more = ratio(r4k.cycles_per_access, lin.cycles_per_access)
            misses = change(
                "the TLB miss rate",
                interval(lin.tlb_miss_rate).scaled(100),
                interval(r4k.tlb_miss_rate).scaled(100),
                "{:.1f}",
                "%",
            )
            cycles = change(
                "cycles per access",
                interval(lin.cycles_per_access),
                interval(r4k.cycles_per_access),
            )
            out.append(
                f"The price: random-4k forbids 2 MiB EPT pages; linear to random-4k: {misses}, "
                f"{cycles} ({times(more, 'as many')})."
            )
        return out

    def figures(self, table: pd.DataFrame, params: AslrSideChannelParams) -> dict[str, Figure]:
        summary = summarize(table, self.keys)
        out = {}
        exact = exact_view(summary, params)
        if len(exact):
            out["aslr-side-channel-entropy"] = entropy_figure(exact)
        if (summary.attacker == "prime+probe").any():
            out["aslr-side-channel-measured"] = measured_figure(summary)
        out["aslr-side-channel-cost"] = cost_figure(summary)
        return out

