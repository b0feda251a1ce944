"""integrity-monitor: what does it cost to watch a guest kernel's code from the EPT, and what
does each way of watching buy?

The same seeded guest (KASLR'd kernel image, slab area, static-key patch sites) runs the same
stream of ordinary kernel activity (code fetches, rodata reads, kernel-data and slab reads and
writes) with static-key flips (legitimate code patches) and injected hooks (malicious writes to
kernel code, through the direct map) under four monitors (:mod:`eptlab.apps.integrity`):
``none``; ``trap-code`` (code pages write-protected in the EPT, each write checked against the
allow-list of patch sites, then emulated or denied); ``trap-all`` (every kernel-image page
write-protected: the naive guard); ``pml`` (writes run free, page-modification logging records
first writes, the monitor reviews the log on log-full exits and every ``period`` accesses, then
clears the dirty flags it reviewed and runs INVEPT). A warm-up run precedes each measured run.

Columns:

| column | meaning |
|---|---|
| mode | `none`, `trap-code`, `trap-all`, `pml` |
| accesses | guest accesses in the measured stream |
| guest_writes | of which writes (ordinary, patches and hooks) |
| patch_writes | legitimate static-key writes to patch sites |
| patches_applied | of which reached memory (performed, or emulated by the monitor) |
| false_positives | detections of words no attack wrote, plus legitimate writes denied |
| vm_exits | VM exits during the measured run (all reasons; pml counts a timer exit per period) |
| ept_violation_exits, pml_full_exits, timer_exits | vm_exits by reason |
| exits_per_million_writes | vm_exits per 10^6 guest writes |
| emulated_writes | trapped writes completed in software by the monitor |
| invept | INVEPTs the monitor ran (the one at attach included, in every mode) |
| engine_cycles | the engine's cycles (translation + data) |
| monitor_cycles | exits x vmexit_cycles + emulation, INVEPT, EPT edits, PML review |
| overhead_cycles_pct | (engine + monitor cycles) over mode `none`'s, minus 1, in % |
| malicious_writes | hooks written to kernel code |
| detected | hooks the monitor reported |
| prevented | hooks that never reached memory |
| code_words_tampered | hooked words holding the attacker's value after the run |
| mean_detection_delay_accesses | accesses from a hook to its detection (empty: none found) |
| max_detection_delay_accesses | the longest of those delays |

It shows: `trap-all` takes orders of magnitude more exits than `trap-code` (every kernel-data
write exits), both detect every hook at once and prevent it; `pml` takes the fewest exits but
detects only at the next review (a delay of up to a period) and prevents nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.integrity import (
    MODES,
    KernelActivity,
    KernelGuest,
    Stream,
    StreamRunner,
)
from ..apps.integrity import IntegrityMonitor as Monitor
from ..arch.exits import ExitReason
from ..errors import ConfigError
from ..guest import KernelImage
from ..hv.costs import hv_costs
from ..hv.guest_runner import RunReport
from ..memory.layout import check_layout, in_layout
from .base import Progress, Row, check_choices
from .intervals import OVERLAP, bars, by_seed, column, interval, seeds_of, summarize, verdict, yerr

WARMUP_SEED = 1 << 20  # the warm-up stream's seed is the run's seed plus this


@dataclass(frozen=True)
class IntegrityMonitorParams:
    def validate(self) -> None:
        """Choices (before anything runs)."""
        check_choices("modes", self.modes, MODES)

    modes: tuple[str, ...] = MODES
    accesses: int = 1_000_000  # measured accesses per mode (before the code writes are added)
    warmup: int = 50_000  # accesses run before the monitor attaches
    period: int = 100_000  # pml: review the log every this many accesses
    patch_events: int = 24  # static-key flips
    patch_keys: int = 16
    sites_per_key: int = 4
    malicious_writes: int = 12
    attack_pages: int = 4  # code pages the hooks aim at
    code_mib: int = 16
    slab_mib: int = 8
    rearm_invept: bool = True  # pml: INVEPT after clearing dirty flags (False: the bug)
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


@dataclass
class ModeRun:
    """Everything one mode's run leaves behind (for tests and notebooks)."""

    mode: str
    guest: KernelGuest
    stream: Stream
    monitor: Monitor
    result: RunReport
    monitor_cycles: int


def run_mode(p: IntegrityMonitorParams, mode: str, progress: Progress | None = None) -> ModeRun:
    """Boot the guest, warm it up, attach the monitor in ``mode``, run the measured stream."""
    guest = KernelGuest(
        seed=p.seed,
        image=KernelImage(code=p.code_mib << 20),
        slab=p.slab_mib << 20,
        patch_keys=p.patch_keys,
        sites_per_key=p.sites_per_key,
    )
    if p.warmup > 0:  # caches, TLBs and the guest's direct map warm, kernel data dirty
        warm = KernelActivity(  # its own stream, no other seed's (seeds run as s, s+1, ...)
            accesses=p.warmup, patch_events=0, malicious_writes=0, seed=p.seed + WARMUP_SEED
        ).stream(guest)
        passive = Monitor(guest.vm, "none", code_pages=guest.code_pages)
        StreamRunner(guest, passive).run(warm, period=len(warm))
    activity = KernelActivity(
        accesses=p.accesses,
        patch_events=p.patch_events,
        malicious_writes=p.malicious_writes,
        attack_pages=p.attack_pages,
        seed=p.seed,
    )
    stream = activity.stream(guest)
    monitor = guest.monitor(mode, rearm_invept=p.rearm_invept)
    before = dataclasses.replace(monitor.counters)
    report = None if progress is None else (lambda done: progress(done, len(stream)))
    result = StreamRunner(guest, monitor).run(stream, period=p.period, progress=report)
    cycles = result.vm_exits * hv_costs().vmexit + monitor.counters.cycles() - before.cycles()
    return ModeRun(mode, guest, stream, monitor, result, cycles)


def measure(run: ModeRun) -> Row:
    """The row of one mode (``overhead_cycles_pct`` is filled in against ``none``)."""
    stream, monitor, result, guest = run.stream, run.monitor, run.result, run.guest
    malicious, patches = stream.malicious, stream.patches
    targets = {w.gpa for w in malicious}
    delays: list[int] = []
    for w in malicious:
        found = [d.at for d in monitor.detections if d.gpa == w.gpa and d.at >= w.index]
        if found:
            delays.append(min(found) - w.index)
    denied_patches = sum(1 for w in patches if monitor.decisions.get(w.index) == "denied")
    false_positives = sum(1 for d in monitor.detections if d.gpa not in targets) + denied_patches
    applied = sum(
        1
        for w in patches
        if w.index in result.performed_stores or monitor.decisions.get(w.index) == "allowed"
    )
    prevented = sum(
        1
        for w in malicious
        if w.index not in result.performed_stores and monitor.decisions.get(w.index) == "denied"
    )
    tampered = sum(1 for w in malicious if guest.read_word(w.gpa) == w.value)
    exits = result.exits
    c = monitor.counters
    return {
        "mode": run.mode,
        "accesses": result.accesses,
        "guest_writes": stream.guest_writes,
        "patch_writes": len(patches),
        "patches_applied": applied,
        "false_positives": false_positives,
        "vm_exits": result.vm_exits,
        "ept_violation_exits": exits[ExitReason.EPT_VIOLATION],
        "pml_full_exits": exits[ExitReason.PML_FULL],
        "timer_exits": exits[ExitReason.PREEMPTION_TIMER],
        "exits_per_million_writes": round(result.vm_exits * 1e6 / max(1, stream.guest_writes), 1),
        "emulated_writes": c.emulated,
        "invept": c.invept,
        "engine_cycles": result.engine_cycles,
        "monitor_cycles": run.monitor_cycles,
        "overhead_cycles_pct": 0.0,
        "malicious_writes": len(malicious),
        "detected": len(delays),
        "prevented": prevented,
        "code_words_tampered": tampered,
        "mean_detection_delay_accesses": round(float(np.mean(delays)), 1) if delays else None,
        "max_detection_delay_accesses": max(delays) if delays else None,
    }


class IntegrityMonitor:
    name: ClassVar[str] = "integrity-monitor"
    question: ClassVar[str] = (
        "What does watching a guest kernel's code from the EPT cost (trap code pages, trap the "
        "whole kernel, or log with PML), and which of them detect and prevent malicious writes?"
    )
    Params: ClassVar[type] = IntegrityMonitorParams
    demo: ClassVar[dict[str, str]] = {
        "accesses": "60000", "warmup": "10000", "period": "20000", "code_mib": "8", "seeds": "3"
    }
    keys: ClassVar[tuple[str, ...]] = ("mode",)

    def rows(self, params: IntegrityMonitorParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: IntegrityMonitorParams, progress: Progress) -> Iterator[Row]:
        for _, row in self.runs(params, progress):
            yield row

    def runs(
        self, params: IntegrityMonitorParams, progress: Progress
    ) -> Iterator[tuple[ModeRun, Row]]:
        """Each requested mode's run and row; mode ``none`` always runs first (the baseline
        of ``overhead_cycles_pct``)."""
        unknown = [m for m in params.modes if m not in MODES]
        if unknown or not params.modes:
            raise ConfigError("modes", f"{unknown or '()'}: choose from {', '.join(MODES)}")
        modes = ["none"] + [m for m in MODES if m in params.modes and m != "none"]
        total = len(modes) * params.accesses
        done = 0
        progress(0, total)
        baseline = 0
        for mode in modes:

            def report(d: int, _n: int, base: int = done) -> None:
                progress(min(total, base + d), total)

            run = run_mode(params, mode, report)
            row = measure(run)
            cycles = row["engine_cycles"] + row["monitor_cycles"]
            if mode == "none":
                baseline = cycles
            row["overhead_cycles_pct"] = round(100.0 * (cycles - baseline) / max(1, baseline), 2)
            done += params.accesses
            progress(done, total)
            if mode in params.modes:
                yield run, row

    def interpret(self, table: pd.DataFrame, params: IntegrityMonitorParams) -> list[str]:
        runs = {m: by_seed(table, mode=m) for m in dict.fromkeys(table["mode"])}

        def iv(mode: str, column: str, fmt: str = "{:,.0f}", unit: str = "") -> str:
            return interval(runs[mode][column]).text(fmt, unit)

        out = []
        if {"trap-code", "trap-all"} <= set(runs):
            fewer = verdict(
                interval(runs["trap-code"].vm_exits), interval(runs["trap-all"].vm_exits),
                "more", "fewer",
            )
            out.append(
                f"Trapping writes to the kernel code only takes {iv('trap-code', 'vm_exits')} VM "
                f"exits ({iv('trap-code', 'overhead_cycles_pct', '{:.1f}', '%')} cycles) against "
                f"{iv('trap-all', 'vm_exits')} "
                f"({iv('trap-all', 'overhead_cycles_pct', '{:.0f}', '%')}) for trapping every "
                f"write{f' ({fewer})' if fewer == OVERLAP else ''}; they detect "
                f"{iv('trap-code', 'detected')} and {iv('trap-all', 'detected')} of the "
                f"{iv('trap-code', 'malicious_writes')} malicious writes and prevent "
                f"{iv('trap-code', 'prevented')} and {iv('trap-all', 'prevented')}."
            )
        if "pml" in runs:
            out.append(
                f"Page-modification logging reviewed every {params.period:,} accesses needs "
                f"{iv('pml', 'vm_exits')} exits ({iv('pml', 'overhead_cycles_pct', '{:.1f}', '%')}"
                f" cycles) and detects {iv('pml', 'detected')}/{iv('pml', 'malicious_writes')} "
                f"after {iv('pml', 'mean_detection_delay_accesses')} accesses on average, but "
                f"prevents {iv('pml', 'prevented')}: the code is already changed when the log is "
                f"read."
            )
        fp = int(table.false_positives.sum())
        out.append(
            f"Legitimate code patches: {int(table.patches_applied.max())} per run; false alarms "
            f"over all modes and {seeds_of(table)} seed(s): {fp}."
        )
        return out

    def figures(self, table: pd.DataFrame, params: IntegrityMonitorParams) -> dict[str, Figure]:
        summary = summarize(table, self.keys)
        modes = list(summary["mode"])
        x = np.arange(len(modes))
        figure = Figure(figsize=(12, 4))
        ax_exits, ax_cost, ax_delay = figure.subplots(1, 3)
        exits = summary["vm_exits"].astype(float).to_numpy()
        shown = column(summary, "vm_exits")
        ax_exits.bar(x, np.where(exits > 0, exits, np.nan), color="tab:red",
                     yerr=yerr(shown), capsize=2)
        ax_exits.set_yscale("log")
        ax_exits.set_ylim(bottom=0.5, top=max(10.0, float(exits.max()) * 4))
        ax_exits.set_ylabel("VM exits (log scale)")
        ax_exits.set_title("exits per mode (mean, 95% interval)")
        for i, v in enumerate(exits):
            ax_exits.annotate(f"{v:,.0f}", (i, max(v, 0.6)), ha="center", va="bottom", fontsize=8)
        overhead = summary["overhead_cycles_pct"].astype(float).to_numpy()
        bars(ax_cost, x, column(summary, "overhead_cycles_pct"), color="tab:blue")
        for i, v in enumerate(overhead):
            ax_cost.annotate(f"{v:.1f}%", (i, max(v, 0.0)), ha="center", va="bottom", fontsize=8)
        ax_cost.set_ylabel("cycles over mode none (%)")
        ax_cost.set_title("overhead (engine + exits + monitor work)")
        bars(ax_delay, x, column(summary, "mean_detection_delay_accesses"), color="tab:green",
             label="mean")
        worst = pd.to_numeric(summary["max_detection_delay_accesses"], errors="coerce")
        ax_delay.scatter(x, worst, color="black", marker="_", s=200, label="max (mean)",
                         zorder=3)
        for i, row in enumerate(summary.itertuples()):
            label = (
                f"{row.detected:.3g}/{row.malicious_writes:.3g} det.\n{row.prevented:.3g} prev."
            )
            ax_delay.annotate(label, (i, 0), ha="center", va="bottom", fontsize=7)
        ax_delay.set_ylabel("accesses from hook to detection")
        ax_delay.set_title(f"detection delay (pml period {params.period:,})")
        ax_delay.legend(fontsize=7)
        for ax in (ax_exits, ax_cost, ax_delay):
            ax.set_xlim(-0.6, len(modes) - 0.4)
            ax.set_xticks(x)
            ax.set_xticklabels(modes, fontsize=8)
        figure.suptitle(f"integrity monitoring from the EPT ({seeds_of(table)} seed(s))")
        figure.tight_layout()
        return {"integrity-monitor": figure}
