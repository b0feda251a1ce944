"""prefetch-hypercall: how much does a guest gain by announcing a region before touching it
(the prefetch hypercall of :mod:`eptlab.apps.prefetch`), with 1, 2 and 4 vCPUs, while other
activity remaps pages under it -- and does the protocol keep every access off freed frames?

Each configuration boots a lazily backed VM with a guest kernel; the guest maps a buffer of
``footprint_mib`` (its GVAs -> contiguous GPAs; host backing stays lazy) and splits it among the
vCPUs. With the hint on, each vCPU first issues the prefetch hypercall for its slice (backed in
``batch``-page steps, warmed, interleaved with the other vCPUs); then each runs a seeded
``workload`` over its slice (``accesses`` in total). Every vCPU's program also holds ``remaps``
remapping operations on random pages of the whole buffer (page migration, balloon release, KSM
merge; the guest's writes to merged pages break copy-on-write), so remaps land in the middle of
other vCPUs' prefetches. The stale-use checker follows every access. ``protocol`` selects the
correct protocol or a deliberately broken one (``no_lock``, ``no_invept``).

Per-access cycles are the engine's translation and data cycles of each access (accesses run one
at a time), plus what it caused: a walk that ended in an EPT violation (the engine charges it
nothing; it is costed from its references), the exit round trip and the handler's work
(allocating and zeroing a page, copies likewise), and a shootdown IPI (an exit plus an INVEPT)
on the next access of each vCPU it interrupted, all priced by the cost profile (default profile:
1,500; 200 + 4096/8 + 20; 2,000 cycles). The prefetch's own cost (the VMCALL
exit, backing, entry writes, warming reads) is ``prefetch_cycles``, not part of any access.

Columns: hint (on/off), vcpus, protocol, accesses, ept_violations (all vCPUs, engine count),
translation_cycles (the guest's accesses: TLB lookups and walks, including walks that ended in an
exit; warming reads excluded), translation_cycles_per_access, p50_access_cycles,
p99_access_cycles, mean_access_cycles, prefetch_cycles, total_cycles (all access cycles plus
prefetch_cycles), pages_backed (by first-touch faults and prefetches), remaps (migrations,
balloon releases, merges and copy-on-write breaks done), shootdowns, lock_contended (times an EPT
editor waited for a prefetch holding the lock), stale_uses (accesses to a host frame freed or
given to someone else: must be 0 for the correct protocol), checked_accesses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.prefetch import PROTOCOLS, Outcome, RemapOp, Scenario, play
from ..errors import ConfigError
from ..memory.layout import check_layout, in_layout
from .base import Progress, Row, check_choices, check_range
from .intervals import (
    bars,
    by_seed,
    change,
    interval,
    pick,
    reduction,
    relation,
    seeds_of,
    summarize,
    yerr,
)

KINDS: tuple[str, ...] = ("migrate", "balloon", "merge")

GUEST_SPARE = (8 << 20) - (6 << 20)
"""Guest memory beside the footprint, after the 6 MiB kernel image: what ``apps.prefetch.play``
leaves for the guest's page tables (it sizes guest memory as 8 MiB + the footprint)."""
TABLE_SLACK_PAGES = 4
"""Pages of that spare memory the guest kernel uses for itself (measured: 1,000 MiB runs,
1,016 MiB runs out of guest memory)."""


def guest_table_bytes(footprint_mib: int) -> int:
    """Guest page tables that map the footprint (``populate`` maps it with 4 KiB PTEs): one
    page table per 2 MiB, one directory per 1 GiB, one PDPT per 512 GiB."""
    footprint = footprint_mib << 20
    pages = -(-footprint // (2 << 20)) + -(-footprint // (1 << 30)) + -(-footprint // (1 << 39))
    return pages * 4096


def check_tables(footprint_mib: int) -> None:
    """Refuse, before anything runs, a footprint whose guest page tables cannot fit in the
    guest (which would otherwise be found only after populating them, minutes for 1 TiB)."""
    need = guest_table_bytes(footprint_mib)
    have = GUEST_SPARE - TABLE_SLACK_PAGES * 4096
    if need > have:
        most = max(m for m in range(2, 2048, 2) if guest_table_bytes(m) <= have)
        raise ConfigError(
            "footprint_mib",
            f"{footprint_mib:,} MiB needs about {need / (1 << 20):,.1f} MiB of guest page tables; "
            f"the guest has {have / (1 << 20):.2f} MiB for them (at most about {most:,} MiB)",
        )


HINTS_ON = ("on", "true", "1", "yes")
HINTS = ("off", "on", "false", "true", "0", "1", "no", "yes")


@dataclass(frozen=True)
class PrefetchHypercallParams:
    def validate(self) -> None:
        """Choices, ranges and the page-table memory estimate (before anything runs)."""
        from ..workloads import WORKLOADS

        check_choices("hints", self.hints, HINTS)
        check_choices("workload", self.workload, WORKLOADS)
        check_choices("page", self.page, ("4k", "2m"))
        check_choices("protocol", self.protocol, PROTOCOLS)
        check_range("vcpus", self.vcpus, 1, 64)
        check_range("footprint_mib", self.footprint_mib, 1)
        check_range("accesses", self.accesses, max(self.vcpus))
        check_range("write_fraction", self.write_fraction, 0.0, 1.0)
        check_range("batch", self.batch, 1)
        check_tables(self.footprint_mib)

    vcpus: tuple[int, ...] = (1, 2, 4)
    hints: tuple[str, ...] = ("off", "on")
    footprint_mib: int = 8
    accesses: int = 40_000  # in total, split among the vCPUs
    workload: str = "random"
    write_fraction: float = 0.3
    page: str = "4k"  # pages the prefetch backs holes with: 4k or 2m
    warm: bool = True
    batch: int = 16
    remaps: int = 8  # remap operations in each vCPU's program
    protocol: str = "correct"
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


class PrefetchHypercall:
    name: ClassVar[str] = "prefetch-hypercall"
    question: ClassVar[str] = (
        "How many EPT violations and translation cycles does a prefetch hint save, with 1-4 "
        "vCPUs remapping pages meanwhile, and does the protocol keep accesses off freed frames?"
    )
    Params: ClassVar[type] = PrefetchHypercallParams
    demo: ClassVar[dict[str, str]] = {"accesses": "3000", "footprint_mib": "4", "seeds": "3"}
    keys: ClassVar[tuple[str, ...]] = ("hint", "vcpus", "protocol")

    def scenario(self, p: PrefetchHypercallParams, hint: bool, vcpus: int) -> Scenario:
        if p.protocol not in PROTOCOLS:
            raise ConfigError("protocol", f"{p.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if p.page not in ("4k", "2m"):
            raise ConfigError("page", f"{p.page!r} is not 4k or 2m")
        if vcpus < 1 or p.footprint_mib < 1 or p.accesses < vcpus:
            raise ConfigError("vcpus/footprint_mib/accesses", "must be positive")
        pages = (p.footprint_mib << 20) // 4096
        per_vcpu = p.accesses // vcpus
        rng = np.random.default_rng([p.seed, vcpus])  # the same remaps with the hint on and off
        remaps = tuple(
            RemapOp(
                vcpu=k,
                after=int(rng.integers(per_vcpu)),
                kind=KINDS[int(rng.integers(len(KINDS)))],  # type: ignore[arg-type]
                page=int(rng.integers(pages)),
                other=int(rng.integers(pages)),
            )
            for k in range(vcpus)
            for _ in range(p.remaps)
        )
        return Scenario(
            protocol=p.protocol,
            hint=hint,
            vcpus=vcpus,
            pages=pages,
            shared=False,
            accesses=per_vcpu,
            workload=p.workload,
            write_fraction=p.write_fraction,
            remaps=remaps,
            page_size=p.page,
            warm=p.warm,
            batch=p.batch,
            seed=p.seed,
            quantum=(256, 1024),
            pool_capacity=64,
            per_access_cycles=True,
        )

    def rows(self, params: PrefetchHypercallParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: PrefetchHypercallParams, progress: Progress) -> Iterator[Row]:
        hints = [h.lower() in HINTS_ON for h in params.hints]
        configs = list(product(params.vcpus, hints))
        progress(0, len(configs))
        for done, (vcpus, hint) in enumerate(configs, 1):
            outcome = play(self.scenario(params, hint, vcpus))
            yield self.row(outcome)
            progress(done, len(configs))

    @staticmethod
    def row(o: Outcome) -> Row:
        s, c = o.scenario, o.counters
        access_total = int(o.access_cycles.sum())
        remaps = sum(
            c.get(k, 0) for k in ("migrations", "balloon_releases", "merges", "cow_breaks")
        )
        return {
            "hint": "on" if s.hint else "off",
            "vcpus": s.vcpus,
            "protocol": s.protocol,
            "accesses": o.accesses,
            "ept_violations": o.ept_violations,
            "translation_cycles": o.translation_cycles,
            "translation_cycles_per_access": round(o.translation_cycles / max(1, o.accesses), 2),
            "p50_access_cycles": o.percentile(50),
            "p99_access_cycles": o.percentile(99),
            "mean_access_cycles": round(access_total / max(1, len(o.access_cycles)), 1),
            "prefetch_cycles": o.prefetch_cycles,
            "total_cycles": access_total + o.prefetch_cycles + o.pending_cycles,
            "pages_backed": c.get("pages_backed", 0),
            "remaps": remaps,
            "shootdowns": c.get("shootdowns", 0),
            "lock_contended": o.lock_contended,
            "stale_uses": o.stale_uses,
            "checked_accesses": o.checked,
        }

    def interpret(self, table: pd.DataFrame, params: PrefetchHypercallParams) -> list[str]:
        out = []
        for vcpus in dict.fromkeys(table.vcpus):
            off = by_seed(table, vcpus=vcpus, hint="off")
            on = by_seed(table, vcpus=vcpus, hint="on")
            if not len(off) or not len(on):
                continue
            total = _moved("total cycles", off, on, "total_cycles")
            if relation(interval(on.total_cycles), interval(off.total_cycles)) != "overlap":
                saved = reduction(off.total_cycles, on.total_cycles).scaled(100)
                total += f" ({saved.text('{:.0f}', '%')} less)"
            out.append(
                f"{vcpus} vCPU(s), without and with the hint: "
                f"{_moved('EPT violations', off, on, 'ept_violations')}, "
                f"{_moved('p99 access latency', off, on, 'p99_access_cycles', ' cycles')}, "
                f"{total}."
            )
            if len(out) == 2:
                break
        stale = int(table.stale_uses.sum())
        out.append(
            f"Stale uses of a remapped frame over all {len(table)} runs "
            f"({seeds_of(table)} seed(s)) with the {params.protocol!r} protocol: {stale}; remaps "
            f"done: {int(table.remaps.sum())}."
        )
        return out

    def figures(self, table: pd.DataFrame, params: PrefetchHypercallParams) -> dict[str, Figure]:
        summary = summarize(table, self.keys)
        figure = Figure(figsize=(13, 4))
        axes = figure.subplots(1, 3)
        vcpus = sorted(set(summary["vcpus"]))
        x = np.arange(len(vcpus))
        panels = (
            ("ept_violations", "EPT violations"),
            ("translation_cycles", "translation cycles"),
        )
        for ax, (name, title) in zip(axes[:2], panels, strict=True):
            for i, hint in enumerate(("off", "on")):
                values = [pick(summary, name, hint=hint, vcpus=v) for v in vcpus]
                bars(ax, x + (i - 0.5) * 0.4, values, 0.4, label=f"hint {hint}")
            ax.set_title(f"{title} (mean, 95% interval)")
            ax.set_xticks(x, [f"{v} vCPU" for v in vcpus])
            ax.legend(fontsize=8)
        ax = axes[2]
        for hint, color in (("off", "C0"), ("on", "C1")):
            for q, style, marker in (("p50", ":", "o"), ("p99", "-", "s")):
                values = [pick(summary, f"{q}_access_cycles", hint=hint, vcpus=v) for v in vcpus]
                ax.errorbar(vcpus, [v.mean for v in values], yerr=yerr(values), fmt=style,
                            color=color, marker=marker, capsize=2, label=f"{q}, hint {hint}")
        ax.set_yscale("log")
        ax.set_xticks(vcpus)
        ax.set_xlabel("vCPUs")
        ax.set_title("cycles per access")
        ax.legend(fontsize=8)
        stale = int(table["stale_uses"].sum()) if "stale_uses" in table else 0
        figure.suptitle(
            f"prefetch hypercall ({params.protocol} protocol, {seeds_of(table)} seed(s), stale "
            f"uses: {stale})",
            fontsize=10,
        )
        return {"prefetch-hypercall": figure}


def _moved(name: str, off: pd.DataFrame, on: pd.DataFrame, col: str, unit: str = "") -> str:
    return change(name, interval(off[col]), interval(on[col]), "{:,.0f}", unit)
