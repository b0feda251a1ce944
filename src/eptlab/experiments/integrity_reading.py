"""The reading and the figure of integrity-monitor (:mod:`eptlab.experiments.integrity_monitor`),
computed from its rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .intervals import (
    OVERLAP,
    bars,
    by_seed,
    column,
    interval,
    seeds_of,
    summarize,
    text_of,
    verdict,
    yerr,
)

ATTACKS = {
    "remap": "Page-table remapping (the code's page-directory entry pointed at an attacker "
    "table that maps one code page to a hooked copy)",
    "alias": "A writable alias (a code block mapped writable at a free linear address, the "
    "hook written through it)",
    "restore": "Write-then-restore (a hook, the original word written back "
    "a few hundred accesses later)",
}


def interpret(table: pd.DataFrame, period: int) -> list[str]:
    """The reading: cost, then what each monitor catches of each attack."""
    runs = {m: by_seed(table, mode=m) for m in dict.fromkeys(table["mode"])}

    def iv(mode: str, col: str, fmt: str = "{:,.0f}", unit: str = "") -> str:
        return text_of(runs[mode][col], fmt, unit)

    def mean(mode: str, col: str) -> float:
        return float(interval(runs[mode][col]).mean)

    out: list[str] = []
    if {"trap-code", "pml"} <= set(runs):
        same = verdict(
            interval(runs["trap-code"].overhead_cycles_pct),
            interval(runs["pml"].overhead_cycles_pct),
        )
        engine_first = all(
            mean(m, "engine_overhead_pct") > mean(m, "monitor_overhead_pct")
            for m in ("trap-code", "pml")
        )
        conclusion = (
            "the split 2 MiB EPT pages, not the exits, dominate both"
            if engine_first
            else "the exits and the monitor's work, not the split EPT pages, dominate at least "
            "one of them"
        )
        diff = interval(
            runs["trap-code"].overhead_cycles_pct - runs["pml"].overhead_cycles_pct, clip=False
        )
        gap = (
            same
            if same == OVERLAP
            else f"trap-code {same} by {diff.text('{:.2f}')} percentage points"
        )
        out.append(
            f"Trapping only the code pages costs "
            f"{iv('trap-code', 'overhead_cycles_pct', '{:.1f}', '%')} cycles over no monitor, "
            f"PML {iv('pml', 'overhead_cycles_pct', '{:.1f}', '%')} ({gap}). Of "
            f"that, the engine's extra cycles (translations through the code's 2 MiB EPT "
            f"pages split into {iv('trap-code', 'ept_splits')} x 512 4 KiB pages, and the "
            f"refills after INVEPTs) are "
            f"{iv('trap-code', 'engine_overhead_pct', '{:.1f}', '%')} and "
            f"{iv('pml', 'engine_overhead_pct', '{:.1f}', '%')}, the exits and the monitor's "
            f"work {iv('trap-code', 'monitor_overhead_pct', '{:.2f}', '%')} and "
            f"{iv('pml', 'monitor_overhead_pct', '{:.2f}', '%')}: {conclusion} here."
        )
    if {"trap-code", "trap-all"} <= set(runs):
        out.append(
            f"Trapping every write to the kernel image (trap-all, the naive baseline, not the "
            f"comparison that matters) takes {iv('trap-all', 'vm_exits')} exits "
            f"({iv('trap-all', 'overhead_cycles_pct', '{:.0f}', '%')}) against trap-code's "
            f"{iv('trap-code', 'vm_exits')}: every write to kernel data exits too."
        )
    hooks = [m for m in runs if m != "none"]
    if hooks:
        parts = [
            f"{m} {iv(m, 'detected')} (prevented {iv(m, 'prevented')})" for m in hooks
        ]
        pml_delay = (
            f"; PML reports only at the next review (every {period:,} accesses or when the log "
            f"fills): after {iv('pml', 'mean_detection_delay_accesses')} accesses on average"
            if "pml" in runs
            else ""
        )
        out.append(
            f"Direct hooks ({iv(hooks[0], 'malicious_writes')} per run, written through the "
            f"direct map) reported: {'; '.join(parts)}{pml_delay}."
        )
    for kind, what in ATTACKS.items():
        if f"{kind}_attacks" not in table or not table[f"{kind}_attacks"].max():
            continue
        parts = [
            f"{m} reports {iv(m, f'{kind}_detected')} and {iv(m, f'{kind}_effective')} took "
            f"effect"
            for m in runs
        ]
        out.append(f"{what}, {iv(next(iter(runs)), f'{kind}_attacks')} per run: "
                   f"{'; '.join(parts)}.{_why(kind, runs)}")
    if "pml" in runs and table["restore_attacks"].max():
        out.append(
            f"Write-then-restore under PML: a later review found the page of "
            f"{iv('pml', 'restore_logged_unchanged')} of the "
            f"{iv('pml', 'restore_attacks')} restore attacks logged but equal to its golden "
            f"copy, so the diff reported {iv('pml', 'restore_detected')}; "
            f"{iv('pml', 'logged_unchanged_pages')} logged pages were unchanged in all (the "
            f"others: legitimate patches undone within one review period), which a policy "
            f"alarming on 'logged but unchanged' would also flag."
        )
    if "trap-pt" in runs and "trap-code" in runs:
        out.append(
            f"Write-protecting the page tables on the code's path (trap-pt) took "
            f"{iv('trap-pt', 'pt_stores_trapped')} page-table store exits per run "
            f"({iv('trap-pt', 'pt_updates')} of the guest's own page-directory writes among "
            f"the stores, {iv('trap-pt', 'pt_stores_denied')} denied): "
            f"{iv('trap-pt', 'overhead_cycles_pct', '{:.1f}', '%')} against trap-code's "
            f"{iv('trap-code', 'overhead_cycles_pct', '{:.1f}', '%')}. Its cost is the guest's "
            f"page-table write rate into those pages (a parameter here, pt_updates), and it "
            f"runs with EPT A/D off: with them on, every walk through a protected page would "
            f"exit (SDM Vol. 3C §29.3.3.2), which is what the paging-write bit removes."
        )
    if "hlat" in runs:
        out.append(
            f"HLAT ran on the reference walker (the fast engine does not model it) over "
            f"shorter streams with the same patches and attacks: {iv('hlat', 'vm_exits')} "
            f"exits, {iv('hlat', 'gpv_violations')} of them failing guest-paging verification; "
            f"with no TLB each translation read {iv('hlat', 'walk_refs_per_access', '{:.1f}')} "
            f"entries, {iv('hlat', 'hlat_restart_refs_per_access', '{:.1f}')} of them HLAT "
            f"entries read before a restart (what HLAT adds to a walk outside the protected "
            f"range). No cycle figure is given for it."
        )
    fp = int(table.false_positives.sum())
    out.append(
        f"Legitimate code patches: {int(table.patches_applied.max())} per run; false alarms "
        f"over all modes and {seeds_of(table)} seed(s): {fp}."
    )
    return out


def _why(kind: str, runs: dict[str, pd.DataFrame]) -> str:
    """The by-construction reason, said only where the rows show it."""

    def all_(mode: str, col: str, of: str) -> bool:
        return mode in runs and bool((runs[mode][col] == runs[mode][of]).all())

    def none_(mode: str, col: str) -> bool:
        return mode in runs and bool((runs[mode][col] == 0).all())

    if kind == "remap" and none_("trap-code", "remap_detected") and none_("pml", "remap_detected"):
        return (
            " No store of it touches a code page, so the code's write traps and PML see "
            "nothing (by construction); trap-pt denies the entry's store; HLAT keeps "
            "translating the code through its own tables, so the edit changes nothing but "
            "nothing is reported either."
        )
    if kind == "alias" and all_("trap-code", "alias_detected", "alias_attacks"):
        return (
            " The store reaches the code's guest-physical page, and EPT permissions and dirty "
            "logging key on that address, whatever linear address was used (by construction)."
        )
    if kind == "restore" and none_("pml", "restore_detected"):
        return " The trap modes deny the hook at its store; PML sees a page that is unchanged."
    return ""


def figures(table: pd.DataFrame, keys: Sequence[str], period: int) -> dict[str, Figure]:
    """Exits, overhead, detection delay, and what each mode did against each attack."""
    summary = summarize(table, keys)
    modes = list(summary["mode"])
    x = np.arange(len(modes))
    figure = Figure(figsize=(16, 4))
    ax_exits, ax_cost, ax_delay, ax_attacks = figure.subplots(1, 4)
    exits = summary["vm_exits"].astype(float).to_numpy()
    ax_exits.bar(x, np.where(exits > 0, exits, np.nan), color="tab:red",
                 yerr=yerr(column(summary, "vm_exits")), capsize=2)
    ax_exits.set_yscale("log")
    ax_exits.set_ylim(bottom=0.5, top=max(10.0, float(np.nanmax(exits)) * 4))
    ax_exits.set_ylabel("VM exits (log scale)")
    ax_exits.set_title("exits per mode (mean, 95% interval)")
    for i, v in enumerate(exits):
        ax_exits.annotate(f"{v:,.0f}", (i, max(v, 0.6)), ha="center", va="bottom", fontsize=8)
    engine = pd.to_numeric(summary["engine_overhead_pct"], errors="coerce").to_numpy(float)
    monitor = pd.to_numeric(summary["monitor_overhead_pct"], errors="coerce").to_numpy(float)
    bars(ax_cost, x, column(summary, "overhead_cycles_pct"), color="white", edgecolor="black")
    ax_cost.bar(x, np.nan_to_num(engine), 0.5, color="tab:blue", label="engine (split pages)")
    ax_cost.bar(x, np.nan_to_num(monitor), 0.5, bottom=np.nan_to_num(engine),
                color="tab:orange", label="exits + monitor work")
    for i in range(len(modes)):
        if np.isnan(engine[i]):
            ax_cost.annotate("reference\nwalker:\nno cycles", (i, 0), ha="center", fontsize=7)
    total = pd.to_numeric(summary["overhead_cycles_pct"], errors="coerce").to_numpy(float)
    rest = [v for m, v in zip(modes, total, strict=True) if m != "trap-all" and not np.isnan(v)]
    if "trap-all" in modes and rest:  # the naive baseline would flatten the others
        top = max(1.0, 2.0 * max(rest))
        ax_cost.set_ylim(0, top)
        i = modes.index("trap-all")
        ax_cost.annotate(f"{total[i]:.0f}%\n(off scale)", (i, top * 0.8), ha="center", fontsize=7)
    ax_cost.set_ylabel("cycles over mode none (%)")
    ax_cost.set_title("overhead and its parts")
    ax_cost.legend(fontsize=7)
    bars(ax_delay, x, column(summary, "mean_detection_delay_accesses"), color="tab:green")
    ax_delay.set_ylabel("accesses from hook to detection (mean)")
    ax_delay.set_title(f"hook detection delay (pml period {period:,})")
    kinds = ["hook", *ATTACKS]
    grid = np.full((len(modes), len(kinds)), np.nan)
    labels: dict[tuple[int, int], str] = {}
    for i, row in enumerate(summary.itertuples()):
        for j, kind in enumerate(kinds):
            if kind == "hook":
                n, det = row.malicious_writes, row.detected
                eff = row.code_words_tampered
            else:
                n = getattr(row, f"{kind}_attacks")
                det, eff = getattr(row, f"{kind}_detected"), getattr(row, f"{kind}_effective")
            if n:
                grid[i, j] = float(eff) / float(n)
                labels[i, j] = f"det {det:.3g}/{n:.3g}\neff {eff:.3g}"
    ax_attacks.imshow(grid, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    for (i, j), text in labels.items():
        ax_attacks.annotate(text, (j, i), ha="center", va="center", fontsize=6)
    ax_attacks.set_xticks(range(len(kinds)))
    ax_attacks.set_xticklabels(kinds, fontsize=8)
    ax_attacks.set_yticks(range(len(modes)))
    ax_attacks.set_yticklabels(modes, fontsize=8)
    ax_attacks.set_title("attacks: det. / eff. (red: took effect)")
    for ax in (ax_exits, ax_cost, ax_delay):
        ax.set_xlim(-0.6, len(modes) - 0.4)
        ax.set_xticks(x)
        ax.set_xticklabels(modes, fontsize=7)
    figure.suptitle(f"integrity monitoring from the EPT ({seeds_of(table)} seed(s))")
    figure.tight_layout()
    return {"integrity-monitor": figure}
