"""tsx-aborts: how often do a guest's TSX transactions abort while the hypervisor backs memory
lazily, breaks copy-on-write after a fork or logs dirty pages -- does the abort rate follow the
EPT-violation rate, and does pre-faulting the region before the transaction remove those aborts?

Every configuration runs :func:`eptlab.apps.tsx.play`: a guest kernel, a populated region of
``region_pages`` pages, and ``sections`` critical sections per vCPU (``reads`` reads and
``writes`` atomic adds at random lines) executed with lock elision (``max_retries`` retries,
then the lock; with ``honor_retry_bit`` the guest gives up at once unless EAX has the RETRY bit,
as glibc does). Scenarios: ``lazy`` (host memory backed on first touch), ``guest-pf`` (the guest
maps its pages on first touch too: a #PF inside a transaction is suppressed, so only the
fallback can take it), ``cow`` (the sections run in a fork of the VM), ``wp-dirty`` (dirty
logging by write protection, a round every ``round_every`` sections), ``pml-dirty`` (dirty
logging with PML), ``timer`` (a preemption-timer exit every ``timer_period`` accesses, sections
of ``long_body`` accesses), ``conflict`` (``conflict_vcpus`` vCPUs whose writes go to
``hot_lines`` shared lines), ``capacity`` (each section writes ``capacity_lines`` lines of one
L1 set). Mitigations: ``none``, ``pretouch`` (touch the section's pages non-transactionally
first), ``prefetch`` (one prefetch hypercall for the region; only where memory is lazily backed,
so only with ``lazy``).

Columns: scenario, mitigation, vcpus, transactions (critical sections completed), attempts
(transactional attempts), commits, fallbacks (sections completed under the lock), aborts,
abort_rate (aborts / attempts), aborts_per_transaction, aborts_by_cause (``cause=count`` pairs,
``;``-separated, most frequent first; causes: ept_violation, pml_full, timer, ipi, guest_fault,
conflict, capacity, xabort, nesting), exit_aborts (aborts caused by a VM exit), ept_aborts (of
which by an EPT violation), ept_violations (EPT-violation exits of the run, in transactions or
not), ept_violations_in_tx (of which aborted a transaction), ept_violation_rate (EPT violations
per transaction), retries_to_commit (mean aborted attempts before the commit, over the sections
that committed), fallback_rate (fallbacks / transactions), vm_exits (all exits, IPIs included),
accesses (all accesses performed), wasted_accesses (of which by attempts that aborted),
pretouch_accesses, cycles, wasted_cycles, wasted_access_cycles, wasted_share, sections_per_us,
lock_sections_per_us, elision_gain (what the aborts cost: :mod:`eptlab.apps.tsx_costs`;
docs/experiments/tsx-aborts.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from itertools import product
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.tsx_costs import TsxCosts, price
from ..apps.tsx_scenarios import (
    LAZY_SCENARIOS,
    MITIGATIONS,
    SCENARIOS,
    Outcome,
    Scenario,
    play,
)
from ..errors import ConfigError
from ..memory.layout import check_layout, in_layout
from ..mmu.rtm import EXIT_CAUSES
from .base import Progress, Row
from .intervals import (
    OVERLAP,
    at,
    by_seed,
    column,
    interval,
    seeds_of,
    summarize,
    times,
    verdict,
    yerr,
)


@dataclass(frozen=True)
class TsxAbortsParams:
    def validate(self) -> None:
        """The configurations build (before anything runs)."""
        TsxAborts().configurations(self)

    scenarios: tuple[str, ...] = SCENARIOS
    mitigations: tuple[str, ...] = MITIGATIONS
    sections: int = 500  # per vCPU
    region_pages: int = 2048
    reads: int = 8
    writes: int = 4
    max_retries: int = 4
    honor_retry_bit: bool = False
    round_every: int = 200
    timer_period: int = 2000
    long_body: int = 256
    conflict_vcpus: int = 2
    vcpus: int = 2  # every other scenario: elision pays off only where sections can overlap
    hot_lines: int = 64
    capacity_lines: int = 16
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


class TsxAborts:
    name: ClassVar[str] = "tsx-aborts"
    question: ClassVar[str] = (
        "How often do guest TSX transactions abort under lazy backing, copy-on-write and dirty "
        "logging, does the abort rate follow the EPT-violation rate, and does pre-faulting help?"
    )
    Params: ClassVar[type] = TsxAbortsParams
    demo: ClassVar[dict[str, str]] = {"sections": "40", "region_pages": "512", "seeds": "3"}
    keys: ClassVar[tuple[str, ...]] = ("scenario", "mitigation", "vcpus")

    def configurations(self, p: TsxAbortsParams) -> list[Scenario]:
        for name in p.scenarios:
            if name not in SCENARIOS:
                raise ConfigError("scenarios", f"{name!r} is not one of {', '.join(SCENARIOS)}")
        for name in p.mitigations:
            if name not in MITIGATIONS:
                raise ConfigError(
                    "mitigations", f"{name!r} is not one of {', '.join(MITIGATIONS)}"
                )
        if not 1 <= p.vcpus <= 8:
            raise ConfigError("vcpus", "must be 1..8")
        if p.conflict_vcpus < 2:
            raise ConfigError("conflict_vcpus", "conflicts need at least 2 vCPUs")
        out = []
        for kind, mitigation in product(p.scenarios, p.mitigations):
            if mitigation == "prefetch" and kind not in LAZY_SCENARIOS:
                continue  # the hypercall backs holes; it changes nothing where memory is mapped
            out.append(
                Scenario(
                    kind,
                    mitigation,
                    vcpus=p.conflict_vcpus if kind == "conflict" else p.vcpus,
                    sections=p.sections,
                    region_pages=p.region_pages,
                    reads=p.reads,
                    writes=p.writes,
                    max_retries=p.max_retries,
                    honor_retry_bit=p.honor_retry_bit,
                    round_every=p.round_every,
                    timer_period=p.timer_period,
                    long_body=p.long_body,
                    hot_lines=p.hot_lines,
                    capacity_lines=p.capacity_lines,
                    seed=p.seed,
                )
            )
        if not out:
            raise ConfigError("scenarios/mitigations", "no configuration to run")
        return out

    def rows(self, params: TsxAbortsParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: TsxAbortsParams, progress: Progress) -> Iterator[Row]:
        configs = self.configurations(params)
        progress(0, len(configs))
        costs = TsxCosts.from_profile()
        # plain locking's sections per us, by (scenario, memory policy): pre-touching is a
        # transactional mitigation (the lock does not need it), the prefetch hypercall changes
        # the memory both run on
        baseline: dict[tuple[str, str], float] = {}
        for done, scenario in enumerate(configs, 1):
            memory = "prefetch" if scenario.mitigation == "prefetch" else "none"
            if (scenario.kind, memory) not in baseline:  # the same sections, under the lock
                plain = play(replace(scenario, mitigation=memory, elide=False))
                cycles = price(plain.stats, scenario.vcpus, elided=False, costs=costs)
                baseline[scenario.kind, memory] = cycles.sections_per_us
            yield self.row(play(scenario), baseline[scenario.kind, memory], costs)
            progress(done, len(configs))

    @staticmethod
    def row(o: Outcome, lock_sections_per_us: float, costs: TsxCosts) -> Row:
        """One configuration's row; ``lock_sections_per_us``: plain locking's throughput on
        the same sections."""
        s, st = o.scenario, o.stats
        exit_aborts = sum(n for c, n in st.aborts_by_cause.items() if c in EXIT_CAUSES)
        cyc = price(st, s.vcpus, elided=True, costs=costs)
        return {
            "scenario": s.kind,
            "mitigation": s.mitigation,
            "vcpus": s.vcpus,
            "transactions": st.sections,
            "attempts": st.attempts,
            "commits": st.commits,
            "fallbacks": st.fallbacks,
            "aborts": st.aborts,
            "abort_rate": round(st.abort_rate, 4),
            "aborts_per_transaction": round(st.aborts / max(1, st.sections), 4),
            "aborts_by_cause": st.causes(),
            "exit_aborts": exit_aborts,
            "ept_aborts": st.aborts_by_cause.get("ept_violation", 0),
            "ept_violations": st.ept_violations,
            "ept_violations_in_tx": st.ept_violations_in_tx,
            "ept_violation_rate": round(st.ept_violations / max(1, st.sections), 4),
            "retries_to_commit": round(st.retries_to_commit, 3),
            "fallback_rate": round(st.fallbacks / max(1, st.sections), 4),
            "vm_exits": sum(st.exits.values()),
            "accesses": st.accesses,
            "wasted_accesses": st.wasted_accesses,
            "pretouch_accesses": st.pretouch_accesses,
            "cycles": cyc.total,
            "wasted_cycles": cyc.wasted,
            "wasted_access_cycles": cyc.wasted_accesses,
            "wasted_share": round(cyc.wasted_share, 4),
            "sections_per_us": round(cyc.sections_per_us, 4),
            "lock_sections_per_us": round(lock_sections_per_us, 4),
            "elision_gain": round(cyc.sections_per_us / lock_sections_per_us, 4)
            if lock_sections_per_us
            else 0.0,
        }

    def interpret(self, table: pd.DataFrame, params: TsxAbortsParams) -> list[str]:
        def runs(scenario: str, mitigation: str) -> pd.DataFrame | None:
            rows = by_seed(table, scenario=scenario, mitigation=mitigation)
            return rows if len(rows) else None

        def total(frames: list[pd.DataFrame], column: str) -> pd.Series:
            """Per seed: the sum of ``column`` over ``frames``."""
            return pd.concat([f[column] for f in frames], axis=1).sum(axis=1)

        out = []
        exits = ("lazy", "cow", "wp-dirty")
        ept = [(s, r) for s in exits if (r := runs(s, "none")) is not None]
        if ept:
            frames = [r for _, r in ept]
            aborts, inside = total(frames, "ept_aborts"), total(frames, "ept_violations_in_tx")
            accounting = (
                "equal the EPT violations taken inside transactions ({inside}) in every seed, as "
                "the model's rule (any exit inside a transaction aborts it) requires: this holds "
                "by construction"
                if (aborts == inside).all()
                else "do not equal the EPT violations taken inside transactions ({inside}): "
                "the accounting is broken"
            ).format(inside=interval(inside).text("{:,.0f}"))
            rates = ", ".join(
                f"{s} {interval(r.abort_rate).scaled(100).text('{:.0f}', '%')} with "
                f"{interval(r.ept_violation_rate).text('{:.2f}')} EPT violations per section"
                for s, r in ept
            )
            out.append(
                f"Under lazy backing, copy-on-write and write-protect dirty logging the aborts "
                f"caused by EPT violations ({interval(aborts).text('{:,.0f}')}) {accounting}; "
                f"abort rates: "
                f"{rates}."
            )
        fixed = [r for s in exits if (r := runs(s, "pretouch")) is not None]
        if fixed:
            left = interval(total(fixed, "ept_violations_in_tx")).text("{:,.0f}")
            all_ = interval(total(fixed, "ept_violations")).text("{:,.0f}")
            sentence = (
                f"Pre-touching the region before the transaction keeps the {all_} EPT "
                f"violations but takes them outside: {left} remain inside transactions"
            )
            pre = runs("lazy", "prefetch")
            if pre is not None:
                sentence += (
                    f"; the prefetch hypercall removes them "
                    f"({interval(pre.ept_violations).text('{:,.0f}')} violations, abort rate "
                    f"{interval(pre.abort_rate).scaled(100).text('{:.0f}', '%')} under lazy "
                    f"backing)"
                )
            out.append(sentence + ".")
        pml, wp = runs("pml-dirty", "none"), runs("wp-dirty", "none")
        if pml is not None and wp is not None:
            fewer = verdict(interval(pml.aborts), interval(wp.aborts), "more", "fewer")
            out.append(
                f"Dirty logging with PML costs {interval(pml.aborts).text('{:,.0f}')} abort(s) "
                f"({', '.join(_causes(pml.aborts_by_cause)) or 'none'}) against "
                f"{interval(wp.aborts).text('{:,.0f}')} with write protection ("
                + (f"{fewer}; " if fewer == OVERLAP else "")
                + "logging rounds run between critical sections here)."
            )
        out += _throughput(runs)
        kinds = ("timer", "conflict", "capacity")
        others = table[table.scenario.isin(kinds) & (table.aborts > 0)]
        if len(others):
            ept_caused = others[others.aborts_by_cause.astype(str).str.contains("ept_violation")]
            configs = ept_caused.drop_duplicates(["scenario", "mitigation"])
            out.append(
                f"The timer, conflict and capacity scenarios abort for "
                f"{', '.join(_causes(others.aborts_by_cause)) or 'no recorded cause'}"
                + (
                    "; none of those aborts is an EPT violation, so pre-faulting cannot "
                    "remove them."
                    if not len(ept_caused)
                    else f"; {len(configs)} of those configurations also abort on EPT "
                    f"violations."
                )
            )
        return out

    def figures(self, table: pd.DataFrame, params: TsxAbortsParams) -> dict[str, Figure]:
        seeds = seeds_of(table)
        rates = _cause_rates(table, self.keys)
        table = summarize(table, self.keys)  # means and 95% intervals over the seeds
        figure = Figure(figsize=(14, 5.5))
        left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
        scenarios = list(dict.fromkeys(table["scenario"]))
        colors = {s: f"C{i % 10}" for i, s in enumerate(scenarios)}
        markers = {"none": "o", "pretouch": "^", "prefetch": "s"}
        x_col, y_col = "ept_violation_rate", "aborts_per_transaction"
        top = float(max(table[x_col].max(), table[y_col].max(), 1.0)) * 1.08
        left.plot([0, top], [0, top], ":", color="grey", lw=1)
        left.text(top * 0.55, top * 0.6, "one abort per EPT violation", rotation=40,
                  color="grey", fontsize=7)
        for scenario in scenarios:
            rows = table[table["scenario"] == scenario]
            base = rows[rows["mitigation"] == "none"]
            for (_, row), r in zip(rows.iterrows(), rows.itertuples(), strict=True):
                hollow = r.mitigation != "none"
                left.errorbar(
                    getattr(r, x_col),
                    getattr(r, y_col),
                    xerr=yerr([at(row, x_col)]),
                    yerr=yerr([at(row, y_col)]),
                    fmt="none",
                    ecolor=colors[scenario],
                    elinewidth=0.8,
                    capsize=2,
                )
                left.scatter(
                    getattr(r, x_col),
                    getattr(r, y_col),
                    marker=markers.get(str(r.mitigation), "x"),
                    s=70,
                    edgecolors=colors[scenario],
                    facecolors="none" if hollow else colors[scenario],
                )
                if len(base) and hollow:
                    b = base.iloc[0]
                    left.annotate(
                        "",
                        (getattr(r, x_col), getattr(r, y_col)),
                        (b[x_col], b[y_col]),
                        arrowprops={"arrowstyle": "->", "color": colors[scenario], "alpha": 0.6},
                    )
            left.scatter([], [], color=colors[scenario], label=scenario)
        for mitigation, marker in markers.items():
            if mitigation in set(table["mitigation"]):
                left.scatter(
                    [], [], marker=marker, edgecolors="black",
                    facecolors="black" if mitigation == "none" else "none",
                    label=f"mitigation: {mitigation}",
                )
        left.set_xlim(-0.05 * top, top)
        left.set_ylim(-0.05 * top, top)
        left.set_xlabel("EPT violations per transaction (inside transactions or not)")
        left.set_ylabel("aborts per transaction")
        left.set_title("aborts vs EPT violations (arrows: with the mitigation)")
        left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

        labels = [f"{r.scenario}/{r.mitigation}" for r in table.itertuples()]
        bottom = np.zeros(len(table))
        x = np.arange(len(table))
        for i, cause in enumerate(c for c in rates.columns if c not in self.keys):
            share = rates[cause].to_numpy(float)
            right.bar(x, share, 0.7, bottom=bottom, label=cause, color=f"C{(i + 3) % 10}")
            bottom += share
        right.errorbar(x, table["abort_rate"].to_numpy(float),
                       yerr=yerr(column(table, "abort_rate")), fmt="none", ecolor="black",
                       elinewidth=0.8, capsize=2, label="95% interval")
        right.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        right.set_ylim(0, 1.05)
        right.set_ylabel("abort rate (aborts / attempts), by cause")
        right.set_title("why transactions abort (means over seeds)")
        right.legend(fontsize=7, loc="upper left")
        figure.suptitle(
            f"TSX aborts ({params.sections} sections per vCPU, {params.max_retries} retries, "
            f"{params.region_pages}-page region, {seeds} seed(s))",
            fontsize=10,
        )
        figure.tight_layout()
        return {"tsx-aborts": figure}


def _throughput(runs: Callable[[str, str], pd.DataFrame | None]) -> list[str]:
    """Elided against plain locking per policy, and the cycles the aborts wasted."""
    parts, wasted = [], []
    policies = [("backed", "none"), ("lazy", "none"), ("cow", "none"), ("wp-dirty", "none"),
                ("pml-dirty", "none"), ("lazy", "pretouch"), ("lazy", "prefetch")]
    for scenario, mitigation in policies:
        r = runs(scenario, mitigation)
        if r is None:
            continue
        name = scenario if mitigation == "none" else f"{scenario}+{mitigation}"
        parts.append(
            f"{name} {interval(r.sections_per_us).text('{:.2f}')} against "
            f"{interval(r.lock_sections_per_us).text('{:.2f}')}, "
            f"{times(interval(r.elision_gain), 'the lock')} "
            f"({interval(r.ept_violation_rate).text('{:.2f}')} EPT violations per section)"
        )
        wasted.append(f"{name} {interval(r.wasted_share).scaled(100).text('{:.0f}', '%')}")
    if not parts:
        return []
    return [
        "Throughput of elided sections against plain locking on the same sections (sections "
        "per modelled microsecond, elided / locked; vCPUs in parallel, work under the lock "
        "serial, prices from the cost profile): " + "; ".join(parts) + ". Share of all cycles "
        "wasted by aborted attempts (their accesses plus rtm_abort_cycles each): "
        + ", ".join(wasted) + "."
    ]


def _causes(texts: pd.Series) -> list[str]:
    """The abort causes named in ``aborts_by_cause`` texts (``cause=count;...``), sorted."""
    return sorted({
        pair.split("=")[0] for text in texts for pair in str(text).split(";") if "=" in pair
    })


def _cause_rates(table: pd.DataFrame, keys: tuple[str, ...]) -> pd.DataFrame:
    """Per configuration (``keys``): each cause's aborts per attempt, the mean over seeds."""
    shares: list[dict[str, float]] = []
    for text, attempts in zip(table["aborts_by_cause"], table["attempts"], strict=True):
        share: dict[str, float] = {}
        for pair in filter(None, str(text).split(";")):
            cause, count = pair.split("=")
            share[cause] = int(count) / max(1, int(attempts))
        shares.append(share)
    causes = sorted({c for share in shares for c in share})
    frame = pd.DataFrame([[s.get(c, 0.0) for c in causes] for s in shares], columns=causes,
                         index=table.index)
    keyed = pd.concat([table[list(keys)], frame], axis=1)
    return keyed.groupby(list(keys), sort=False).mean().reset_index()
