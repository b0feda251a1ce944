"""prefetch-hypercall: what a guest gains by announcing a region before touching it (the
prefetch hypercall of :mod:`eptlab.apps.prefetch`), factor by factor -- backing the pages ahead,
warming the nested TLB and EPT paging-structure caches, both -- against asynchronous page faults
(:mod:`eptlab.apps.async_pf`), with 1, 2 and 4 vCPUs while other activity remaps pages under it;
and does the protocol keep every access off freed frames?

Each configuration boots a lazily backed VM with a guest kernel; the guest maps a buffer of
``footprint_mib`` (its GVAs -> contiguous GPAs; host backing stays lazy) and splits it among the
vCPUs; each vCPU runs ``tasks`` guest tasks (threads), each a seeded ``workload`` over its share
of the vCPU's slice (``accesses`` in total), switched every ``timeslice`` accesses. The rows
(``policy`` on ``memory``):

- ``none`` on ``lazy`` memory: every first touch is an EPT violation, backed synchronously;
- ``back``: each vCPU first issues the hint for its slice with ``PREFETCH_NO_WARM``;
- ``back+warm``: the full hint (backed in ``batch``-page steps, then warmed);
- ``async-pf``: no hint; first touches are served asynchronously (the faulting task waits, the
  vCPU's other task runs);
- ``none`` and ``warm`` on ``backed`` memory: every page backed before the run (caches cold), and
  the hint with ``PREFETCH_NO_BACK``: warming alone, where it means something.

``backing``: ``zero`` (a first touch gets a zeroed frame) or ``swap`` (the host also waits
``swap_in_cycles`` for the page's contents, on every backing: fault, hint and async worker).
Every vCPU's program also holds ``remaps`` remapping operations on random pages of the whole
buffer (page migration, balloon release, KSM merge; the guest's writes to merged pages break
copy-on-write), so remaps land in the middle of other vCPUs' prefetches. The stale-use checker
follows every access. ``protocol`` selects the correct protocol or a deliberately broken one
(``no_lock``, ``no_invept``).

Per-access cycles are the engine's translation and data cycles of each access (accesses run one
at a time), plus what it caused: a walk that ended in an EPT violation (costed from its
references), the exit round trip and the handler's work (allocating and zeroing a page, copies
likewise), a shootdown IPI on the next access of each vCPU it interrupted, a guest task switch,
async-PF events and idle time (every task of the vCPU waiting), all priced by the cost profile.
The prefetch's own cost (the VMCALL exit, backing, entry writes, warming reads) is
``prefetch_cycles``, not part of any access.

Columns: policy, memory, vcpus, protocol, accesses, ept_violations (all vCPUs, engine count),
translation_cycles (the guest's accesses: TLB lookups and walks, including walks that ended in an
exit; warming reads excluded), translation_cycles_per_access, nested_tlb_hits and ept_psc_hits
(the guest's accesses), p50_access_cycles, p99_access_cycles, mean_access_cycles,
prefetch_cycles, total_cycles (all access cycles plus prefetch_cycles: vCPU time), idle_cycles,
host_cycles (host-side work off the vCPUs: the async worker's backing, remaps placed on the
host), async_faults, overlapped_accesses (accesses another task ran while one waited),
pages_backed (by first-touch faults, prefetches and async workers), remaps (migrations, balloon
releases, merges and copy-on-write breaks done), shootdowns, lock_contended (times an EPT editor
waited for a prefetch holding the lock), stale_uses (accesses to a host frame freed or given to
someone else: must be 0 for the correct protocol), checked_accesses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.cycle_meter import Costs
from ..apps.ept_editor import PROTOCOLS
from ..apps.prefetch_scenario import Outcome, RemapOp, Scenario, play
from ..apps.scenario import from_params
from ..costs import active_profile
from ..errors import ConfigError
from ..memory.layout import check_layout, in_layout
from .base import Progress, Row, check_choices, check_range
from .intervals import (
    bars,
    pick,
    seeds_of,
    summarize,
)

KINDS: tuple[str, ...] = ("migrate", "balloon", "merge")

GUEST_SPARE = (8 << 20) - (6 << 20)
"""Guest memory beside the footprint, after the 6 MiB kernel image: what
``apps.prefetch_scenario.play`` leaves for the guest's page tables (it sizes guest memory as
8 MiB + the footprint)."""
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


POLICIES = ("none", "back", "back+warm", "warm", "async-pf")
BACKINGS = ("zero", "swap")
_HINT = {"back": (True, False), "back+warm": (True, True), "warm": (False, True)}


def configurations(policies: tuple[str, ...]) -> list[tuple[str, str]]:
    """(policy, memory) rows: every policy on lazy memory except ``warm``, which runs on
    backed memory beside a ``none`` row there (its baseline)."""
    lazy = [(p, "lazy") for p in POLICIES if p in policies and p != "warm"]
    backed = [("none", "backed"), ("warm", "backed")] if "warm" in policies else []
    return lazy + backed


@dataclass(frozen=True)
class PrefetchHypercallParams:
    def validate(self) -> None:
        """Choices, ranges and the page-table memory estimate (before anything runs)."""
        from ..workloads import WORKLOADS

        check_choices("policies", self.policies, POLICIES)
        check_choices("backing", self.backing, BACKINGS)
        check_choices("workload", self.workload, WORKLOADS)
        check_choices("page", self.page, ("4k", "2m"))
        check_choices("protocol", self.protocol, PROTOCOLS)
        check_range("vcpus", self.vcpus, 1, 64)
        check_range("tasks", self.tasks, 1, 16)
        check_range("timeslice", self.timeslice, 1)
        check_range("footprint_mib", self.footprint_mib, 1)
        check_range("accesses", self.accesses, max(self.vcpus) * self.tasks)
        check_range("write_fraction", self.write_fraction, 0.0, 1.0)
        check_range("batch", self.batch, 1)
        check_range("remaps", self.remaps, 0)
        check_tables(self.footprint_mib)

    vcpus: tuple[int, ...] = (1, 2, 4)
    policies: tuple[str, ...] = POLICIES
    backing: str = "zero"  # zero-filled pages, or swapped out (the host waits swap_in_cycles)
    footprint_mib: int = 8
    accesses: int = 40_000  # in total, split among the vCPUs
    tasks: int = 2  # guest tasks per vCPU
    timeslice: int = 10_000  # accesses a guest task runs before the next one's turn
    workload: str = "random"
    write_fraction: float = 0.3
    page: str = "4k"  # pages the prefetch backs holes with: 4k or 2m
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
        "What does a prefetch hint save -- backing pages ahead, warming the GPA-side caches, or "
        "both -- against asynchronous page faults, with 1-4 vCPUs remapping pages meanwhile, and "
        "does the protocol keep accesses off freed frames?"
    )
    Params: ClassVar[type] = PrefetchHypercallParams
    demo: ClassVar[dict[str, str]] = {"accesses": "3000", "footprint_mib": "4", "seeds": "3"}
    keys: ClassVar[tuple[str, ...]] = ("policy", "memory", "vcpus", "protocol")

    def scenario(
        self, p: PrefetchHypercallParams, policy: str, vcpus: int, memory: str = "lazy"
    ) -> Scenario:
        if policy not in POLICIES or memory not in ("lazy", "backed"):
            raise ConfigError("policies", f"{policy!r} on {memory!r} memory is not a row")
        p.validate()
        pages = (p.footprint_mib << 20) // 4096
        per_vcpu = p.accesses // vcpus
        rng = np.random.default_rng([p.seed, vcpus])  # the same remaps in every row
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
        back, warm = _HINT.get(policy, (True, True))
        wait = active_profile().cycles("swap_in_cycles") if p.backing == "swap" else 0
        return from_params(
            Scenario,
            p,
            hint=policy in _HINT,
            back=back,
            warm=warm,
            memory=memory,
            async_pf=policy == "async-pf",
            vcpus=vcpus,
            pages=pages,
            shared=False,
            accesses=per_vcpu,
            remaps=remaps,
            page_size=p.page,
            quantum=(256, 1024),
            pool_capacity=64,
            per_access_cycles=True,
            costs=Costs(backing_wait_cycles=wait),
        )

    def rows(self, params: PrefetchHypercallParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: PrefetchHypercallParams, progress: Progress) -> Iterator[Row]:
        configs = list(product(params.vcpus, configurations(params.policies)))
        progress(0, len(configs))
        for done, (vcpus, (policy, memory)) in enumerate(configs, 1):
            outcome = play(self.scenario(params, policy, vcpus, memory))
            yield self.row(outcome, policy)
            progress(done, len(configs))

    @staticmethod
    def row(o: Outcome, policy: str) -> Row:
        s, c = o.scenario, o.counters
        access_total = int(o.access_cycles.sum())
        remaps = sum(
            c.get(k, 0) for k in ("migrations", "balloon_releases", "merges", "cow_breaks")
        )
        return {
            "policy": policy,
            "memory": s.memory,
            "vcpus": s.vcpus,
            "protocol": s.protocol,
            "accesses": o.accesses,
            "ept_violations": o.ept_violations,
            "translation_cycles": o.translation_cycles,
            "translation_cycles_per_access": round(o.translation_cycles / max(1, o.accesses), 2),
            "nested_tlb_hits": o.nested_tlb_hits,
            "ept_psc_hits": o.ept_psc_hits,
            "p50_access_cycles": o.percentile(50),
            "p99_access_cycles": o.percentile(99),
            "mean_access_cycles": round(access_total / max(1, len(o.access_cycles)), 1),
            "prefetch_cycles": o.prefetch_cycles,
            "total_cycles": access_total + o.prefetch_cycles + o.pending_cycles,
            "idle_cycles": o.idle_cycles,
            "host_cycles": c.get("host_cycles", 0),
            "async_faults": c.get("async_faults", 0),
            "overlapped_accesses": c.get("overlapped_accesses", 0),
            "pages_backed": c.get("pages_backed", 0),
            "remaps": remaps,
            "shootdowns": c.get("shootdowns", 0),
            "lock_contended": o.lock_contended,
            "stale_uses": o.stale_uses,
            "checked_accesses": o.checked,
        }

    def interpret(self, table: pd.DataFrame, params: PrefetchHypercallParams) -> list[str]:
        from .prefetch_reading import reading

        return reading(table, params.protocol, params.backing)

    def figures(self, table: pd.DataFrame, params: PrefetchHypercallParams) -> dict[str, Figure]:
        summary = summarize(table, self.keys)
        figure = Figure(figsize=(13, 4))
        axes = figure.subplots(1, 3)
        vcpus = sorted(set(summary["vcpus"]))
        rows = list(dict.fromkeys(zip(summary["policy"], summary["memory"], strict=True)))
        x = np.arange(len(vcpus))
        width = 0.8 / max(1, len(rows))
        panels = (
            ("ept_violations", "EPT violations"),
            ("mean_access_cycles", "mean cycles per access"),
            ("p99_access_cycles", "p99 cycles per access"),
        )
        for ax, (name, title) in zip(axes, panels, strict=True):
            for i, (policy, memory) in enumerate(rows):
                values = [
                    pick(summary, name, policy=policy, memory=memory, vcpus=v) for v in vcpus
                ]
                label = policy if memory == "lazy" else f"{policy} (backed)"
                bars(ax, x + (i - (len(rows) - 1) / 2) * width, values, width, label=label)
            ax.set_title(f"{title} (mean, 95% interval)", fontsize=9)
            ax.set_xticks(x, [f"{v} vCPU" for v in vcpus])
        axes[0].legend(fontsize=7)
        axes[2].set_yscale("log")
        stale = int(table["stale_uses"].sum()) if "stale_uses" in table else 0
        figure.suptitle(
            f"prefetch hypercall ({params.protocol} protocol, backing={params.backing}, "
            f"{seeds_of(table)} seed(s), stale uses: {stale})",
            fontsize=10,
        )
        return {"prefetch-hypercall": figure}
