"""kvm-tsx: how do real RTM transactions abort when their stores touch memory the hypervisor (or
the host kernel) has not mapped yet, write-protects for dirty logging, or traps -- and where is
this CPU's write-set capacity limit, in lines?

Two scans of :class:`~eptlab.kvm.txplan.TxPlan` transactions, each with retries (``max_retries``)
then a fallback without a transaction, ``rounds`` passes over the same transactions:

* ``fresh-pages``: transactions of ``lines`` stores, ``fresh`` of them to pages nothing touched
  yet (new pages for every transaction), for each ``fresh_pages`` value and policy.
* ``write-set``: transactions storing to N consecutive lines of a warmed buffer, for each N of
  ``write_sets`` (policy ``lazy``, the buffer warmed): where capacity aborts begin.

``where``: ``process`` runs the C probe in this process (:mod:`eptlab.kvm.rtm_host`; policies
``lazy`` = the host kernel's demand paging and ``prefaulted`` = ``MADV_POPULATE_WRITE``; the
others are KVM's and are skipped there); ``kvm`` runs the ``tsx`` guest on /dev/kvm
(:mod:`eptlab.kvm.apps.tsx`; policies ``lazy``, ``prefaulted``, ``dirty-log``, ``readonly``).
Every configuration runs once per seed (``seeds`` seeds from ``seed``; the seed picks the
lines and the order of the fresh pages); :func:`summary` gives means with 95% t-intervals.

Where RTM is missing (CPUID.7.0:EBX bit 11 clear, or TSX disabled) the experiment raises
:class:`~eptlab.errors.RtmUnavailable` before any row: ``eptlab run kvm-tsx`` prints
``eptlab: unavailable: ...`` and exits with status 3.

Columns: where, scan, policy, fresh_pages, lines (stores per transaction), seed, transactions,
rounds, attempts, commits, fallbacks, aborts, abort_xabort, abort_retry, abort_conflict,
abort_capacity, abort_debug, abort_nested (aborts with that EAX bit set), abort_zero (status 0),
abort_rate (aborts / attempts), commit_cycles_median (RDTSC cycles of a committed attempt),
aborts_round1 (aborts in the first round), kernel_exits, pf_taken, mmio_exits (KVM's vCPU
statistics over the transaction phase; None in-process), mmio_writes (stores this VMM
performed for a read-only slot), kvm_module, tdp, guest_cpl.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from ..errors import ConfigError
from ..kvm import rtm_host
from ..kvm.txplan import STATUS_BITS, AttemptLog, TxPlan, fresh_pages_plan, write_set_plan
from .base import Progress, Row, check_choices

WHERE = ("process", "kvm")
POLICIES = ("lazy", "prefaulted", "dirty-log", "readonly")
PROCESS_POLICIES = ("lazy", "prefaulted")
L1D_LINES = 768  # 48 KiB / 64 B: this CPU's L1 data cache (sysfs: 64 sets x 12 ways)


@dataclass(frozen=True)
class KvmTsxParams:
    def validate(self) -> None:
        """Choices (before anything runs)."""
        check_choices("where", self.where, WHERE)
        check_choices("policies", self.policies, POLICIES)

    where: tuple[str, ...] = WHERE
    policies: tuple[str, ...] = POLICIES
    fresh_pages: tuple[int, ...] = (0, 1, 2, 4, 8)
    lines: int = 8
    write_sets: tuple[int, ...] = (64, 256, 512, 704, 736, 760, 768, 769, 776, 800, 1024)
    transactions: int = 50
    rounds: int = 2
    max_retries: int = 3
    memory_mib: int = 16
    seeds: int = 3
    seed: int = 0
    guest_cpl: int = 3


def _flavour(where: str, guest_cpl: int) -> Row:
    if where == "process":
        return {"kvm_module": "none (in-process)", "tdp": None, "guest_cpl": None}
    from ..kvm.apps.common import flavour_columns

    return flavour_columns(guest_cpl)


def measure_row(log: AttemptLog, plan: TxPlan, p: KvmTsxParams) -> Row:
    """The counts of one run's log (rounds as in ``p``)."""
    s = log.summary()
    per_round = plan.transactions
    round1 = log.kind[: _round_end(log, per_round)]
    return {
        "transactions": plan.transactions,
        "rounds": p.rounds,
        **{k: s[k] for k in ("attempts", "commits", "fallbacks", "aborts")},
        **{f"abort_{b}": s[f"abort_{b}"] for b in STATUS_BITS},
        "abort_zero": s["abort_zero"],
        "abort_rate": round(float(s["abort_rate"]), 4),
        "commit_cycles_median": s["commit_cycles_median"],
        "aborts_round1": int((round1 == 0).sum()),
    }


def _round_end(log: AttemptLog, transactions: int) -> int:
    """Index past the first round's entries: the first entry whose transaction index drops."""
    drops = np.flatnonzero(np.diff(log.tx) < 0)
    return int(drops[0]) + 1 if len(drops) else len(log)


class KvmTsx:
    name: ClassVar[str] = "kvm-tsx"
    question: ClassVar[str] = (
        "How do real RTM transactions abort when their stores reach unmapped, write-protected "
        "or trapped memory (in-process and in a KVM guest), and where is the capacity limit?"
    )
    Params: ClassVar[type] = KvmTsxParams
    demo: ClassVar[dict[str, str]] = {"seeds": "2", "transactions": "30",
                                      "write_sets": "512,768,769,1024"}
    keys: ClassVar[tuple[str, ...]] = ("where", "scan", "policy", "fresh_pages", "lines")

    def configurations(self, p: KvmTsxParams) -> list[tuple[str, str, str, int, int]]:
        """(where, scan, policy, fresh pages, lines) in run order."""
        for name in p.where:
            if name not in WHERE:
                raise ConfigError("where", f"{name!r} is not one of {', '.join(WHERE)}")
        for name in p.policies:
            if name not in POLICIES:
                raise ConfigError("policies", f"{name!r} is not one of {', '.join(POLICIES)}")
        if any(not 0 <= f <= p.lines for f in p.fresh_pages):
            raise ConfigError("fresh_pages", f"each must be in 0..lines ({p.lines})")
        if p.seeds < 1 or p.transactions < 1 or p.rounds < 1 or p.max_retries < 0:
            raise ConfigError("seeds/transactions/rounds", "must be positive")
        out = []
        for where in p.where:
            allowed = PROCESS_POLICIES if where == "process" else POLICIES
            for policy in (q for q in p.policies if q in allowed):
                out += [(where, "fresh-pages", policy, f, p.lines) for f in p.fresh_pages]
            out += [(where, "write-set", "lazy", 0, n) for n in p.write_sets]
        return out

    def rows(self, params: KvmTsxParams, progress: Progress) -> Iterator[Row]:
        p = params
        configs = self.configurations(p)
        rtm_host.require()
        kvm: Any = None
        if "kvm" in p.where:
            from ..kvm.fds import Kvm

            kvm = Kvm.open()
        try:
            total = len(configs)
            progress(0, total)
            seed = p.seed  # one seed: the shared driver (experiments.seeds) repeats rows()
            for done, (where, scan, policy, fresh, lines) in enumerate(configs, 1):
                plan = (fresh_pages_plan(p.transactions, fresh, lines, seed)
                        if scan == "fresh-pages" else write_set_plan(p.transactions, lines))
                row: Row = {"where": where, "scan": scan, "policy": policy,
                            "fresh_pages": fresh, "lines": lines, "seed": seed}
                row.update(self._run(kvm, where, plan, policy, p))
                row.update(_flavour(where, p.guest_cpl))
                yield row
                progress(done, total)
        finally:
            if kvm is not None:
                kvm.close()

    def _run(self, kvm: Any, where: str, plan: TxPlan, policy: str, p: KvmTsxParams) -> Row:
        if where == "process":
            log = rtm_host.run(plan, rounds=p.rounds, max_retries=p.max_retries, policy=policy)
            return {**measure_row(log, plan, p), "kernel_exits": None, "pf_taken": None,
                    "mmio_exits": None, "mmio_writes": 0}
        from ..kvm.apps.common import user_mode
        from ..kvm.apps.tsx import run_policy

        o = run_policy(kvm, plan, policy, memory=p.memory_mib << 20, rounds=p.rounds,
                       max_retries=p.max_retries, user=user_mode(p.guest_cpl))
        return {**measure_row(o.log, plan, p), "kernel_exits": o.kernel.get("exits"),
                "pf_taken": o.kernel.get("pf_taken"), "mmio_exits": o.kernel.get("mmio_exits"),
                "mmio_writes": o.mmio_writes}

    def interpret(self, table: pd.DataFrame, params: KvmTsxParams) -> list[str]:
        out = []
        fresh = summary(table[table.scan == "fresh-pages"], "abort_rate")
        for where in fresh["where"].unique():
            t = fresh[(fresh["where"] == where) & (fresh.fresh_pages == fresh.fresh_pages.max())]
            parts = [f"{r.policy} {r.mean:.2f} ± {r.ci95:.2f}" for r in t.itertuples()]
            out.append(f"{where}: abort rate with {int(t.fresh_pages.max())} fresh pages per "
                       f"transaction (mean ± 95% interval over seeds): {', '.join(parts)}.")
        ws = table[table.scan == "write-set"]
        for where in ws["where"].unique():
            w = ws[ws["where"] == where].groupby("lines")[["abort_capacity", "attempts",
                                                        "commits"]].sum()
            committed = w.index[w.commits > 0]
            never = w.index[w.commits == 0]
            out.append(
                f"{where}: the largest write set that committed is "
                f"{int(committed.max()) if len(committed) else 'none'} lines, the smallest that "
                f"never committed {int(never.min()) if len(never) else 'none'} lines "
                f"(L1d: {L1D_LINES} lines); capacity-bit aborts: "
                f"{int(w.abort_capacity.sum())} of {int(w.attempts.sum())} attempts.")
        return out

    def figures(self, table: pd.DataFrame, params: KvmTsxParams) -> dict[str, Figure]:
        figure = Figure(figsize=(11, 4.2))
        left, right = figure.subplots(1, 2)
        fresh = summary(table[table.scan == "fresh-pages"], "abort_rate")
        for (where, policy), g in fresh.groupby(["where", "policy"]):
            left.errorbar(g.fresh_pages, g["mean"], yerr=g.ci95, marker="o", capsize=3,
                          label=f"{where} {policy}")
        left.set_xlabel("fresh pages per transaction")
        left.set_ylabel("abort rate (aborts / attempts)")
        left.set_title("first touches inside transactions")
        left.legend(fontsize=7)
        ws = table[table.scan == "write-set"]
        for where, g in ws.groupby("where"):
            s = g.groupby("lines")[["abort_capacity", "attempts"]].sum()
            right.plot(s.index, s.abort_capacity / s.attempts, "o-", label=str(where))
        right.axvline(L1D_LINES, color="grey", ls=":", label=f"L1d {L1D_LINES} lines")
        right.set_xlabel("lines written per transaction")
        right.set_ylabel("share of attempts aborting on capacity")
        right.set_title("write-set capacity")
        right.legend(fontsize=7)
        module = table.kvm_module[table["where"] == "kvm"]
        figure.suptitle(f"real RTM (measured); KVM: {module.iloc[0] if len(module) else 'n/a'}")
        return {"kvm-tsx": figure}


KEYS = ["where", "scan", "policy", "fresh_pages", "lines"]


def summary(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean of ``column`` over seeds per configuration, with the half-width of a 95% Student-t
    interval (0 with one seed)."""
    grouped = table.groupby(KEYS, sort=False)[column]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    tq = np.where(out["count"] > 1, stats.t.ppf(0.975, np.maximum(out["count"] - 1, 1)), 0.0)
    out["ci95"] = np.nan_to_num(tq * out["std"] / np.sqrt(out["count"]))
    return out
