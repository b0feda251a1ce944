"""aslr-side-channel: its figures, and the readings of the prime+probe and re-randomization rows
(computed from the rows; see :mod:`eptlab.experiments.aslr_measured`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .intervals import OVERLAP, bars, by_seed, change, column, interval, yerr

PP = "prime+probe"


def _last(table: pd.DataFrame) -> pd.DataFrame:
    return table[table.observations == table.observations.max()]


def measured_readings(table: pd.DataFrame) -> list[str]:
    """What the measured attacker recovered, against the exact attacker's noiseless bound; what
    the slice hash changes; what re-randomization keeps and costs."""
    if "attacker" not in table or not (table.attacker == PP).any():
        return []
    last = _last(table)
    pp = last[last.attacker == PP]
    k = int(pp.observations.iloc[0])
    target = "4k" if "4k" in set(pp.target) else str(pp.target.iloc[0])
    hashes = list(dict.fromkeys(pp.slice_hash))
    base = pp[(pp.target == target) & (pp.rerandomize_ms == 0)]
    policies = list(dict.fromkeys(base.policy))
    bound = last[(last.attacker == "exact") & (last.noise == 0) & (last.channel == "walk+data")
                 & (last.target == target)]
    bound = bound[bound.llc_sets == bound.llc_sets.min()] if len(bound) else bound
    bits = int(base.entropy_bits_before.iloc[0])
    out = []
    parts = []
    for policy in policies:
        own = by_seed(base, policy=policy, slice_hash=hashes[0])
        text = f"{interval(own.guessing_bits).text('{:.2f}')} under {policy}"
        ref = by_seed(bound, policy=policy)
        if len(ref):
            text += f" (bound {interval(ref.guessing_bits).text('{:.2f}')})"
        parts.append(text)
    out.append(
        f"Prime+probe through the cache model ({target} target, slice hash {hashes[0]}, {k} "
        f"rounds, its own eviction sets): guessing entropy left, of {bits} bits, "
        f"{', '.join(parts)}; the bound is the exact attacker without noise (walk+data, "
        f"{bound.index_bits.iloc[0] if len(bound) else '-'})."
    )
    lin, r4k = (by_seed(base, policy=p, slice_hash=hashes[0]) for p in ("linear", "random-4k"))
    if len(lin) and len(r4k):
        out.append("Contiguous (linear) against randomized (random-4k) GPA->HPA: " + change(
            "the measured attacker's guessing entropy", interval(lin.guessing_bits),
            interval(r4k.guessing_bits), "{:.2f}", " bits") + (
            f"; it built {r4k.evsets.mean():.0f} LLC eviction sets under random-4k and "
            f"{lin.evsets.mean():.0f} under linear (from timings alone)."))
    for h in hashes[1:]:
        words = []
        for policy in policies:
            off = by_seed(base, policy=policy, slice_hash=hashes[0])
            on = by_seed(base, policy=policy, slice_hash=h)
            if len(off) and len(on):
                a, b = interval(off.guessing_bits), interval(on.guessing_bits)
                words.append(f"{policy} {a.text('{:.2f}')} -> {b.text('{:.2f}')}"
                             + (f" ({OVERLAP})" if a.overlaps(b) else ""))
        if words:
            out.append(f"Slice hash {hashes[0]} -> {h} (guessing entropy, bits): "
                       + "; ".join(words) + ".")
    rr = pp[(pp.target == target) & (pp.rerandomize_ms > 0)]
    for ms in dict.fromkeys(rr.rerandomize_ms):
        words = []
        for h in hashes:
            for policy in policies:
                on = by_seed(rr, policy=policy, slice_hash=h, rerandomize_ms=ms)
                off = by_seed(base, policy=policy, slice_hash=h)
                if not (len(on) and len(off)):
                    continue
                a, b = interval(off.guessing_bits), interval(on.guessing_bits)
                words.append(
                    f"{policy}/{h}: {a.text('{:.2f}')} -> {b.text('{:.2f}')} bits"
                    + (f" ({OVERLAP})" if a.overlaps(b) else "")
                    + f" for {interval(on.rerandomize_overhead_pct).text('{:.1f}', '%')} of "
                    f"modelled time ({on.migrations.mean():.1f} migrations, "
                    f"{on.bytes_copied.mean() / 2**20:.0f} MiB copied, "
                    f"{on.migration_exits.mean():.1f} exits, {on.tlb_misses.mean():.0f} TLB "
                    "misses per trial)")
        if words:
            out.append(f"Re-randomizing the secret's window every {ms:g} ms: "
                       + "; ".join(words) + ".")
    return out


def measured_figure(table: pd.DataFrame) -> Figure:
    """Guessing entropy against rounds: prime+probe per policy (solid) and the exact
    attacker's noiseless bound (dotted), one panel per target and slice hash."""
    pp = table[(table.attacker == PP) & (table.rerandomize_ms == 0)]
    bound = table[(table.attacker == "exact") & (table.noise == 0)
                  & (table.channel == "walk+data")]
    if len(bound):
        bound = bound[bound.llc_sets == bound.llc_sets.min()]
    panels = list(dict.fromkeys(zip(pp.target, pp.slice_hash, strict=True)))
    policies = list(dict.fromkeys(pp.policy))
    figure = Figure(figsize=(3.4 * max(1, len(panels)), 3.4))
    axes = np.atleast_1d(figure.subplots(1, max(1, len(panels)), squeeze=False)[0])
    for ax, (target, h) in zip(axes, panels, strict=False):
        for i, policy in enumerate(policies):
            own = pp[(pp.target == target) & (pp.slice_hash == h) & (pp.policy == policy)]
            own = own.sort_values("observations")
            ax.errorbar(own.observations, own.guessing_bits,
                        yerr=yerr(column(own, "guessing_bits")), color=f"C{i}", marker="o",
                        markersize=3, capsize=2, label=f"{policy} prime+probe")
            ref = bound[(bound.target == target) & (bound.policy == policy)]
            ref = ref.sort_values("observations")
            if len(ref):
                ax.plot(ref.observations, ref.guessing_bits, color=f"C{i}", linestyle=":",
                        label=f"{policy} exact bound")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_title(f"{target} target, slice hash {h}", fontsize=8)
        ax.set_xlabel("victim rounds observed", fontsize=8)
        ax.set_ylabel("guessing entropy (bits)", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.suptitle("measured prime+probe attacker vs exact noiseless bound "
                    "(mean, 95% interval over seeds)", fontsize=9)
    figure.tight_layout(rect=(0, 0.12, 1, 0.93))
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    return figure


def entropy_figure(table: pd.DataFrame) -> Figure:
    targets = list(dict.fromkeys(table["target"]))
    panels = list(dict.fromkeys(zip(table["channel"], table["llc_sets"], table["index_bits"],
                                    strict=True)))
    policies = list(dict.fromkeys(table["policy"]))
    figure = Figure(figsize=(3.4 * len(panels), 3.0 * len(targets) + 0.6))
    axes = np.atleast_2d(figure.subplots(len(targets), len(panels), squeeze=False))
    for r, target in enumerate(targets):
        for c, (channel, sets, bits) in enumerate(panels):
            ax = axes[r, c]
            rows = table[(table["target"] == target) & (table["channel"] == channel)
                         & (table["llc_sets"] == sets)]
            if not len(rows):
                ax.set_visible(False)
                continue
            before = float(rows["entropy_bits_before"].iloc[0])
            ax.axhline(before, color="grey", linestyle=":", linewidth=1)
            for i, policy in enumerate(policies):
                own = rows[rows["policy"] == policy].sort_values("observations")
                if not len(own):
                    continue
                x, y = own["observations"].to_numpy(), own["entropy_bits_after"].to_numpy()
                # overlapping curves stay visible: wide solid, dashed, dotted on top; error
                # bars: the 95% interval over seeds
                ax.errorbar(x, y, yerr=yerr(column(own, "entropy_bits_after")),
                            marker="os^D"[i % 4], markersize=3, color=f"C{i}", label=policy,
                            linestyle=("-", "--", ":", "-.")[i % 4],
                            linewidth=3.0 - 0.8 * (i % 3), capsize=2, elinewidth=0.8)
                last = own.iloc[-1]
                ax.annotate(f"{last['success_rate']:.2f}", (x[-1], y[-1]), fontsize=7,
                            color=f"C{i}", xytext=(3, 2 - 9 * i), textcoords="offset points")
            ticks = sorted(set(rows["observations"]))
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_ylim(-0.3, before + 0.8)
            ax.set_title(f"{target} target, {channel}, LLC HPA {bits}", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("entropy left (bits)", fontsize=8)
            if r == len(targets) - 1:
                ax.set_xlabel("measurements", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    noise = float(table["noise"].iloc[0])
    figure.suptitle(f"guest-physical ASLR left to an AnC-style attacker (noise {noise}); "
                    "numbers: success rate at the last point (means, 95% intervals)", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.90))
    figure.legend(handles, labels, loc="upper center", ncol=len(policies), fontsize=8,
                  bbox_to_anchor=(0.5, 0.955))
    return figure


def cost_figure(table: pd.DataFrame) -> Figure:
    per_policy = table.drop_duplicates("policy")
    policies = list(per_policy["policy"])
    x = np.arange(len(policies))
    figure = Figure(figsize=(11, 3.6))
    axes = figure.subplots(1, 3)
    for ax, (name, title) in zip(axes, (
        ("tlb_miss_rate", "TLB miss rate"),
        ("walk_refs_per_access", "walk references per access"),
        ("cycles_per_access", "cycles per access"),
    ), strict=True):
        values = per_policy[name].astype(float).to_numpy()
        bars(ax, x, column(per_policy, name), color=[f"C{i}" for i in range(len(policies))])
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [f"{p}\n(EPT {e})" for p, e in zip(policies, per_policy["ept_page"],
                                                            strict=True)], fontsize=8)
        ax.set_title(title, fontsize=9)
    figure.suptitle("what each EPT layout costs on the workload (mean, 95% interval)", fontsize=10)
    figure.tight_layout()
    return figure
