"""cow-fork: what does forking a VM through copy-on-write EPT entries cost, compared with
copying its memory, and what do 2 MiB EPT mappings change?

A parent VM (its guest memory fully backed, guest page tables mapping all of it) is forked into
N clones; each clone then writes a fraction of its pages (one store per page, seeded). Every
first write to a shared page is an EPT violation that copies the page (or, with 2 MiB EPT
pages, the whole 2 MiB, or splits the mapping and copies 4 KiB).

Columns: guest_mib, clones, granularity (4k, 2m-copy, 2m-split), pages_written (all clones),
cow_faults, pages_copied (4 KiB pages of data copied), splits, fork_cycles (cost model: EPT
entries touched x ept_edit_cycles + INVEPT), fork_ms (wall clock of the fork), cow_cycles
(exits + copies + INVEPTs of the faults), full_copy_cycles (copying every clone's memory at
copy_bytes_per_cycle instead; prices from the cost profile), host_mib_used (host frames
referenced after the writes), host_mib_full_copy (parent + clones as full copies).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.cow import CopyOnWrite, copy_cycles
from ..arch.access import Access
from ..arch.bits import PAGE_SIZE, PageSize
from ..errors import ConfigError
from ..hv import Hypervisor, Run
from ..hv.costs import hv_costs
from ..memory.layout import check_layout, in_layout
from ..mmu.config import MmuConfig
from ..tables import GuestPageTables
from ..traces.model import TraceChunk
from .base import (
    Progress,
    Row,
    check_choices,
    check_range,
    check_table_memory,
    table_bytes,
)
from .intervals import bars, by_seed, column, interval, ratio, summarize, times

HOST_MEMORY = 1 << 40
"""The model host's memory (the Hypervisor's default)."""
GVA = 0x0000_7000_0000_0000
TABLE_REGION = 8 << 20  # guest page tables live in the first 8 MiB of guest memory


@dataclass(frozen=True)
class CowForkParams:
    def validate(self) -> None:
        """Choices and ranges (before anything runs)."""
        check_choices("granularities", self.granularities, ("4k", "2m-copy", "2m-split"))
        check_range("clones", self.clones, 1)
        check_range("write_fraction", self.write_fraction, 0.0, 1.0)
        for mib in self.guest_mibs:
            if mib < 16 or mib % 2:
                raise ConfigError("guest_mibs", f"{mib} is not a multiple of 2 MiB >= 16 MiB")
            if mib << 20 > HOST_MEMORY // 2:  # the parent is backed in full, then copies
                raise ConfigError(
                    "guest_mibs", f"{mib:,} MiB: at most {HOST_MEMORY >> 21:,} MiB (half the "
                    f"model host's {HOST_MEMORY >> 30:,} GiB)"
                )
            small = {"4k", "2m-split"} & set(self.granularities)
            leaf = 4096 if small else 2 << 20
            check_table_memory(
                "guest_mibs", table_bytes(mib << 20, leaf) * (1 + max(self.clones)), f"{mib:,} MiB"
            )

    guest_mibs: tuple[int, ...] = (64, 256)
    clones: tuple[int, ...] = (1, 4)
    granularities: tuple[str, ...] = ("4k", "2m-copy", "2m-split")
    write_fraction: float = 0.05  # of each clone's pages, each written once
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


class CowFork:
    name: ClassVar[str] = "cow-fork"
    question: ClassVar[str] = (
        "What does a copy-on-write VM fork cost against copying memory, and how do 2 MiB EPT "
        "mappings (copy the 2 MiB, or split first) change it?"
    )
    Params: ClassVar[type] = CowForkParams
    demo: ClassVar[dict[str, str]] = {"guest_mibs": "16,32", "clones": "1,2", "seeds": "3"}
    keys: ClassVar[tuple[str, ...]] = ("guest_mib", "clones", "granularity")

    def rows(self, params: CowForkParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: CowForkParams, progress: Progress) -> Iterator[Row]:
        configs = list(product(params.guest_mibs, params.clones, params.granularities))
        progress(0, len(configs))
        for done, (mib, clones, granularity) in enumerate(configs, 1):
            yield self.measure(mib, clones, granularity, params)
            progress(done, len(configs))

    def measure(self, mib: int, clones: int, granularity: str, p: CowForkParams) -> Row:
        memory = mib << 20
        backing = PageSize.SIZE_4K if granularity == "4k" else PageSize.SIZE_2M
        hv = Hypervisor(mmu=MmuConfig(), seed=p.seed)  # seed: the aged host's placement
        parent = hv.create_vm("parent", memory, lazy=False, backing=backing)
        parent.ept.map_range(0, memory, backing)
        tables = iter(range(PAGE_SIZE, TABLE_REGION, PAGE_SIZE))
        pt = GuestPageTables(parent, lambda: next(tables))
        data = memory - TABLE_REGION
        pt.map_range(GVA, TABLE_REGION, data)
        parent.add_vcpu(cr3=pt.root)
        cow = CopyOnWrite(hv, granularity)

        start = time.perf_counter()
        children = cow.fork(parent, clones)
        fork_ms = (time.perf_counter() - start) * 1e3
        fork_cycles = cow.counters.fork_cycles

        rng = np.random.default_rng(p.seed)
        pages = data // PAGE_SIZE
        per_clone = max(1, int(pages * p.write_fraction))
        for child in children:
            chosen = rng.choice(pages, per_clone, replace=False).astype(np.int64)
            addresses = GVA + chosen * PAGE_SIZE + 8 * rng.integers(0, 512, per_clone)
            chunk = TraceChunk(addresses, np.full(per_clone, Access.WRITE, np.int8),
                               np.full(per_clone, 8, np.int32))
            child.vcpus[0].load([Run(chunk, user=False)])
        hv.run([child.vcpus[0] for child in children])
        c = cow.counters
        return {
            "guest_mib": mib,
            "clones": clones,
            "granularity": granularity,
            "pages_written": per_clone * clones,
            "cow_faults": c.cow_faults,
            "pages_copied": c.pages_copied,
            "splits": c.splits,
            "fork_cycles": fork_cycles,
            "fork_ms": round(fork_ms, 2),
            "cow_cycles": c.fault_cycles,
            "full_copy_cycles": clones * copy_cycles(memory) + clones * (
                memory // backing) * hv_costs().ept_edit,
            "host_mib_used": round(hv.host.live_bytes / (1 << 20), 2),
            "host_mib_full_copy": (clones + 1) * mib,
        }

    def interpret(self, table: pd.DataFrame, params: CowForkParams) -> list[str]:
        big = table[table.guest_mib == table.guest_mib.max()]
        big = big[big.clones == big.clones.max()]
        mib, clones = int(big.guest_mib.iloc[0]), int(big.clones.iloc[0])
        runs = {g: by_seed(big, granularity=g) for g in dict.fromkeys(big.granularity)}
        out = []
        if "4k" in runs:
            r = runs["4k"]
            cow = r.fork_cycles + r.cow_cycles
            out.append(
                f"Forking {clones} clones of a {mib} MiB guest with 4 KiB copy-on-write "
                f"costs {interval(cow).text('{:,.0f}')} cycles in all against "
                f"{interval(r.full_copy_cycles).text('{:,.0f}')} for copying memory "
                f"({times(ratio(r.full_copy_cycles, cow), 'cheaper')}), and the host holds "
                f"{interval(r.host_mib_used).text('{:.0f}')} MiB instead of "
                f"{interval(r.host_mib_full_copy).text('{:.0f}')} MiB."
            )
        if "2m-copy" in runs:
            r = runs["2m-copy"]
            out.append(
                f"Keeping 2 MiB EPT pages and copying them whole copies "
                f"{interval(r.pages_copied).text('{:,.0f}')} pages for "
                f"{interval(r.pages_written).text('{:,.0f}')} written "
                f"({ratio(r.pages_copied, r.pages_written).text('{:.0f}')} 4 KiB pages per "
                f"written page) and uses {interval(r.host_mib_used).text('{:.0f}')} MiB."
            )
        if "2m-split" in runs:
            r = runs["2m-split"]
            out.append(
                f"Splitting the 2 MiB page first ({interval(r.splits).text('{:,.0f}')} splits) "
                f"brings the copies back to {interval(r.pages_copied).text('{:,.0f}')} pages and "
                f"{interval(r.host_mib_used).text('{:.0f}')} MiB at a fork of "
                f"{interval(r.fork_cycles).text('{:,.0f}')} cycles."
            )
        return out

    def figures(self, table: pd.DataFrame, params: CowForkParams) -> dict[str, Figure]:
        summary = summarize(
            table.assign(total_cycles=table.fork_cycles + table.cow_cycles), self.keys
        )
        figure = Figure(figsize=(11, 4.2))
        left, right = figure.subplots(1, 2)
        labels = [f"{r.guest_mib} MiB x{r.clones} {r.granularity}" for r in summary.itertuples()]
        x = np.arange(len(summary))
        bars(left, x - 0.2, column(summary, "host_mib_used"), 0.4, label="copy-on-write")
        bars(left, x + 0.2, column(summary, "host_mib_full_copy"), 0.4, label="full copy")
        left.set_ylabel("host MiB")
        left.set_title("host memory after the clones' writes (mean, 95% interval)")
        bars(right, x - 0.2, column(summary, "total_cycles"), 0.4, label="fork + faults")
        bars(right, x + 0.2, column(summary, "full_copy_cycles"), 0.4, label="full copy")
        right.set_yscale("log")
        right.set_ylabel("cycles (cost model)")
        right.set_title("time spent")
        for ax in (left, right):
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
            ax.legend(fontsize=7)
        return {"cow-fork": figure}
