"""integrity-monitor: what does it cost to watch a guest kernel's code from the EPT, and what
does each way of watching buy, against which attack?

The same seeded guest (KASLR'd kernel image, slab area, static-key patch sites) runs the same
stream of ordinary kernel activity (code fetches, rodata reads, kernel-data and slab reads and
writes) with static-key flips (legitimate code patches), injected hooks (malicious writes to
kernel code, through the direct map), the attacks of :mod:`eptlab.apps.integrity_attacks`
(page-table remapping, a writable alias, write-then-restore) and the guest's own page-directory
writes, under six monitors (:mod:`eptlab.apps.integrity`): ``none``; ``trap-code`` (code pages
write-protected in the EPT, each write checked against the allow-list of patch sites, then
emulated or denied); ``trap-all`` (every kernel-image page write-protected: the naive baseline);
``pml`` (writes run free, page-modification logging records first writes, the monitor reviews
the log on log-full exits and every ``period`` accesses, then clears the dirty flags it reviewed
and runs INVEPT); ``trap-pt`` (trap-code plus the guest page tables on the code's path
write-protected); ``hlat`` (trap-code plus Intel HLAT, paging-write and guest-paging
verification). A warm-up run precedes each measured run.

``hlat`` runs on the reference walker (the fast engine does not model VT-rp): a stream of
``reference_accesses`` accesses from the same generator with the same patches and attacks, no
TLB or cache model, so its cycle columns are empty and it reports walk references instead.

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

and the columns of the other attacks and defences listed in :data:`MORE_COLUMNS`.
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
from ..apps.integrity_attacks import ATTACK_KINDS, Attack
from ..apps.integrity_hlat import ReferenceReport
from ..arch.exits import ExitReason
from ..errors import ConfigError
from ..guest import KernelImage
from ..hv.costs import hv_costs
from ..hv.guest_runner import RunReport
from ..memory.layout import check_layout, in_layout
from .base import Progress, Row, check_choices, check_range
from .integrity_reading import figures, interpret

WARMUP_SEED = 1 << 20  # the warm-up stream's seed is the run's seed plus this


@dataclass(frozen=True)
class IntegrityMonitorParams:
    def validate(self) -> None:
        """Choices and ranges (before anything runs)."""
        check_choices("modes", self.modes, MODES)
        for name in ("remap_attacks", "alias_attacks", "restore_attacks", "pt_updates"):
            check_range(name, getattr(self, name), 0, 64)
        check_range("restore_gap", self.restore_gap, 1, 1 << 20)
        if self.remap_attacks > self.code_mib // 2:
            raise ConfigError(
                "remap_attacks", f"at most one per 2 MiB code block ({self.code_mib // 2})"
            )
        check_range("reference_accesses", self.reference_accesses, 1000, 10_000_000)

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
    remap_attacks: int = 2  # page-table remapping attacks (one per 2 MiB code block at most)
    alias_attacks: int = 2  # hooks written through a writable alias of a code block
    restore_attacks: int = 2  # hooks written back to the original word restore_gap later
    restore_gap: int = 200  # base-stream accesses between a hook and its restore
    pt_updates: int = 40  # the guest's own writes of page-directory entries next to the code
    reference_accesses: int = 5_000  # hlat (reference walker): measured accesses
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
    """Boot the guest, warm it up, attach the monitor in ``mode``, run the measured stream
    (``hlat``: ``reference_accesses`` of them, on the reference walker)."""
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
        accesses=min(p.accesses, p.reference_accesses) if mode == "hlat" else p.accesses,
        patch_events=p.patch_events,
        malicious_writes=p.malicious_writes,
        attack_pages=p.attack_pages,
        seed=p.seed,
        remap_attacks=p.remap_attacks,
        alias_attacks=p.alias_attacks,
        restore_attacks=p.restore_attacks,
        restore_gap=p.restore_gap,
        pt_updates=p.pt_updates,
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
    targets = {w.gpa for w in malicious} | {g for a in stream.attacks for g in a.watch}
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
    reference = isinstance(result, ReferenceReport)
    walk_refs = restart_refs = None
    if isinstance(result, ReferenceReport):
        done = max(1, result.translations)
        walk_refs = round(result.references / done, 2)
        restart_refs = round(result.restart_references / done, 2)
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
        "engine": "reference" if reference else "fast",
        "engine_cycles": None if reference else result.engine_cycles,
        "monitor_cycles": run.monitor_cycles,
        "overhead_cycles_pct": None if reference else 0.0,
        "engine_overhead_pct": None if reference else 0.0,
        "monitor_overhead_pct": None if reference else 0.0,
        "ept_splits": c.splits,
        "malicious_writes": len(malicious),
        "detected": len(delays),
        "prevented": prevented,
        "code_words_tampered": tampered,
        "mean_detection_delay_accesses": round(float(np.mean(delays)), 1) if delays else None,
        "max_detection_delay_accesses": max(delays) if delays else None,
        **attack_columns(run),
        "logged_unchanged_pages": c.logged_unchanged,
        "pt_stores_trapped": c.pt_stores_trapped,
        "pt_stores_denied": c.pt_stores_denied,
        "pt_updates": len(stream.labelled("pt-update")),
        "gpv_violations": c.gpv_violations,
        "walk_refs_per_access": walk_refs,
        "hlat_restart_refs_per_access": restart_refs,
    }


MORE_COLUMNS: dict[str, str] = {
    "engine": "fast (the numba engine) or reference (the reference walker: hlat)",
    "engine_overhead_pct": "engine cycles over mode none's, minus 1, in % of none's total",
    "monitor_overhead_pct": "monitor_cycles in % of mode none's total cycles",
    "ept_splits": "2 MiB EPT pages the monitor split into 4 KiB pages",
    "ATTACK_attacks": "attacks of kind ATTACK (remap, alias, restore) in the stream",
    "ATTACK_detected": "of which the monitor reported (a report on a word the attack wrote)",
    "ATTACK_effective": (
        "of which took effect (remap: the code address reaches the attacker's page at the end; "
        "alias: the hook is in the code at the end; restore: the hook reached memory)"
    ),
    "restore_logged_unchanged": (
        "pml: restore attacks whose page a later review found logged yet equal to its golden copy"
    ),
    "logged_unchanged_pages": "pml: reviewed pages logged but unchanged (restores, write-backs)",
    "pt_stores_trapped": "trap-pt: guest stores to the write-protected page-table pages",
    "pt_stores_denied": "of which changed an entry on the code's path (reported, not done)",
    "pt_updates": "the guest's own page-directory writes in the stream",
    "gpv_violations": "hlat: exits that failed guest-paging verification (qualification bit 15)",
    "walk_refs_per_access": "hlat: entries read per completed translation (cold: no TLB)",
    "hlat_restart_refs_per_access": "hlat: of which HLAT entries read before a restart",
}
"""Columns beyond the hooks' (``ATTACK`` stands for each attack kind)."""


def attack_outcome(run: ModeRun, attack: Attack) -> tuple[bool, bool]:
    """(detected, effective) for one attack (see :data:`MORE_COLUMNS`)."""
    stream, monitor, guest = run.stream, run.monitor, run.guest
    first = attack.first_index(stream)
    detected = any(d.gpa in attack.watch and d.at >= first for d in monitor.detections)
    if attack.kind == "remap":
        effective = guest.processor_gpa(attack.la) != attack.target
    elif attack.kind == "alias":
        effective = guest.read_word(attack.target) == attack.value
    else:
        effective = attack.trigger_write(stream).index in run.result.performed_stores
    return detected, effective


def attack_columns(run: ModeRun) -> Row:
    """Counts of attacks, detected and effective, per kind; restores PML logged unchanged."""
    out: Row = {}
    for kind in ATTACK_KINDS:
        attacks = [a for a in run.stream.attacks if a.kind == kind]
        outcomes = [attack_outcome(run, a) for a in attacks]
        out[f"{kind}_attacks"] = len(attacks)
        out[f"{kind}_detected"] = sum(d for d, _ in outcomes)
        out[f"{kind}_effective"] = sum(e for _, e in outcomes)
    logged = 0
    for a in run.stream.attacks:
        if a.kind == "restore":
            after = a.first_index(run.stream)
            page = a.target & ~0xFFF
            logged += any(p == page and at >= after for p, at in run.monitor.unchanged)
    out["restore_logged_unchanged"] = logged
    return out


class IntegrityMonitor:
    name: ClassVar[str] = "integrity-monitor"
    question: ClassVar[str] = (
        "What does watching a guest kernel's code from the EPT cost (trap code pages, trap the "
        "whole kernel, or log with PML), and which of them detect and prevent malicious writes?"
    )
    Params: ClassVar[type] = IntegrityMonitorParams
    demo: ClassVar[dict[str, str]] = {
        "accesses": "60000", "warmup": "10000", "period": "20000", "code_mib": "8", "seeds": "3",
        "reference_accesses": "2000",
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
        baseline, baseline_engine = 0, 0
        for mode in modes:

            def report(d: int, _n: int, base: int = done) -> None:
                progress(min(total, base + d), total)

            run = run_mode(params, mode, report)
            row = measure(run)
            if row["engine"] == "fast":  # the reference walker has no cycle model
                cycles = row["engine_cycles"] + row["monitor_cycles"]
                if mode == "none":
                    baseline, baseline_engine = cycles, row["engine_cycles"]
                base = max(1, baseline)
                row["overhead_cycles_pct"] = round(100.0 * (cycles - baseline) / base, 2)
                engine_extra = row["engine_cycles"] - baseline_engine
                row["engine_overhead_pct"] = round(100.0 * engine_extra / base, 2)
                row["monitor_overhead_pct"] = round(100.0 * row["monitor_cycles"] / base, 2)
            done += params.accesses
            progress(done, total)
            if mode in params.modes:
                yield run, row

    def interpret(self, table: pd.DataFrame, params: IntegrityMonitorParams) -> list[str]:
        return interpret(table, params.period)

    def figures(self, table: pd.DataFrame, params: IntegrityMonitorParams) -> dict[str, Figure]:
        return figures(table, self.keys, params.period)
