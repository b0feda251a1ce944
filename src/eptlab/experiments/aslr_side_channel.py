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

Costs: the same layouts back a guest whose process runs ``workload`` over ``footprint_mib``
(pre-faulted, ``guest_page`` guest pages) through the fast engine with the default MMU model;
``random-4k`` cannot use 2 MiB EPT pages, so the TLBs hold 4 KiB translations.

Columns:

| column | meaning |
|---|---|
| policy | EPT layout: `linear`, `random-2m`, `random-4k` |
| ept_page | EPT page size the layout backs guest memory with |
| target | granule of the secret's slots (`4k`, `2m`) |
| channel | `data` or `walk+data` |
| llc_sets, index_bits | sets of the probed cache and the HPA bits of its set index |
| noise | probability that one observed set index is wrong |
| observations | measurements the attacker made (k) |
| trials | random secrets and layouts averaged over |
| entropy_bits_before | log2 of the number of slots |
| entropy_bits_after | Shannon entropy of the attacker's posterior after k measurements (mean) |
| success_rate | probability that the attacker's best guess is the secret (mean) |
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
from ..apps.ept_layout import LAYOUTS, EptLayout, back_range, boot, ept_leaf_sizes
from ..arch.bits import PageSize
from ..errors import ConfigError, EptlabError
from ..guest import GuestKernel
from ..hv import ExitAction, Run
from ..memory.layout import check_layout, default_layout, in_layout
from ..mmu.config import CacheConfig
from ..traces.model import TraceChunk
from ..workloads import WORKLOADS, make_workload
from .base import Progress, Row, check_choices
from .intervals import (
    OVERLAP,
    bars,
    by_seed,
    change,
    column,
    interval,
    ratio,
    summarize,
    times,
    yerr,
)

DEFAULT_SETS = CacheConfig().llc.sets
MAX_PROBES = 64  # references of one walk: at most 1 + 5 * 6 + 5 = 36
KERNEL_MEMORY = 64 << 20  # guest memory besides the workload's footprint
_2M = int(PageSize.SIZE_2M)


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


# -- the attack -----------------------------------------------------------------------------


@dataclass
class AttackTally:
    """Sums over trials of entropy left and success, by (llc_sets, channel, observations)."""

    trials: int = 0
    entropy: dict[tuple[int, str, int], float] = field(default_factory=dict)
    success: dict[tuple[int, str, int], float] = field(default_factory=dict)

    def add(self, key: tuple[int, str, int], entropy: float, success: float) -> None:
        self.entropy[key] = self.entropy.get(key, 0.0) + entropy
        self.success[key] = self.success.get(key, 0.0) + success

    def mean(self, key: tuple[int, str, int]) -> tuple[float, float]:
        return self.entropy[key] / self.trials, self.success[key] / self.trials


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
        for sets in p.llc_sets:
            index = SetIndex(sets)
            observations = observe(access, index, draws)
            for channel in p.channels:
                attacker = Attacker(
                    target, layout, victim.laid.offset, index, access.probes,
                    channel=channel, noise=p.noise,
                )
                for belief in attacker.beliefs(observations, checkpoints):
                    key = (sets, channel, belief.observations)
                    tally.add(key, belief.entropy_bits, belief.success(slot))
        tally.trials += 1
        if progress is not None:
            progress(trial + 1, p.trials)
    return tally


# -- the cost -------------------------------------------------------------------------------


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


# -- the experiment -------------------------------------------------------------------------


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
        "seeds": "3",
    }
    keys: ClassVar[tuple[str, ...]] = (
        "policy", "ept_page", "target", "channel", "llc_sets", "index_bits", "noise",
        "observations", "trials",
    )

    def rows(self, params: AslrSideChannelParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: AslrSideChannelParams, progress: Progress) -> Iterator[Row]:
        check(params)
        targets = [Target.named(t, params.secret_bits) for t in params.targets]
        total = len(params.policies) * (1 + len(targets) * params.trials)
        done = 0
        progress(done, total)
        costs: dict[str, LayoutCost] = {}
        for policy in params.policies:
            costs[policy] = measure_cost(params, policy)
            done += 1
            progress(done, total)
        for target in targets:
            for policy in params.policies:
                base = done

                def report(d: int, _n: int, base: int = base) -> None:
                    progress(base + d, total)

                tally = attack(params, target, policy, report)
                done += params.trials
                yield from self._rows(params, target, policy, tally, costs[policy])

    @staticmethod
    def _rows(
        p: AslrSideChannelParams, target: Target, policy: str, tally: AttackTally,
        cost: LayoutCost,
    ) -> Iterator[Row]:
        for channel in p.channels:
            for sets in p.llc_sets:
                for k in p.observations:
                    entropy, success = tally.mean((sets, channel, k))
                    yield {
                        "policy": policy,
                        "ept_page": cost.ept_page,
                        "target": target.label,
                        "channel": channel,
                        "llc_sets": sets,
                        "index_bits": SetIndex(sets).label,
                        "noise": p.noise,
                        "observations": k,
                        "trials": tally.trials,
                        "entropy_bits_before": float(target.bits),
                        "entropy_bits_after": round(entropy, 4),
                        "success_rate": round(success, 6),
                        "tlb_miss_rate": round(cost.tlb_miss_rate, 5),
                        "walk_refs_per_access": round(cost.walk_refs_per_access, 3),
                        "cycles_per_access": round(cost.cycles_per_access, 2),
                    }

    def interpret(self, table: pd.DataFrame, params: AslrSideChannelParams) -> list[str]:
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
        return {
            "aslr-side-channel-entropy": _entropy_figure(summary),
            "aslr-side-channel-cost": _cost_figure(summary),
        }


def _entropy_figure(table: pd.DataFrame) -> Figure:
    targets = list(dict.fromkeys(table["target"]))
    panels = list(dict.fromkeys(zip(table["channel"], table["llc_sets"], table["index_bits"],
                                    strict=True)))
    policies = list(dict.fromkeys(table["policy"]))
    figure = Figure(figsize=(3.4 * len(panels), 3.0 * len(targets) + 0.6))
    axes = np.atleast_2d(figure.subplots(len(targets), len(panels), squeeze=False))
    for r, target in enumerate(targets):
        for c, (channel, sets, bits) in enumerate(panels):
            ax = axes[r, c]
            rows = table[(table["target"] == target) & (table["channel"] == channel)
                         & (table["llc_sets"] == sets)]
            if not len(rows):
                ax.set_visible(False)
                continue
            before = float(rows["entropy_bits_before"].iloc[0])
            ax.axhline(before, color="grey", linestyle=":", linewidth=1)
            for i, policy in enumerate(policies):
                own = rows[rows["policy"] == policy].sort_values("observations")
                if not len(own):
                    continue
                x, y = own["observations"].to_numpy(), own["entropy_bits_after"].to_numpy()
                # overlapping curves stay visible: wide solid, dashed, dotted on top; error
                # bars: the 95% interval over seeds
                ax.errorbar(x, y, yerr=yerr(column(own, "entropy_bits_after")),
                            marker="os^D"[i % 4], markersize=3, color=f"C{i}", label=policy,
                            linestyle=("-", "--", ":", "-.")[i % 4],
                            linewidth=3.0 - 0.8 * (i % 3), capsize=2, elinewidth=0.8)
                last = own.iloc[-1]
                ax.annotate(f"{last['success_rate']:.2f}", (x[-1], y[-1]), fontsize=7,
                            color=f"C{i}", xytext=(3, 2 - 9 * i), textcoords="offset points")
            ticks = sorted(set(rows["observations"]))
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_ylim(-0.3, before + 0.8)
            ax.set_title(f"{target} target, {channel}, LLC HPA {bits}", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("entropy left (bits)", fontsize=8)
            if r == len(targets) - 1:
                ax.set_xlabel("measurements", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    noise = float(table["noise"].iloc[0])
    figure.suptitle(f"guest-physical ASLR left to an AnC-style attacker (noise {noise}); "
                    "numbers: success rate at the last point (means, 95% intervals)", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.90))
    figure.legend(handles, labels, loc="upper center", ncol=len(policies), fontsize=8,
                  bbox_to_anchor=(0.5, 0.955))
    return figure


def _cost_figure(table: pd.DataFrame) -> Figure:
    per_policy = table.drop_duplicates("policy")
    policies = list(per_policy["policy"])
    x = np.arange(len(policies))
    figure = Figure(figsize=(11, 3.6))
    axes = figure.subplots(1, 3)
    for ax, (name, title) in zip(axes, (
        ("tlb_miss_rate", "TLB miss rate"),
        ("walk_refs_per_access", "walk references per access"),
        ("cycles_per_access", "cycles per access"),
    ), strict=True):
        values = per_policy[name].astype(float).to_numpy()
        bars(ax, x, column(per_policy, name), color=[f"C{i}" for i in range(len(policies))])
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [f"{p}\n(EPT {e})" for p, e in zip(policies, per_policy["ept_page"],
                                                            strict=True)], fontsize=8)
        ax.set_title(title, fontsize=9)
    figure.suptitle("what each EPT layout costs on the workload (mean, 95% interval)", fontsize=10)
    figure.tight_layout()
    return figure
