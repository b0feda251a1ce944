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
``filter``
    (with ``trap_all``) the trap-all run's judged writes under each filter variant
    (:data:`FILTERS`), one row per variant and bug value class: the filter's false negatives
    and false positives, with every write trapped so that sampling plays no part.

Columns (one row per configuration; ``filter`` rows have their own, below):

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
| expected_detection_rate | the sampling-theory rate for the bug writes the filter would report |
| bugs_detected_unfiltered | defects the unfiltered view (map as of the last flush) catches |
| mean_time_to_detect | accesses from a bug's first write to its first report (detected bugs) |
| false_positives | reports on writes that are no bug (after the filter) |
| false_positives_sync_only | alarms with the ring synced but no allocator allow-list |
| false_positives_unfiltered | alarms of the unfiltered view |
| bugs_judged | bugs with a write that trapped and reached the filter (after the sync) |
| bugs_dismissed, fn_rate | of which none was reported: the filter's false negatives; / judged |
| bug_writes_judged, bug_writes_dismissed | the same, counted in writes |
| metadata_writes_allowed | link stores into free memory let through by the allow-list |
| silent_writes_allowed | stores leaving memory unchanged let through (``ignore_silent``) |
| bug_reports, context_matches | reports at bug writes; of which ip and vCPU are the bug's |
| report_sites, false_positive_sites | distinct guest RIPs among the reports, the false ones |
| read_bugs_injected, read_bugs_detected | read-after-free bugs; reported (mode raf) |
| read_false_positives, link_reads_allowed | raf: reads reported that are no bug; link loads |
| trapped_writes, trapped_reads | EPT violations on trapped pages, by access |
| emulated, stepped | trapped accesses completed by emulation / single-stepped with MTF |
| vm_exits | all exits of the measured run |
| ept_violation_exits, mtf_exits, vmcall_exits, timer_exits | vm_exits by reason |
| ept_edits, invept | EPT entries changed, INVEPTs run (attach included) |
| ipis | shootdown IPIs (each other vCPU runs the INVEPT too) |
| engine_cycles | the engine's cycles (translation + data, refill walks after INVEPT included) |
| debugger_cycles | exits x vmexit_cycles + emulation, checks, ring events, EPT edits, INVEPT, IPI |
| overhead_cycles_pct | (engine + debugger cycles) over none's engine cycles, minus 1, in % |

``filter`` rows: filter (the rules), value_class, bugs_injected (of the class), bugs_judged (a
write reached the filter), bugs_dismissed (none reported: false negatives), fn_rate
(dismissed / judged), bug_writes_judged, bug_writes_dismissed, false_positives (benign writes
whose value the synced map puts in the class, reported), false_positive_sites (their distinct
guest RIPs).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.heap_guest import HeapGuest
from ..apps.heap_guest import expected_detection as sampling_theory
from ..apps.heap_program import DEFAULT_VALUES, HeapProgram, HeapWorkload, TrapStream, parse_mix
from ..apps.trap_debugger import MODES, RESUMES
from ..apps.trap_debugger import TrapDebugger as Debugger
from ..apps.trap_score import Score, filter_outcomes, reportable, score
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
    interval,
    relation,
    seeds_of,
    text_of,
)
from .trap_debugger_report import context_lines, figure, filter_lines, raf_lines


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
    compare: tuple[str, ...] = ("all/emulate", "write/mtf", "raf/emulate")  # mode/resume
    compare_fraction: float = 0.1
    batch: int = 32  # ownership events per flush hypercall
    invept: bool = True  # INVEPT after revoking (False: the bug)
    allow_null: bool = True  # the allow-list takes 0 in a free chunk's link word
    ignore_silent: bool = False  # the filter lets through stores that change nothing
    filters: bool = True  # the filter rows (from the trap-all run)
    heap_pages: int = 512
    accesses: int = 200_000
    warmup: int = 20_000
    live_objects: int = 1_500
    accesses_per_op: int = 40
    bugs: int = 100
    writes_per_bug: float = 4.0
    bug_span: int = 40_000
    bug_values: tuple[str, ...] = DEFAULT_VALUES  # the bugs' value mix, CLASS:WEIGHT
    bug_field0: float = 0.25  # share of use-after-free bugs writing an object's word 0
    read_bugs: int = 50  # read-after-free bugs (seen by mode raf only)
    vcpus: int = 2
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
            bug_values=self.bug_values,
            bug_field0=self.bug_field0,
            read_bugs=self.read_bugs,
            vcpus=self.vcpus,
            seed=self.seed,
        )


FILTERS = (
    ("links+null+silent", True, True),
    ("links+null", True, False),
    ("links+silent", False, True),
    ("links", False, False),
)
"""The filter variants of the ``filter`` rows: label, allow_null, ignore_silent."""


def filter_label(allow_null: bool, ignore_silent: bool) -> str:
    return next(label for label, n, s in FILTERS if (n, s) == (allow_null, ignore_silent))


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
    if not 1 <= p.vcpus <= 8:
        raise ConfigError("vcpus", f"{p.vcpus} is not in 1..8")
    if not 0.0 <= p.bug_field0 <= 1.0:
        raise ConfigError("bug_field0", "must be in [0, 1]")
    parse_mix(p.bug_values)
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
    reportable: set[int]  # bug writes the filter reports when trapped (trap_score.reportable)


def run_config(
    p: TrapDebuggerParams,
    program: HeapProgram,
    config: Config,
    progress: Progress | None = None,
) -> ConfigRun:
    """Boot a guest, lay the boot phase in memory, warm it up, attach the debugger (unless
    ``none``), run the measured stream."""
    guest = HeapGuest(heap_pages=p.heap_pages, seed=p.seed, vcpus=p.vcpus)
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
            allow_null=p.allow_null,
            ignore_silent=p.ignore_silent,
            seed=p.seed,
        )
        debugger.attach(program.boot_events)
        policy = debugger
    n = len(stream)
    report = GuestRunner(guest.vcpu, policy, vcpus=guest.vcpus).run(
        stream.gva,
        stream.kind,
        cpu=stream.cpu,
        ip=stream.ip,
        values=stream.values,
        calls=stream.calls,
        period=config.period or max(1, n),
        final_timer=False,
        progress=None if progress is None else (lambda done: progress(done, n)),
    )
    can = reportable(stream, program, allow_null=p.allow_null, ignore_silent=p.ignore_silent)
    return ConfigRun(config, guest, stream, debugger, report, score(stream, debugger), can)


def measure(run: ConfigRun, baseline_cycles: int) -> Row:
    c, s, r, d = run.config, run.score, run.report, run.debugger
    counters = d.counters if d is not None else None
    debugger_cycles = r.vm_exits * hv_costs().vmexit + (counters.cycles() if counters else 0)
    total = r.engine_cycles + debugger_cycles
    # the theory counts the bug writes the filter would report if they trapped
    positions = [[q for q in b if q in run.reportable] for b in run.stream.bug_positions]
    if d is None or d.sampled == 0:
        expected = 0.0
    elif c.period is None or d.sampled >= len(d.pages):
        expected = sum(1 for b in positions if b) / max(1, len(positions))
    else:
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
        "filter": filter_label(d.allow_null, d.ignore_silent) if d is not None else "-",
        "value_class": "all",
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
        "bugs_judged": s.bugs_judged,
        "bugs_dismissed": s.bugs_dismissed,
        "fn_rate": round(s.bugs_dismissed / s.bugs_judged, 4) if s.bugs_judged else None,
        "bug_writes_judged": s.bug_writes_judged,
        "bug_writes_dismissed": s.bug_writes_dismissed,
        "metadata_writes_allowed": counters.metadata_writes if counters else 0,
        "silent_writes_allowed": counters.silent_writes if counters else 0,
        "bug_reports": s.bug_reports,
        "context_matches": s.context_matches,
        "report_sites": s.report_sites,
        "false_positive_sites": s.false_positive_sites,
        "read_bugs_injected": s.read_bugs_injected,
        "read_bugs_detected": s.read_bugs_detected,
        "read_false_positives": s.read_false_positives,
        "link_reads_allowed": counters.link_reads if counters else 0,
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
        "ipis": counters.ipis if counters else 0,
        "engine_cycles": r.engine_cycles,
        "debugger_cycles": debugger_cycles,
        "overhead_cycles_pct": round(
            100.0 * (total - baseline_cycles) / max(1, baseline_cycles), 2
        ),
    }


def filter_rows(run: ConfigRun) -> Iterator[Row]:
    """The ``filter`` rows of a trap-all run: every variant of :data:`FILTERS` applied to the
    writes this run's filter judged, per bug value class."""
    d = run.debugger
    assert d is not None
    for label, allow_null, ignore_silent in FILTERS:
        outcomes = filter_outcomes(
            run.stream, d, allow_null=allow_null, ignore_silent=ignore_silent
        )
        for o in outcomes:
            yield {
                "config": "filter",
                "mode": run.config.mode,
                "resume": run.config.resume,
                "trap_fraction": run.config.fraction,
                "period": None,
                "filter": label,
                "value_class": o.value_class,
                "bugs_injected": o.bugs,
                "bugs_judged": o.bugs_judged,
                "bugs_dismissed": o.bugs_dismissed,
                "fn_rate": round(o.bugs_dismissed / o.bugs_judged, 4) if o.bugs_judged else None,
                "bug_writes_judged": o.bug_writes_judged,
                "bug_writes_dismissed": o.bug_writes_dismissed,
                "false_positives": o.false_positives,
                "false_positive_sites": o.false_positive_sites,
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
    keys: ClassVar[tuple[str, ...]] = (
        "config", "mode", "resume", "trap_fraction", "period", "filter", "value_class"
    )

    def rows(self, params: TrapDebuggerParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: TrapDebuggerParams, progress: Progress) -> Iterator[Row]:
        for run, row in self.runs(params, progress):
            yield row
            if run.config.name == "trap-all" and params.filters:
                yield from filter_rows(run)

    def runs(
        self, params: TrapDebuggerParams, progress: Progress
    ) -> Iterator[tuple[ConfigRun, Row]]:
        """Each configuration's run and row (``none`` first: the overhead baseline)."""
        todo = configs(params)
        workload = params.workload()
        program = workload.program(
            HeapGuest(heap_pages=params.heap_pages, seed=params.seed, vcpus=params.vcpus)
        )
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
            return text_of(rows[column], fmt, unit)

        def theory(rows: pd.DataFrame) -> str:
            return interval(rows.expected_detection_rate * rows.bugs_injected).text("{:.0f}")

        bugs = iv(everything, "bugs_injected")
        out = [
            f"Trapping every heap page catches {iv(everything, 'bugs_detected')}/{bugs} bugs "
            f"(every bug write traps; the filter dismisses the rest, below), for "
            f"{iv(everything, 'overhead_cycles_pct', unit='%')} more "
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
        trapping = table[~table["config"].isin(["none", "filter"])]
        out.append(
            f"False alarms over the {len(trapping)} trapping runs ({seeds_of(table)} seed(s)): "
            f"{int(trapping['false_positives_unfiltered'].sum()):,} unfiltered, "
            f"{int(trapping['false_positives_sync_only'].sum()):,} with the ownership ring "
            f"synced, {int(trapping['false_positives'].sum())} with the filter "
            f"({trapping['filter'].iloc[0]}) too; bugs caught: "
            f"{int(trapping['bugs_detected'].sum())} filtered against "
            f"{int(trapping['bugs_detected_unfiltered'].sum())} unfiltered."
        )
        return out + filter_lines(table) + context_lines(table) + raf_lines(table)

    def figures(self, table: pd.DataFrame, params: TrapDebuggerParams) -> dict[str, Figure]:
        return {"trap-debugger": figure(table, params, self.keys)}


def _slower(slow: Interval, fast: Interval) -> str:
    """The end of the reading's rotation sentence: the theory's verdict, by the overlap rule."""
    how = relation(slow, fast)
    if how == "lower":
        return ": a bug's later writes get fewer fresh draws."
    if how == "overlap" and not (slow.exact and fast.exact):
        return f"; in theory, {OVERLAP} between the two periods."
    return "."
