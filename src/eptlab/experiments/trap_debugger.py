"""trap-debugger: how much of a guest's wild-pointer bugs does a hypervisor catch by trapping a
rotating random sample of its heap pages in the EPT, at what cost, and how many false alarms
does it raise before and after filtering?

One guest heap program (allocations, frees, reads and writes of live objects, the allocator's
ownership reports) with injected bugs is run once per configuration on a freshly booted guest:

``none``
    no debugger: the allocator does not report, nothing is trapped (the baseline).
``sampled``
    every ``fraction`` x ``period`` of the grid: ``mode`` (write or all), ``resume``.
``trap-all``
    every heap page trapped for the whole run (no rotation).
``compare``
    ``compare_fraction`` at the first period with each ``mode/resume`` of ``compare``.

Columns (one row per configuration):

| column | meaning |
|---|---|
| config, mode, resume | the configuration |
| trap_fraction | share of the heap pages trapped at any time (0 for none, 1 for trap-all) |
| period | accesses between rotations (empty: no rotation) |
| pages_trapped | pages in each sample |
| accesses | stream accesses (program, ownership reports, bug writes) |
| guest_writes | of which writes |
| bugs_injected, bug_writes | defects and their writes (the first write of a bug injects it) |
| bugs_detected | defects with at least one write reported |
| detection_rate | bugs_detected / bugs_injected (undetected bugs count against it) |
| expected_detection_rate | the sampling-theory rate for these bug writes (KFENCE's argument) |
| bugs_detected_unfiltered | defects the unfiltered view (map as of the last flush) catches |
| mean_time_to_detect | accesses from a bug's first write to its first report (detected bugs) |
| false_positives | reports on writes that are no bug (after the filter) |
| false_positives_sync_only | alarms with the ring synced but no allocator allow-list |
| false_positives_unfiltered | alarms of the unfiltered view |
| metadata_writes_allowed | allocator link stores into free memory let through by the allow-list |
| trapped_writes, trapped_reads | EPT violations on trapped pages, by access |
| emulated, stepped | trapped accesses completed by emulation / single-stepped with MTF |
| vm_exits | all exits of the measured run |
| ept_violation_exits, mtf_exits, vmcall_exits, timer_exits | vm_exits by reason |
| ept_edits, invept | EPT entries changed, INVEPTs run (attach included) |
| engine_cycles | the engine's cycles (translation + data, refill walks after INVEPT included) |
| debugger_cycles | exits x vmexit_cycles + emulation, checks, ring events, EPT edits, INVEPT |
| overhead_cycles_pct | (engine + debugger cycles) over none's engine cycles, minus 1, in % |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from ..apps.heap_guest import HeapGuest, HeapProgram, HeapWorkload, TrapStream
from ..apps.heap_guest import expected_detection as sampling_theory
from ..apps.trap_debugger import MODES, RESUMES, Score, score
from ..apps.trap_debugger import TrapDebugger as Debugger
from ..arch.bits import PAGE_SIZE
from ..arch.exits import ExitReason
from ..errors import ConfigError
from ..hv.costs import hv_costs
from ..hv.guest_runner import GuestRunner, Passive, RunReport
from ..memory.layout import check_layout, in_layout
from .base import Progress, Row
from .intervals import (
    OVERLAP,
    Interval,
    by_seed,
    column,
    interval,
    relation,
    seeds_of,
    summarize,
    yerr,
)


@dataclass(frozen=True)
class TrapDebuggerParams:
    def validate(self) -> None:
        """See :func:`configs` (before anything runs)."""
        configs(self)

    fractions: tuple[float, ...] = (0.02, 0.05, 0.1, 0.25)
    periods: tuple[int, ...] = (1_000, 10_000, 100_000)  # accesses between rotations
    mode: str = "write"  # write: revoke W; all: revoke R, W and X
    resume: str = "emulate"  # emulate, or mtf (single-step with the permission restored)
    trap_all: bool = True
    compare: tuple[str, ...] = ("all/emulate", "write/mtf")  # mode/resume at compare_fraction
    compare_fraction: float = 0.1
    batch: int = 32  # ownership events per flush hypercall
    invept: bool = True  # INVEPT after revoking (False: the bug)
    heap_pages: int = 512
    accesses: int = 200_000
    warmup: int = 20_000
    live_objects: int = 1_500
    accesses_per_op: int = 40
    bugs: int = 100
    writes_per_bug: float = 4.0
    bug_span: int = 40_000
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)

    def workload(self) -> HeapWorkload:
        return HeapWorkload(
            accesses=self.accesses,
            warmup=self.warmup,
            live_objects=self.live_objects,
            accesses_per_op=self.accesses_per_op,
            bugs=self.bugs,
            writes_per_bug=self.writes_per_bug,
            bug_span=self.bug_span,
            seed=self.seed,
        )


@dataclass(frozen=True)
class Config:
    name: str  # none, sampled, trap-all, compare
    fraction: float = 0.0
    period: int | None = None
    mode: str = "write"
    resume: str = "emulate"


def configs(p: TrapDebuggerParams) -> list[Config]:
    """The configurations the parameters ask for, ``none`` first; bad values raise."""
    for name, values, allowed in (("mode", (p.mode,), MODES), ("resume", (p.resume,), RESUMES)):
        if values[0] not in allowed:
            raise ConfigError(name, f"{values[0]!r} is not one of {', '.join(allowed)}")
    if any(not isinstance(f, float) or not 0.0 < f < 1.0 for f in p.fractions):
        raise ConfigError("fractions", f"{p.fractions}: each must be in (0, 1)")
    if any(not isinstance(t, int) or t < 1 for t in p.periods):
        raise ConfigError("periods", f"{p.periods}: each must be a positive number of accesses")
    if p.fractions and not p.periods:
        raise ConfigError("periods", "sampled configurations need at least one period")
    if not 1 <= p.batch <= 511:
        raise ConfigError("batch", "must be in 1..511 (the ring's slots)")
    out = [Config("none")]
    out += [
        Config("sampled", f, t, p.mode, p.resume) for t in sorted(p.periods) for f in p.fractions
    ]
    if p.trap_all:
        out.append(Config("trap-all", 1.0, None, p.mode, p.resume))
    for spec in p.compare:
        mode, _, resume = spec.partition("/")
        if mode not in MODES or resume not in RESUMES:
            raise ConfigError("compare", f"{spec!r} is not MODE/RESUME ({MODES} / {RESUMES})")
        if not 0.0 < p.compare_fraction <= 1.0:
            raise ConfigError("compare_fraction", "must be in (0, 1]")
        period = min(p.periods) if p.periods and p.compare_fraction < 1.0 else None
        out.append(Config("compare", p.compare_fraction, period, mode, resume))
    return out


@dataclass
class ConfigRun:
    """Everything one configuration's run leaves behind (for tests and notebooks)."""

    config: Config
    guest: HeapGuest
    stream: TrapStream
    debugger: Debugger | None
    report: RunReport
    score: Score


def run_config(
    p: TrapDebuggerParams,
    program: HeapProgram,
    config: Config,
    progress: Progress | None = None,
) -> ConfigRun:
    """Boot a guest, lay the boot phase in memory, warm it up, attach the debugger (unless
    ``none``), run the measured stream."""
    guest = HeapGuest(heap_pages=p.heap_pages, seed=p.seed)
    guest.apply_boot(program)
    GuestRunner(guest.vcpu, Passive()).run(
        program.warmup_gva, program.warmup_kind, period=max(1, len(program.warmup_gva))
    )
    debugger = None
    if config.name == "none":
        stream = program.layout(notify=False)
        policy: Debugger | Passive = Passive()
    else:
        stream = program.layout(notify=True, batch=p.batch)
        debugger = Debugger(
            guest.vm,
            guest.pages,
            guest.ring,
            fraction=config.fraction,
            mode=config.mode,
            resume=config.resume,
            invept=p.invept,
            seed=p.seed,
        )
        debugger.attach(program.boot_events)
        policy = debugger
    n = len(stream)
    report = GuestRunner(guest.vcpu, policy).run(
        stream.gva,
        stream.kind,
        values=stream.values,
        calls=stream.calls,
        period=config.period or max(1, n),
        final_timer=False,
        progress=None if progress is None else (lambda done: progress(done, n)),
    )
    return ConfigRun(config, guest, stream, debugger, report, score(stream, debugger))


def measure(run: ConfigRun, baseline_cycles: int) -> Row:
    c, s, r, d = run.config, run.score, run.report, run.debugger
    counters = d.counters if d is not None else None
    debugger_cycles = r.vm_exits * hv_costs().vmexit + (counters.cycles() if counters else 0)
    total = r.engine_cycles + debugger_cycles
    if d is None or d.sampled == 0:
        expected = 0.0
    elif c.period is None or d.sampled >= len(d.pages):
        expected = 1.0
    else:
        positions = run.stream.bug_positions
        hit = [[run.stream.firings[q][1] & ~(PAGE_SIZE - 1) for q in b] for b in positions]
        expected = sampling_theory(
            positions, hit, pages=len(d.pages), sampled=d.sampled, period=c.period
        )
    mean = s.mean_time_to_detect
    return {
        "config": c.name,
        "mode": c.mode if d is not None else "-",
        "resume": c.resume if d is not None else "-",
        "trap_fraction": c.fraction,
        "period": c.period,
        "pages_trapped": d.sampled if d is not None else 0,
        "accesses": r.accesses,
        "guest_writes": int(np.count_nonzero(run.stream.kind == 1)),
        "bugs_injected": s.bugs_injected,
        "bug_writes": s.bug_writes,
        "bugs_detected": s.bugs_detected,
        "detection_rate": round(s.detection_rate, 4),
        "expected_detection_rate": round(expected, 4),
        "bugs_detected_unfiltered": s.bugs_detected_unfiltered,
        "mean_time_to_detect": None if mean is None else round(mean, 1),
        "false_positives": s.false_positives,
        "false_positives_sync_only": s.false_positives_sync_only,
        "false_positives_unfiltered": s.false_positives_unfiltered,
        "metadata_writes_allowed": counters.metadata_writes if counters else 0,
        "trapped_writes": counters.trapped_writes if counters else 0,
        "trapped_reads": counters.trapped_reads if counters else 0,
        "emulated": counters.emulated if counters else 0,
        "stepped": counters.stepped if counters else 0,
        "vm_exits": r.vm_exits,
        "ept_violation_exits": r.exits[ExitReason.EPT_VIOLATION],
        "mtf_exits": r.exits[ExitReason.MONITOR_TRAP_FLAG],
        "vmcall_exits": r.exits[ExitReason.VMCALL],
        "timer_exits": r.exits[ExitReason.PREEMPTION_TIMER],
        "ept_edits": counters.ept_edits if counters else 0,
        "invept": counters.invept if counters else 0,
        "engine_cycles": r.engine_cycles,
        "debugger_cycles": debugger_cycles,
        "overhead_cycles_pct": round(
            100.0 * (total - baseline_cycles) / max(1, baseline_cycles), 2
        ),
    }


class TrapDebugger:
    name: ClassVar[str] = "trap-debugger"
    question: ClassVar[str] = (
        "How many injected wild-pointer writes does a hypervisor catch by trapping a rotating "
        "random sample of the heap's pages in the EPT, at what overhead, and with how many false "
        "alarms before and after filtering, against trapping everything and trapping nothing?"
    )
    Params: ClassVar[type] = TrapDebuggerParams
    demo: ClassVar[dict[str, str]] = {
        "accesses": "20000", "periods": "1000,20000", "seeds": "3"
    }
    keys: ClassVar[tuple[str, ...]] = ("config", "mode", "resume", "trap_fraction", "period")

    def rows(self, params: TrapDebuggerParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: TrapDebuggerParams, progress: Progress) -> Iterator[Row]:
        for _, row in self.runs(params, progress):
            yield row

    def runs(
        self, params: TrapDebuggerParams, progress: Progress
    ) -> Iterator[tuple[ConfigRun, Row]]:
        """Each configuration's run and row (``none`` first: the overhead baseline)."""
        todo = configs(params)
        workload = params.workload()
        program = workload.program(HeapGuest(heap_pages=params.heap_pages, seed=params.seed))
        step = 1000  # progress units per configuration
        total = len(todo) * step
        progress(0, total)
        baseline = 0
        for k, config in enumerate(todo):

            def report(d: int, n: int, base: int = k * step) -> None:
                progress(base + d * step // max(1, n), total)

            run = run_config(params, program, config, report)
            if config.name == "none":
                baseline = run.report.engine_cycles
            progress((k + 1) * step, total)
            yield run, measure(run, baseline)

    def interpret(self, table: pd.DataFrame, params: TrapDebuggerParams) -> list[str]:
        everything = by_seed(table, config="trap-all")
        none = by_seed(table, config="none")
        sampled = table[table["config"] == "sampled"]
        top = sampled[sampled["trap_fraction"] == sampled["trap_fraction"].max()]
        fraction = float(top["trap_fraction"].iloc[0])
        fast_period, slow_period = int(top["period"].min()), int(top["period"].max())
        fast = by_seed(top, period=fast_period)
        slow = by_seed(top, period=slow_period)

        def iv(rows: pd.DataFrame, column: str, fmt: str = "{:,.0f}", unit: str = "") -> str:
            return interval(rows[column]).text(fmt, unit)

        def theory(rows: pd.DataFrame) -> str:
            return interval(rows.expected_detection_rate * rows.bugs_injected).text("{:.0f}")

        bugs = iv(everything, "bugs_injected")
        out = [
            f"Trapping every heap page catches {iv(everything, 'bugs_detected')}/{bugs} bugs at "
            f"their first write, for {iv(everything, 'overhead_cycles_pct', unit='%')} more "
            f"cycles ({iv(everything, 'vm_exits')} exits); no trapping takes "
            f"{iv(none, 'vm_exits')} exits and catches {iv(none, 'bugs_detected')}.",
            f"Trapping {fraction:g} of the pages, rotated every {fast_period:,} accesses, "
            f"catches {iv(fast, 'bugs_detected')}/{bugs} (sampling theory: {theory(fast)}) for "
            f"{iv(fast, 'overhead_cycles_pct', unit='%')} more cycles."
            + (
                ""
                if slow_period == fast_period
                else f" Rotated every {slow_period:,} accesses it catches "
                f"{iv(slow, 'bugs_detected')} (theory: {theory(slow)})"
                + _slower(interval(slow.expected_detection_rate),
                          interval(fast.expected_detection_rate))
            ),
        ]
        trapping = table[table["config"] != "none"]
        out.append(
            f"False alarms over the {len(trapping)} trapping runs ({seeds_of(table)} seed(s)): "
            f"{int(trapping['false_positives_unfiltered'].sum()):,} unfiltered, "
            f"{int(trapping['false_positives_sync_only'].sum()):,} with the ownership ring "
            f"synced, {int(trapping['false_positives'].sum())} with the allocator allow-list "
            f"too; bugs caught: {int(trapping['bugs_detected'].sum())} filtered against "
            f"{int(trapping['bugs_detected_unfiltered'].sum())} unfiltered."
        )
        return out

    def figures(self, table: pd.DataFrame, params: TrapDebuggerParams) -> dict[str, Figure]:
        seeds = seeds_of(table)
        table = summarize(table, self.keys)  # means and 95% intervals over the seeds
        figure = Figure(figsize=(15, 4.5))
        ax_trade, ax_fp, ax_time = figure.subplots(1, 3)
        sampled = table[table["config"] == "sampled"]
        periods = sorted({int(t) for t in sampled["period"].dropna()})
        colors = {t: f"C{i}" for i, t in enumerate(periods)}
        for t in periods:
            rows = sampled[sampled["period"] == t].sort_values("trap_fraction")
            x = rows["overhead_cycles_pct"].astype(float)
            ax_trade.errorbar(x, rows["detection_rate"], yerr=yerr(column(rows, "detection_rate")),
                              xerr=yerr(column(rows, "overhead_cycles_pct")), fmt="o-",
                              color=colors[t], capsize=2, elinewidth=0.8, label=f"period {t:,}")
            ax_trade.plot(x, rows["expected_detection_rate"], "x:", color=colors[t])
            for row in rows.itertuples():
                ax_trade.annotate(
                    f"{row.trap_fraction:g}",
                    (float(row.overhead_cycles_pct), float(row.detection_rate)),
                    textcoords="offset points",
                    xytext=(4, -10),
                    fontsize=7,
                )
            times = rows["mean_time_to_detect"].astype(float)
            ax_time.errorbar(rows["trap_fraction"], times,
                             yerr=yerr(column(rows, "mean_time_to_detect")), fmt="o-",
                             color=colors[t], capsize=2, elinewidth=0.8, label=f"period {t:,}")
        ax_trade.plot([], [], "x:", color="gray", label="sampling theory")
        extra = table[table["config"].isin(["trap-all", "compare"])]
        for k, row in enumerate(extra.itertuples()):
            everything = row.config == "trap-all"
            label = "trap all" if everything else f"{row.mode}/{row.resume}"
            ax_trade.scatter(
                float(row.overhead_cycles_pct),
                float(row.detection_rate),
                marker="*" if everything else "D",
                color="black" if everything else ("tab:purple", "tab:brown", "tab:pink")[k % 3],
                s=90,
                label=f"{label} ({row.trap_fraction:g})",
                zorder=3,
            )
        ax_trade.set_xscale("log")
        spent = table.loc[table["config"] != "none", "overhead_cycles_pct"].astype(float)
        if len(spent) and spent.min() > 0:
            steps = [m * 10**e for e in range(-2, 8) for m in (1, 2, 5)]
            ax_trade.set_xticks([v for v in steps if spent.min() / 2 <= v <= spent.max() * 2])
        ax_trade.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax_trade.xaxis.set_minor_formatter(NullFormatter())
        ax_trade.set_xlabel("overhead over no debugger (cycles, log)")
        ax_trade.set_ylabel("bugs detected / injected")
        ax_trade.set_ylim(-0.03, 1.05)
        ax_trade.set_title("detection vs overhead (labels: trap fraction; 95% intervals)")
        ax_trade.legend(fontsize=7)
        shown = table[table["config"] != "none"]
        labels = [_label(r) for r in shown.to_dict("records")]
        x = np.arange(len(shown))
        views = (
            ("false_positives_unfiltered", "unfiltered", "tab:red"),
            ("false_positives_sync_only", "ring synced", "tab:orange"),
            ("false_positives", "synced + allow-list", "tab:green"),
        )
        for i, (name_, name, color) in enumerate(views):
            values = shown[name_].astype(float).to_numpy()
            ax_fp.bar(
                x + (i - 1) * 0.27,
                np.where(values > 0, values, np.nan),
                0.27,
                yerr=yerr(column(shown, name_)),
                capsize=2,
                color=color,
                label=name,
            )
            for j, v in enumerate(values):
                if v == 0:
                    ax_fp.annotate("0", (j + (i - 1) * 0.27, 1), ha="center", fontsize=6)
        ax_fp.set_yscale("log")
        ax_fp.set_ylim(bottom=0.8)
        ax_fp.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax_fp.set_ylabel("false alarms (log)")
        ax_fp.set_title("false positives: unfiltered vs filtered")
        ax_fp.legend(fontsize=7)
        ax_time.set_xscale("log")
        ax_time.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax_time.xaxis.set_minor_formatter(NullFormatter())
        ax_time.set_xticks(sorted({float(f) for f in sampled["trap_fraction"]}))
        ax_time.set_xlabel("trap fraction (log)")
        ax_time.set_ylabel("accesses from injection to report (mean)")
        ax_time.set_title("time to detect (detected bugs)")
        ax_time.legend(fontsize=7)
        figure.suptitle(
            f"rotating-trap debugger: {params.bugs} bugs, {params.heap_pages} heap pages, "
            f"{params.accesses:,} accesses, {seeds} seed(s)"
        )
        figure.tight_layout()
        return {"trap-debugger": figure}


def _slower(slow: Interval, fast: Interval) -> str:
    """The end of the reading's rotation sentence: the theory's verdict, by the overlap rule."""
    how = relation(slow, fast)
    if how == "lower":
        return ": a bug's later writes get fewer fresh draws."
    if how == "overlap" and not (slow.exact and fast.exact):
        return f"; in theory, {OVERLAP} between the two periods."
    return "."


def _label(row: Row) -> str:
    if row["config"] == "trap-all":
        return f"trap all {row['mode']}/{row['resume']}"
    text = f"{row['trap_fraction']:g}"
    if row["period"] is not None and not pd.isna(row["period"]):
        text += f"/{int(row['period']):,}"
    if row["config"] == "compare":
        text += f" {row['mode']}/{row['resume']}"
    return text
