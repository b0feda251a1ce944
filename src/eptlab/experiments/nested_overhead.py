"""nested-overhead: what does two-dimensional translation cost compared with native paging, and
how much of it do the paging-structure caches, the nested TLB and large pages take back?

For each workload (and a real program trace), the same access stream runs through the fast
engine natively (guest paging only) and nested (guest paging under EPT), with and without the
translation caches beyond the TLBs (guest paging-structure caches, nested TLB, EPT
paging-structure caches: ``pwc``), with 4 KiB and 2 MiB pages in each dimension.

Columns: workload, mode (native/nested), guest_page, ept_page ("-" when native), pwc, accesses,
walks, tlb_miss_rate, refs_per_walk, guest_refs_per_walk, ept_refs_per_walk, cycles_per_access,
translation_cycles_per_access.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from itertools import product
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..arch.bits import PageSize
from ..errors import ConfigError
from ..memory.layout import check_layout, in_layout
from ..mmu.config import Assoc, MmuConfig, TlbConfig
from ..mmu.engine import Accesses, Engine
from ..mmu.scenario import NestedSpace
from ..traces.model import TraceChunk
from .base import (
    Progress,
    Row,
    check_choices,
    check_range,
    check_table_memory,
    check_trace_path,
    table_bytes,
)
from .intervals import (
    Interval,
    at,
    bars,
    by_seed,
    interval,
    ratio,
    reduction,
    summarize,
    times,
)

BASE = 0x0000_2000_0000_0000
TRACE_COMMAND = ("ls", "-l", "/usr/bin")


@dataclass(frozen=True)
class NestedOverheadParams:
    def validate(self) -> None:
        """Choices, whole 2 MiB regions, and a readable trace path (before anything runs)."""
        from ..workloads import WORKLOADS

        check_choices("workloads", self.workloads, WORKLOADS)
        check_choices("guest_pages", self.guest_pages, ("4k", "2m"))
        check_choices("ept_pages", self.ept_pages, ("4k", "2m"))
        if self.footprint_mib < 2 or self.footprint_mib % 2:
            raise ConfigError("footprint_mib", f"{self.footprint_mib} is not a multiple of 2 MiB")
        check_range("accesses", self.accesses, 1)
        check_range("trace_accesses", self.trace_accesses, 1)
        check_trace_path("trace", self.trace, ("", "auto"))
        from ..mmu.scenario import TABLE_REGION

        smallest = 4096 if "4k" in self.guest_pages else 2 << 20
        guest = table_bytes(self.footprint_mib << 20, smallest)
        if guest > TABLE_REGION - (8 << 20):  # the guest's page tables live in its first GiB
            raise ConfigError(
                "footprint_mib",
                f"{self.footprint_mib:,} MiB needs about {guest / (1 << 20):,.0f} MiB of guest "
                f"page tables with {'4k' if smallest == 4096 else '2m'} pages; the guest keeps "
                f"them in {TABLE_REGION >> 20:,} MiB",
            )
        ept = table_bytes(self.footprint_mib << 20, 4096 if "4k" in self.ept_pages else 2 << 20)
        check_table_memory("footprint_mib", guest + ept, f"{self.footprint_mib:,} MiB")

    workloads: tuple[str, ...] = ("sequential", "random", "zipf", "pointer-chase", "gups", "mixed")
    footprint_mib: int = 256
    accesses: int = 200_000
    trace: str = "auto"  # "auto": record `ls -l /usr/bin` under lackey; "": none; else a path
    trace_accesses: int = 300_000
    guest_pages: tuple[str, ...] = ("4k", "2m")
    ept_pages: tuple[str, ...] = ("4k", "2m")
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


@cache
def _recorded(command: tuple[str, ...], accesses: int) -> Path:
    """The first ``accesses`` accesses of ``command`` under lackey, recorded once per process
    (the trace does not depend on the seed)."""
    from ..traces import record

    path = Path(tempfile.mkdtemp(prefix="eptlab-")) / "trace.ept"
    record(list(command), path, stdout=subprocess.DEVNULL, limit=accesses)
    return path


def without_pwc() -> TlbConfig:
    """The default TLBs with every paging-structure cache and the nested TLB turned off."""
    off = Assoc(0, 1)
    names = [n for n in TlbConfig.__dataclass_fields__ if n.startswith(("psc_", "ntlb_", "epsc_"))]
    return TlbConfig(**dict.fromkeys(names, off))


@dataclass(frozen=True)
class Source:
    """A named access stream that can be replayed (a workload or a recorded trace)."""

    name: str
    chunks: list[TraceChunk]
    regions: np.ndarray  # 2 MiB regions touched (for mapping)

    @property
    def accesses(self) -> int:
        return sum(len(c) for c in self.chunks)


class NestedOverhead:
    name: ClassVar[str] = "nested-overhead"
    question: ClassVar[str] = (
        "What does nested (2D) translation cost compared with native paging, and how much do "
        "paging-structure caches, the nested TLB and large pages take back?"
    )
    Params: ClassVar[type] = NestedOverheadParams
    demo: ClassVar[dict[str, str]] = {
        "accesses": "20000", "trace_accesses": "20000", "footprint_mib": "64", "seeds": "3"
    }
    keys: ClassVar[tuple[str, ...]] = ("workload", "mode", "guest_page", "ept_page", "pwc")

    def sources(self, p: NestedOverheadParams) -> Iterator[Source]:
        from ..workloads import make_workload

        footprint = p.footprint_mib << 20
        regions = BASE // (2 << 20) + np.arange(footprint // (2 << 20), dtype=np.int64)
        for name in p.workloads:
            workload = make_workload(name, footprint=footprint, seed=p.seed)
            chunks = list(workload.stream(BASE, p.accesses))
            yield Source(name, chunks, regions)
        trace = self._trace(p)
        if trace is not None:
            yield trace

    def _trace(self, p: NestedOverheadParams) -> Source | None:
        from ..traces import open_trace

        if p.trace == "":
            return None
        if p.trace == "auto":
            if shutil.which("valgrind") is None:
                return None
            path = _recorded(TRACE_COMMAND, p.trace_accesses)
            name = "trace:" + " ".join(TRACE_COMMAND)
        else:
            path, name = Path(p.trace), f"trace:{Path(p.trace).name}"
        chunks, total = [], 0
        for chunk in open_trace(path):
            take = min(len(chunk), p.trace_accesses - total)
            chunks.append(TraceChunk(chunk.address[:take], chunk.kind[:take], chunk.size[:take]))
            total += take
            if total >= p.trace_accesses:
                break
        regions = np.unique(np.concatenate([c.address >> 21 for c in chunks]))
        return Source(name, chunks, regions)

    def configurations(
        self, p: NestedOverheadParams
    ) -> list[tuple[str, PageSize, PageSize | None, bool]]:
        guest = [PageSize.parse(g) for g in p.guest_pages]
        ept = [PageSize.parse(e) for e in p.ept_pages]
        configs: list[tuple[str, PageSize, PageSize | None, bool]] = []
        for gp, pwc in product(guest, (False, True)):
            configs.append(("native", gp, None, pwc))
        for gp, ep, pwc in product(guest, ept, (False, True)):
            configs.append(("nested", gp, ep, pwc))
        return configs

    def rows(self, params: NestedOverheadParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: NestedOverheadParams, progress: Progress) -> Iterator[Row]:
        sources = list(self.sources(params))
        configs = self.configurations(params)
        total, done = len(sources) * len(configs), 0
        progress(0, total)
        spaces: dict[tuple[bytes, str, PageSize, PageSize | None], NestedSpace] = {}
        for source in sources:
            for mode, gp, ep, pwc in configs:
                # the workloads of one footprint map the same regions: build each space once
                # per seed and run every stream on a fresh copy of its memory (a run sets A/D
                # bits in the tables), which gives the rows a fresh build would
                key = (source.regions.tobytes(), mode, gp, ep)
                if key not in spaces:
                    spaces[key] = self.space(source, mode, gp, ep, params.seed)
                yield self.measure(source, mode, gp, ep, pwc, space=spaces[key])
                done += 1
                progress(done, total)

    @staticmethod
    def space(
        source: Source, mode: str, gp: PageSize, ep: PageSize | None, seed: int
    ) -> NestedSpace:
        """The address space ``source`` runs in: every 2 MiB region it touches, mapped."""
        space = NestedSpace.create(
            use_ept=mode == "nested",
            seed=seed,  # the aged layout's placement
            host_memory=1 << 46,
            guest_memory=1 << 46,
            table_ept_page=ep or PageSize.SIZE_4K,  # guest page tables live in guest RAM too
        )
        for region in source.regions.tolist():
            space.map_range(region << 21, 2 << 20, gp, ep or PageSize.SIZE_4K)
        return space

    def measure(
        self, source: Source, mode: str, gp: PageSize, ep: PageSize | None, pwc: bool,
        seed: int = 0, *, space: NestedSpace | None = None,
    ) -> Row:
        """One row: ``source`` run on (a copy of the memory of) ``space``, or on a space built
        for it with ``seed``."""
        space = space or self.space(source, mode, gp, ep, seed)
        config = MmuConfig() if pwc else MmuConfig(tlb=without_pwc())
        engine = Engine(copy.deepcopy(space.memory), config, space.features)
        engine.add_vcpu(space.guest, space.vmcs)
        for chunk in source.chunks:
            result = engine.run(Accesses.build(chunk.address, chunk.kind))
            if not result.done:
                raise RuntimeError(f"{source.name}: {result.exit or result.fault}")
        s = engine.stats()
        walks = max(1, s.walks)
        return {
            "workload": source.name,
            "mode": mode,
            "guest_page": gp.label,
            "ept_page": ep.label if ep is not None else "-",
            "pwc": pwc,
            "accesses": s.accesses,
            "walks": s.walks,
            "tlb_miss_rate": round(s.walks / max(1, s.accesses), 5),
            "refs_per_walk": round(s.walk_references / walks, 3),
            "guest_refs_per_walk": round(sum(s.guest_refs) / walks, 3),
            "ept_refs_per_walk": round(sum(s.ept_refs) / walks, 3),
            "cycles_per_access": round(s.cycles / max(1, s.accesses), 2),
            "translation_cycles_per_access": round(s.translation_cycles / max(1, s.accesses), 2),
        }

    def interpret(self, table: pd.DataFrame, params: NestedOverheadParams) -> list[str]:
        summary = summarize(table, self.keys)
        synthetic = summary[~summary.workload.str.startswith("trace:")]
        worst = (synthetic if len(synthetic) else summary).groupby(
            "workload"
        ).tlb_miss_rate.max().idxmax()

        def pick(mode: str, guest: str, ept: str, pwc: bool) -> pd.DataFrame:
            return by_seed(table, workload=worst, mode=mode, guest_page=guest,
                           ept_page=ept if mode == "nested" else "-", pwc=pwc)

        native = pick("native", "4k", "-", False)
        cold = pick("nested", "4k", "4k", False)
        warm = pick("nested", "4k", "4k", True)
        col = "translation_cycles_per_access"
        slower = ratio(cold[col], native[col])
        out = [
            f"On the {worst} workload (TLB miss rate "
            f"{interval(cold.tlb_miss_rate).scaled(100).text('{:.0f}', '%')}), a nested 4 KiB / "
            f"4 KiB walk makes {interval(cold.refs_per_walk).text('{:.1f}')} memory references "
            f"against {interval(native.refs_per_walk).text('{:.1f}')} native, and translation "
            f"costs {interval(cold[col]).text()} cycles per access against "
            f"{interval(native[col]).text()} ({times(slower)})."
        ]
        saved = reduction(cold[col], warm[col]).scaled(100)
        out.append(
            f"Paging-structure caches and the nested TLB cut the references per walk to "
            f"{interval(warm.refs_per_walk).text()} and translation to "
            f"{interval(warm[col]).text()} cycles per access ({saved.text('{:.0f}', '%')} less)."
        )
        if "2m" in params.guest_pages and "2m" in params.ept_pages:
            big = pick("nested", "2m", "2m", True)
            out.append(
                f"With 2 MiB pages in both dimensions the TLB miss rate falls to "
                f"{interval(big.tlb_miss_rate).scaled(100).text('{:.2f}', '%')} and translation "
                f"to {interval(big[col]).text('{:.2f}')} cycles per access."
            )
        return out

    def figures(self, table: pd.DataFrame, params: NestedOverheadParams) -> dict[str, Figure]:
        summary = summarize(table, self.keys)
        return {
            "nested-overhead-refs": _bars(summary, "refs_per_walk", "memory references per walk"),
            "nested-overhead-cycles": _bars(summary, "cycles_per_access", "cycles per access"),
        }



def _label(row: pd.Series) -> str:
    pages = (
        row["guest_page"] if row["mode"] == "native" else f"{row['guest_page']}/{row['ept_page']}"
    )
    return f"{row['mode']} {pages} {'pwc' if row['pwc'] else 'no-pwc'}"


def _bars(summary: pd.DataFrame, column: str, ylabel: str) -> Figure:
    """Bars of the means over seeds, 95% intervals as error bars."""
    workloads = list(dict.fromkeys(summary["workload"]))
    label_of = summary.apply(_label, axis=1)
    labels = list(dict.fromkeys(label_of))
    figure = Figure(figsize=(max(8, 1.6 * len(workloads)), 4.5))
    ax = figure.subplots()
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        values = []
        for w in workloads:
            rows = summary[(summary["workload"] == w) & (label_of == label)]
            values.append(at(rows.iloc[0], column) if len(rows) else Interval(0.0, 0.0, 0.0, 0))
        bars(ax, np.arange(len(workloads)) + i * width, values, width, label=label,
             color=colormaps["tab20"](i % 20))
    ax.set_xticks(np.arange(len(workloads)) + 0.4 - width / 2)
    ax.set_xticklabels([w.replace("trace:", "trace\n") for w in workloads], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel}: native vs nested, caches, page sizes (mean, 95% interval)")
    ax.legend(fontsize=6, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure
