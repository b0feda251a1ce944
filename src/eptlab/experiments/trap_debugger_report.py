"""The trap-debugger experiment's readings of the filter, the alarms' context and the
read-after-free mode, and its figure (:mod:`eptlab.experiments.trap_debugger`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from ..apps.heap_program import VALUE_CLASSES
from .base import Row
from .intervals import column, seeds_of, summarize, text_of, yerr


def _per_seed(rows: pd.DataFrame, column_: str) -> pd.Series:
    """``column_`` summed over the rows of each seed (one value per seed)."""
    if "seed" not in rows.columns:
        return pd.Series([rows[column_].sum()])
    return rows.groupby("seed")[column_].sum()


def filter_lines(table: pd.DataFrame) -> list[str]:
    """The filter's false negatives and false positives per value class (``filter`` rows)."""
    rows = table[table["config"] == "filter"]
    trapping = table[~table["config"].isin(["none", "filter"])]
    if rows.empty or trapping.empty:
        return []
    label = str(trapping["filter"].iloc[0])
    mine = rows[rows["filter"] == label]
    classes = [
        f"{cls} {text_of(_per_seed(mine[mine.value_class == cls], 'bugs_dismissed'))}"
        f"/{text_of(_per_seed(mine[mine.value_class == cls], 'bugs_injected'))}"
        for cls in VALUE_CLASSES
    ]
    out = [
        f"With every write trapped (trap-all), the filter ({label}) dismisses "
        f"{text_of(_per_seed(mine, 'bugs_dismissed'))} of "
        f"{text_of(_per_seed(mine, 'bugs_injected'))} "
        f"bugs, its false negatives, and reports {text_of(_per_seed(mine, 'false_positives'))} "
        f"benign writes; dismissed/injected by value class: {', '.join(classes)}."
    ]
    variants = []
    for other in dict.fromkeys(rows["filter"]):
        if other == label:
            continue
        them = rows[rows["filter"] == other]
        fp = them[them["false_positives"] > 0]
        where = ", ".join(
            f"{cls} from {text_of(group['false_positive_sites'])} site(s)"
            for cls, group in fp.groupby("value_class", sort=False)
        )
        variants.append(
            f"{other} dismisses {text_of(_per_seed(them, 'bugs_dismissed'))} and reports "
            f"{text_of(_per_seed(them, 'false_positives'))}" + (f" ({where})" if where else "")
        )
    if variants:
        out.append(
            "The other rule sets on the same judged writes: " + "; ".join(variants) + ". "
            + _silent_sentence(rows)
        )
    return out


def _silent_sentence(rows: pd.DataFrame) -> str:
    """What the silent-store rule adds to links+null, from the rows."""
    with_, without = (rows[rows["filter"] == f] for f in ("links+null+silent", "links+null"))
    if with_.empty or without.empty:
        return ""
    lost = _per_seed(with_, "bugs_dismissed") - _per_seed(without, "bugs_dismissed")
    gained = _per_seed(without, "false_positives") - _per_seed(with_, "false_positives")
    return (
        f"Adding the silent-store rule to links+null dismisses {text_of(lost)} more bugs (every "
        f"same-value one, by its definition, and NULL stores into words that hold 0) and "
        f"removes {text_of(gained)} false positives."
    )


def context_lines(table: pd.DataFrame) -> list[str]:
    """What the alarms' context (instruction pointer, vCPU) says."""
    trapping = table[~table["config"].isin(["none", "filter"])]
    everything = trapping[trapping["config"] == "trap-all"]
    if trapping.empty:
        return []
    reports, matches = int(trapping["bug_reports"].sum()), int(trapping["context_matches"].sum())
    text = (
        f"Every alarm carries the guest RIP and vCPU of its access: {matches:,} of {reports:,} "
        "reports at bug writes name the bug's own instruction and vCPU (the stream gives each "
        "access its RIP and the run loop saves it at the exit: this checks the plumbing)."
    )
    if not everything.empty:
        text += (
            f" Under trap-all the {text_of(everything['bugs_detected'])} bugs found report from "
            f"{text_of(everything['report_sites'])} distinct sites (bugs can share a store "
            f"instruction), false positives from {text_of(everything['false_positive_sites'])}."
        )
    return [text]


def raf_lines(table: pd.DataFrame) -> list[str]:
    """The read-after-free mode against write traps on the same samples."""
    raf = table[(table["config"] != "filter") & (table["mode"] == "raf")]
    if raf.empty:
        return []
    row = raf.iloc[0]
    same = table[
        (table["config"] == "sampled")
        & (table["trap_fraction"] == row["trap_fraction"])
        & (table["period"] == row["period"])
    ]
    cost = "" if same.empty else f" against {text_of(same['overhead_cycles_pct'], unit='%')} for "
    cost += "" if same.empty else "write traps on the same samples"
    return [
        f"Read-after-free mode (raf: {row['trap_fraction']:g} of the pages, every "
        f"{int(row['period']):,} accesses) catches {text_of(raf['read_bugs_detected'])}/"
        f"{text_of(raf['read_bugs_injected'])} read bugs with "
        f"{text_of(raf['read_false_positives'])} "
        f"false alarms, letting {text_of(raf['link_reads_allowed'])} allocator link loads through, "
        f"for {text_of(raf['overhead_cycles_pct'], unit='%')} more cycles{cost}: every read of a "
        "trapped page exits."
    ]


def _filter_panel(ax: Axes, filters: pd.DataFrame) -> None:
    """Bugs dismissed (bars) and benign writes reported (hatched) per value class and filter."""
    labels = list(dict.fromkeys(filters["filter"])) if len(filters) else []
    x = np.arange(len(VALUE_CLASSES))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        rows = filters[filters["filter"] == label].set_index("value_class").reindex(
            list(VALUE_CLASSES)
        )
        offset = x + (i - (len(labels) - 1) / 2) * width
        ax.bar(offset, rows["bugs_dismissed"].astype(float), width, color=f"C{i}", label=label)
        ax.bar(offset, -rows["false_positives"].astype(float), width, color=f"C{i}",
               hatch="//", alpha=0.5)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, list(VALUE_CLASSES), fontsize=8)
    ax.set_ylabel("bugs dismissed (up) / benign reported (down, hatched)")
    ax.set_title("filter errors per value class (trap-all)")
    if labels:
        ax.legend(fontsize=7)


def figure(table: pd.DataFrame, params: Any, keys: Sequence[str]) -> Figure:
    """Detection against overhead, false alarms per view, time to detect, and the filter's
    errors per value class."""
    seeds = seeds_of(table)
    filters = summarize(table[table["config"] == "filter"], keys)
    table = summarize(table[table["config"] != "filter"], keys)  # means and 95% intervals
    fig = Figure(figsize=(20, 4.8))
    ax_trade, ax_fp, ax_time, ax_filter = fig.subplots(1, 4)
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
        ("false_positives", "synced + filter", "tab:green"),
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
    _filter_panel(ax_filter, filters)
    fig.suptitle(
        f"rotating-trap debugger: {params.bugs} bugs, {params.heap_pages} heap pages, "
        f"{params.accesses:,} accesses, {seeds} seed(s)"
    )
    fig.tight_layout()
    return fig


def _label(row: Row) -> str:
    if row["config"] == "trap-all":
        return f"trap all {row['mode']}/{row['resume']}"
    text = f"{row['trap_fraction']:g}"
    if row["period"] is not None and not pd.isna(row["period"]):
        text += f"/{int(row['period']):,}"
    if row["config"] == "compare":
        text += f" {row['mode']}/{row['resume']}"
    return text
