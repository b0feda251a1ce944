"""model-vs-machine: how close does the simulator's timing come to this machine, and which
outer EPT page size behind this VM does it fit best?

The same access patterns run natively (through the C helper, :mod:`eptlab.native`) on 4 KiB and
on 2 MiB pages, and in the fast engine with the configuration closest to this machine: the TLB
geometry of Golden Cove (Sapphire Rapids' core), the L1d/L2/LLC sizes and ways this machine
reports (``/sys/devices/system/cpu/cpu0/cache``, what ``lscpu`` reads), the latencies of the cost
profile (normally the one ``eptlab calibrate`` wrote), guest pages as the native run's pages,
and each outer EPT page size the host might back this VM with (4 KiB, 2 MiB, 1 GiB: unknown
from inside the guest).

Sampling. The simulator performs accesses one by one, so it does not run the native run's
accesses over a multi-GiB footprint: it runs ``sim_warmup`` then ``sim_accesses`` accesses of
the same kind of stream over the full footprint's address range (the page tables of the whole
range are built; the engine's caches start cold and warm up during ``sim_warmup``). With a
large LLC, the warm-up is far shorter than the native run's: the model's LLC holds fewer of the
footprint's lines than the machine's does, which lowers its LLC hits on footprints near the
LLC's size.

Columns: pattern, footprint_bytes, page_size, outer_ept_page, measured_cycles_per_access,
predicted_cycles_per_access, error_pct (= 100 * (predicted - measured) / measured),
measured_spread, native_pattern, huge_pages_obtained, tlb_miss_rate, walk_refs_per_access,
dram_per_access (and ``seed`` first, from the seeds driver).

Seeds. Each seed measures afresh (the native buffer's chain and offsets are drawn from it; the
machine's state varies between runs too) and draws its own simulated stream and aged layout.
The reading takes, per seed, the median over configurations and quotes its mean and 95%
interval over the seeds; outer page sizes whose intervals overlap are named together.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..arch.bits import PageSize
from ..costs import CostProfile, load_profile
from ..errors import ConfigError
from ..memory.layout import check_layout, in_layout
from ..mmu.config import Assoc, CacheConfig, CacheLevel, CostModel, MmuConfig, TlbConfig
from ..mmu.engine import Accesses, Engine
from ..mmu.scenario import NestedSpace
from .base import Progress, Row, check_choices, check_range
from .intervals import SEED, Interval, interval, one_seed_note

BASE = 0x0000_2000_0000_0000
MiB = 1 << 20
PATTERNS = ("random", "pointer-chase", "gups", "sequential")
OUTER_EPT_PAGES = ("4k", "2m", "1g")
SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
TIE_POINTS = 1.0  # outer page sizes whose median errors differ by less fit equally well
TIE_CYCLES = 1.0
SERIAL = "pointer-chase"

# Golden Cove (the core of Sapphire Rapids) data-side TLBs, from the Intel 64 and IA-32
# Architectures Optimization Reference Manual, Golden Cove microarchitecture section (TLB
# parameters): load DTLB 96 entries 6-way for 4 KiB pages, 32 entries 4-way for 2M/4M, 8
# entries 8-way for 1 GiB; STLB 2048 entries 16-way for 4 KiB and 2 MiB pages (one shared
# array on the part; two arrays of that shape here), 1024 entries 8-way for 1 GiB. CPUID leaf
# 0x18, which would report them, reads as empty inside this KVM guest. The paging-structure
# caches, the nested TLB and the EPT paging-structure caches are not documented: the engine's
# defaults (guesses) stay.
MACHINE_TLB = TlbConfig(
    l1d_4k=Assoc(16, 6),
    l1d_2m=Assoc(8, 4),
    l1d_1g=Assoc(1, 8),
    stlb_4k=Assoc(128, 16),
    stlb_2m=Assoc(128, 16),
    stlb_1g=Assoc(128, 8),
)


@dataclass(frozen=True)
class ModelVsMachineParams:
    def validate(self) -> None:
        """Choices and ranges (before anything runs)."""
        check_choices("patterns", self.patterns, PATTERNS)
        check_choices("pages", self.pages, ("4k", "2m"))
        check_choices("outer_ept_pages", self.outer_ept_pages, OUTER_EPT_PAGES)
        check_range("footprints_mib", self.footprints_mib, 1)
        check_range("repeats", self.repeats, 1)
        check_range("native_accesses", self.native_accesses, 1)
        check_range("sim_accesses", self.sim_accesses, 1)

    patterns: tuple[str, ...] = PATTERNS
    footprints_mib: tuple[int, ...] = (1024, 4096, 16384)
    pages: tuple[str, ...] = ("4k", "2m")
    outer_ept_pages: tuple[str, ...] = OUTER_EPT_PAGES
    native_accesses: int = 200_000  # per timed repeat
    repeats: int = 3
    chase_max_mib: int = 1024  # above: a dependent random walk instead of a built chain
    seq_scan_mib: int = 1024  # bytes one sequential repeat scans (64-byte stride)
    sim_warmup: int = 100_000
    sim_accesses: int = 200_000
    memory_margin_mib: int = 2048  # left free besides the native buffer
    seeds: int = 5  # each seed: its own native buffer contents/chain and simulated stream
    seed: int = 0
    layout: str = "aged"  # the simulated guest's memory layout: aged or contiguous

    def __post_init__(self) -> None:
        check_layout(self.layout)


@dataclass(frozen=True)
class Measured:
    cycles: float
    spread: float
    native_pattern: str
    huge: bool


def machine_caches(profile: CostProfile) -> tuple[CacheConfig, str]:
    """L1d, L2 and LLC as this machine reports them, with ``profile``'s latencies (the
    engine's defaults where sysfs says nothing). Sets are rounded down to a power of two and
    the ways raised to keep the size. Also a one-line description."""
    found: dict[int, tuple[int, int]] = {}
    for index in sorted(SYSFS_CACHE.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = int((index / "size").read_text().strip().rstrip("K")) * 1024
            ways = int((index / "ways_of_associativity").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and 1 <= level <= 3:
            found[level] = (size, ways)
    default = CacheConfig.from_profile(profile)
    levels = []
    notes = []
    for level, name, fallback in ((1, "l1", default.l1), (2, "l2", default.l2),
                                  (3, "llc", default.llc)):
        latency = profile.cycles(f"{name}_latency")
        if level not in found:
            levels.append(CacheLevel(fallback.size, fallback.ways, latency))
            notes.append(f"{name} {fallback.size // 1024} KiB (default)")
            continue
        size, ways = found[level]
        sets = 1 << int(np.log2(max(1, size // (64 * ways))))
        ways = size // (64 * sets)
        if ways > 64:
            raise ConfigError("caches", f"{name}: {size} bytes need {ways} ways at {sets} sets")
        levels.append(CacheLevel(sets * ways * 64, ways, latency))
        notes.append(f"{name} {sets * ways * 64 // 1024} KiB {ways}-way")
    cache = CacheConfig(levels[0], levels[1], levels[2], profile.cycles("dram_latency"))
    return cache, ", ".join(notes)


def machine_config(profile: CostProfile) -> MmuConfig:
    cache, _ = machine_caches(profile)
    return MmuConfig(tlb=MACHINE_TLB, cache=cache, cost=CostModel.from_profile(profile))


def _sim_workload(pattern: str, footprint: int, seed: int) -> Any:
    from ..workloads import make_workload

    if pattern == "sequential":
        return make_workload("strided", footprint=footprint, stride=64, seed=seed)
    return make_workload(pattern, footprint=footprint, seed=seed)


class ModelVsMachine:
    name: ClassVar[str] = "model-vs-machine"
    question: ClassVar[str] = (
        "How close does the simulator's timing come to this machine, and which outer EPT page "
        "size behind this VM does it fit best?"
    )
    Params: ClassVar[type] = ModelVsMachineParams
    # huge_pages_obtained: a 2 MiB-page run that did not get them measured 4 KiB pages, so its
    # seeds are summarized apart from those that did
    keys: ClassVar[tuple[str, ...]] = (
        "pattern", "footprint_bytes", "page_size", "outer_ept_page", "huge_pages_obtained"
    )
    demo: ClassVar[dict[str, str]] = {
        "footprints_mib": "8,64",
        "native_accesses": "20000",
        "repeats": "2",
        "seq_scan_mib": "16",
        "sim_warmup": "20000",
        "sim_accesses": "20000",
        "memory_margin_mib": "256",
        "seeds": "3",
    }

    def _check(self, p: ModelVsMachineParams) -> None:
        for pattern in p.patterns:
            if pattern not in PATTERNS:
                raise ConfigError("patterns", f"{pattern!r} is not one of {', '.join(PATTERNS)}")
        for page in p.pages:
            if page not in ("4k", "2m"):
                raise ConfigError("pages", f"{page!r} is not 4k or 2m")
        for page in p.outer_ept_pages:
            if page not in OUTER_EPT_PAGES:
                raise ConfigError("outer_ept_pages", f"{page!r} is not one of 4k, 2m, 1g")
        for mib in p.footprints_mib:
            if mib < 1 or mib & (mib - 1):
                raise ConfigError("footprints_mib", f"{mib} is not a power of two >= 1")
        for name in ("native_accesses", "repeats", "sim_accesses", "seq_scan_mib"):
            if getattr(p, name) < 1:
                raise ConfigError(name, "must be at least 1")

    def rows(self, params: ModelVsMachineParams, progress: Progress) -> Iterator[Row]:
        # every simulated guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: ModelVsMachineParams, progress: Progress) -> Iterator[Row]:
        from .. import native

        p = params
        self._check(p)
        profile = load_profile(None)  # the run's: eptlab run model-vs-machine --profile FILE
        config = machine_config(profile)
        footprints = []
        for mib in p.footprints_mib:
            need = (mib + p.memory_margin_mib) * MiB
            free = native.mem_available()
            if need > free:
                print(f"model-vs-machine: skipping {mib} MiB: it needs {need // MiB} MiB free "
                      f"(footprint + margin), the machine has {free // MiB} MiB",
                      file=sys.stderr)
                continue
            footprints.append(mib * MiB)
        per = len(p.patterns) * len(p.pages)
        total, done = len(footprints) * per * (1 + len(p.outer_ept_pages)), 0
        progress(0, total)
        for footprint in footprints:
            measured: dict[tuple[str, str], Measured] = {}
            for page in p.pages:
                with native.Buffer(footprint, page) as buffer:  # type: ignore[arg-type]
                    for pattern in p.patterns:
                        measured[pattern, page] = self._native(p, pattern, footprint, page,
                                                               buffer)
                        done += 1
                        progress(done, total)
            for page in p.pages:
                for outer in p.outer_ept_pages:
                    space = self._space(footprint, page, outer, p.seed)
                    for pattern in p.patterns:
                        yield self._row(p, config, space, pattern, footprint, page, outer,
                                        measured[pattern, page])
                        done += 1
                        progress(done, total)

    def _native(self, p: ModelVsMachineParams, pattern: str, footprint: int, page: str,
                buffer: Any) -> Measured:
        from .. import native

        run = pattern
        accesses, stride = p.native_accesses, 8
        if pattern == "pointer-chase" and footprint > p.chase_max_mib * MiB:
            run = "dependent-random"  # a chain over this many nodes takes too long to build
        elif pattern == "sequential":
            stride = 64
            accesses = max(16, min(footprint, p.seq_scan_mib * MiB) // 64)
        result = native.run_pattern(run, footprint, page, accesses=accesses,  # type: ignore[arg-type]
                                    seed=p.seed, repeats=p.repeats, stride=stride, buffer=buffer)
        return Measured(result.cycles_per_access, result.cycles.spread, run,
                        page == "4k" or result.huge_pages_obtained)

    def _space(self, footprint: int, page: str, outer: str, seed: int = 0) -> NestedSpace:
        guest, ept = PageSize.parse(page), PageSize.parse(outer)
        space = NestedSpace.create(host_memory=1 << 46, guest_memory=1 << 46,
                                   table_ept_page=ept, seed=seed)
        region = max(footprint, 2 * MiB, int(max(guest, ept)))  # whole 2 MiB pieces and pages
        space.map_range(BASE, region, guest, ept)
        return space

    def _row(self, p: ModelVsMachineParams, config: MmuConfig, space: NestedSpace,
             pattern: str, footprint: int, page: str, outer: str, measured: Measured) -> Row:
        engine = Engine(space.memory, config, space.features)
        engine.add_vcpu(space.guest, space.vmcs)
        workload = _sim_workload(pattern, footprint, p.seed)
        first = True
        for chunk in workload.stream(BASE, p.sim_warmup + p.sim_accesses, p.sim_warmup):
            result = engine.run(Accesses.build(chunk.address, chunk.kind))
            if not result.done:
                raise RuntimeError(f"{pattern}: {result.exit or result.fault}")
            if first:  # the warm-up chunk: its statistics are dropped, its cache state kept
                engine.reset_stats()
                first = False
        s = engine.stats()
        n = max(1, s.accesses)
        predicted = s.cycles / n
        shown_measured = max(round(measured.cycles, 2), 0.01)
        shown_predicted = round(predicted, 2)
        return {
            "pattern": pattern,
            "footprint_bytes": footprint,
            "page_size": page,
            "outer_ept_page": outer,
            "measured_cycles_per_access": shown_measured,
            "predicted_cycles_per_access": shown_predicted,
            # from the two numbers as the row shows them, so a reader can recompute it
            "error_pct": round(100 * (shown_predicted - shown_measured) / shown_measured, 1),
            "measured_spread": round(measured.spread, 2),
            "native_pattern": measured.native_pattern,
            "huge_pages_obtained": measured.huge,
            "tlb_miss_rate": round(s.walks / n, 5),
            "walk_refs_per_access": round(s.walk_references / n, 3),
            "dram_per_access": round((s.data_served[3] + s.walk_refs_served[3]) / n, 3),
        }

    def interpret(self, table: pd.DataFrame, params: ModelVsMachineParams) -> list[str]:
        if table.empty:
            return ["No footprint fitted in free memory: nothing was measured."]
        # a 2 MiB-page row whose buffer did not get 2 MiB pages measured something else
        valid = table.huge_pages_obtained.astype(bool) | (table.page_size != "2m")
        if not valid.any():
            return ["No row measured what it predicts (2 MiB pages were not obtained)."]
        t = table[valid].assign(abs_error=table[valid].error_pct.abs())
        if SEED not in t.columns:
            t = t.assign(**{SEED: 0})
        overall = _per_seed_median(t, "outer_ept_page", "abs_error")
        # The fit is judged where the model's missing memory-level parallelism does not enter:
        # the serial pattern (one load waits for the one before), when it was run.
        serial = t[t.pattern == SERIAL]
        basis, where = (serial, f"the serial {SERIAL} rows") if len(serial) else (t, "all rows")
        by_outer = _per_seed_median(basis, "outer_ept_page", "abs_error")
        best = min(by_outer, key=lambda o: by_outer[o].mean)
        close = [o for o in by_outer if _tied(by_outer[o], by_outer[best], TIE_POINTS)]
        fit = (f"{best} fits best" if len(close) == 1 else
               f"{' and '.join(close)} fit equally well (within {TIE_POINTS:.0f} point or "
               "the interval)")
        pct = "{:.0f}"
        out = [
            f"Median absolute error by outer EPT page size on {where}: "
            + ", ".join(f"{o} {by_outer[o].text(pct, '%')}" for o in by_outer)
            + f"; {fit}. Over every row: "
            + ", ".join(f"{o} {overall[o].text(pct, '%')}" for o in overall) + "."
        ]
        per_pattern = _per_seed_median(t[t.outer_ept_page == best], "pattern", "error_pct")
        out.append(
            f"With {best} outer pages, the median error per pattern is "
            + ", ".join(f"{k} {v.text('{:+.0f}', '%')}" for k, v in per_pattern.items())
            + " (positive: the model predicts slower than measured)."
        )
        penalty = _page_penalty(basis)
        if not penalty.empty:
            error = _per_seed_median(penalty, "outer_ept_page", "penalty_error", clip=False)
            near_to = min(error, key=lambda o: abs(error[o].mean))
            near = [o for o in error
                    if _tied(_abs(error[o]), _abs(error[near_to]), TIE_CYCLES)]
            out.append(
                f"The 4 KiB-over-2 MiB page penalty on {where} (cycles per access, predicted "
                "minus measured, median over footprints): "
                + ", ".join(f"{o} {error[o].text('{:+.1f}')}" for o in error)
                + f"; it fits best with {' or '.join(near)} outer pages"
                + (f" (within {TIE_CYCLES:.0f} cycle or the interval)." if len(near) > 1
                   else ".")
            )
        if not valid.all():
            missed = sorted({int(b) >> 20 for b in table[~valid].footprint_bytes})
            out.append("Natively, " + ", ".join(f"{m} MiB" for m in missed)
                       + f" did not get 2 MiB pages throughout ({int((~valid).sum())} of the "
                       "rows: huge_pages_obtained false); the errors above leave them out.")
        return out + one_seed_note(t)

    def figures(self, table: pd.DataFrame, params: ModelVsMachineParams) -> dict[str, Figure]:
        figure = Figure(figsize=(7.5, 6))
        ax = figure.subplots()
        markers = {"random": "o", "pointer-chase": "s", "gups": "^", "sequential": "D"}
        colors = {"4k": "tab:blue", "2m": "tab:orange", "1g": "tab:green"}
        for (pattern, outer), rows in table.groupby(["pattern", "outer_ept_page"]):
            ax.scatter(rows.measured_cycles_per_access, rows.predicted_cycles_per_access,
                       marker=markers.get(str(pattern), "x"), color=colors.get(str(outer)),
                       label=f"{pattern}, outer {outer}", alpha=0.8)
        if not table.empty:
            top = float(max(table.measured_cycles_per_access.max(),
                            table.predicted_cycles_per_access.max())) * 1.3
            low = float(min(table.measured_cycles_per_access.min(),
                            table.predicted_cycles_per_access.min())) / 1.3
            ax.plot([low, top], [low, top], color="grey", linewidth=1, label="predicted = measured")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("measured cycles per access (this machine)")
        ax.set_ylabel("predicted cycles per access (simulator)")
        ax.set_title("model vs machine: every pattern, footprint and page size")
        ax.legend(fontsize=6, loc="upper left")
        return {"model-vs-machine": figure}


def _per_seed_median(
    table: pd.DataFrame, by: str, column: str, *, clip: bool = True
) -> dict[str, Interval]:
    """Per value of ``by`` (outer EPT pages in size order): the median of ``column`` over the
    configurations of each seed, as a mean and 95% interval over the seeds."""
    medians = table.groupby([by, SEED])[column].median()
    found = list(dict.fromkeys(medians.index.get_level_values(0)))
    order = [o for o in OUTER_EPT_PAGES if o in found] if by == "outer_ept_page" else found
    return {str(k): interval(medians.loc[k], clip=clip) for k in order}


def _tied(a: Interval, b: Interval, points: float) -> bool:
    """``a`` fits as well as ``b``: their means within ``points`` or their intervals overlap."""
    return abs(a.mean - b.mean) < points or (a.n > 1 and a.overlaps(b))


def _abs(iv: Interval) -> Interval:
    low, high = sorted((abs(iv.lo), abs(iv.hi)))
    if iv.lo <= 0 <= iv.hi:
        low = 0.0
    return Interval(abs(iv.mean), low, high, iv.n)


def _page_penalty(table: pd.DataFrame) -> pd.DataFrame:
    """Per pattern, footprint and outer EPT page: measured and predicted cycles of 4 KiB pages
    minus those of 2 MiB pages, and their difference."""
    keys = ["pattern", "footprint_bytes", "outer_ept_page", SEED]
    cols = ["measured_cycles_per_access", "predicted_cycles_per_access"]
    small = table[table.page_size == "4k"].set_index(keys)[cols]
    large = table[table.page_size == "2m"].set_index(keys)[cols]
    both = small.join(large, suffixes=("_4k", "_2m"), how="inner")
    if both.empty:
        return pd.DataFrame(columns=[*keys, "penalty_error"])
    measured = both.measured_cycles_per_access_4k - both.measured_cycles_per_access_2m
    predicted = both.predicted_cycles_per_access_4k - both.predicted_cycles_per_access_2m
    return both.assign(penalty_error=predicted - measured).reset_index()
