"""kvm-integrity: the integrity monitor's three policies on real KVM, beside the simulator.

A guest "kernel" (:mod:`eptlab.kvm.apps.integrity`, ``guests/ikernel.S``) runs its code pages in
a loop, writes its data pages, patches its own code legitimately, and receives a seeded schedule
of injected malicious writes into its code pages (hooks that stay, and write-then-restore pairs
undone before the next review), each logged in guest memory as the ground truth. Policies:
``none``; ``trap-code`` (code slot read-only: every code write exits; allowed patches performed,
others detected and denied, or performed with ``trap_action=log``); ``trap-all`` (code and data
slots read-only: every kernel write exits, data writes performed by the VMM: the naive
baseline); ``log-bitmap`` and ``log-ring`` (dirty logging on the code slot, reviewed against a
golden copy every ``review_every`` iterations and at the end). ``none`` always runs first: it is
the baseline of ``overhead_pct``.

Beside each KVM row, with ``simulate``, the simulated integrity-monitor (:mod:`eptlab.apps
.integrity`) runs the counterpart mode (``trap-code``, ``trap-all``, ``pml`` for both log
policies) with what can be matched: the number of hooks (``malicious_writes``), the attacked
code pages, the number of legitimate patches (one site per key), the seed, the run length and
review period in accesses (``sim_accesses_per_iteration`` accesses for one guest iteration).
What cannot be matched: the sim's code is at least 2 MiB (512 pages; KVM: ``code_pages``), its
access mix (Zipf fetches, rodata, data and slab) is not the guest's loop, it has no
write-then-restore, and its cycles are modelled constants where KVM's are measured.

Columns (one row per policy and seed):

* seed, policy, sim_mode (the simulator's counterpart); iterations, code_pages, data_pages,
  review_every, review_ms (> 0: reviews timed by the guest's TSC instead), trap_action
  (trap-all runs at most ``trap_all_iterations``, with its own schedule of the same counts).
* injected_writes (hooks + transient writes; restores not counted), hooks, transient_pairs;
  detected (injected writes the monitor reported, matched to the log by GPA and value);
  prevented (never landed: the guest read back the old word); tampered (hooks holding the
  attacker's value after the run); transients_flagged (pairs a review saw as a dirty page with
  no change); dirty_unchanged (all such page reviews: a patch site toggled twice counts too);
  false_detections (detections matching no injected write).
* mean_delay_us, max_delay_us: write to detection. Traps: the write's own RDTSC span (an upper
  bound: the exit and the decision happen inside it). Reviews: the guest's TSC from the write
  to the tick, plus this VMM's time to the page's compare. mean/max_delay_iterations: the same
  in guest iterations (0 for traps).
* cycles_per_iteration (guest RDTSC over the measured loop / iterations, exits included),
  overhead_pct (over policy none's, minus 1, in %): both include the host's preemption of the
  vCPU, which on a loaded machine is larger than the sparse policies' costs. So the guest also
  stamps its TSC every ``stamp_every`` iterations: median_cycles_per_iteration (the median
  period), median_overhead_pct (:meth:`~eptlab.kvm.apps.integrity.IntegrityOutcome
  .monitor_cycles`: per kind of event -- patch or injected write, review tick, trap-all's data
  writes -- the median cycles above none's median period over the periods holding one, times
  their number, over none's median cost of the run, in %; the none row is its noise floor).
* vmm_exits (exits this VMM handled in the measured loop), code_write_exits, data_write_exits,
  patches_allowed, review_ticks, ring_full_exits, reviews, pages_compared, review_us (the
  reviews' own time here); kvm_exits, kvm_pf_taken, kvm_insn_emulated (KVM's vCPU statistics
  over the measured loop); run_ms (the whole guest run, boot included).
* sim_malicious_writes, sim_detected, sim_prevented, sim_vm_exits, sim_overhead_pct (modelled),
  sim_mean_delay_accesses, sim_max_delay_accesses, sim_mean_delay_iterations (accesses divided
  by ``sim_accesses_per_iteration``).
* kvm_module, tdp, guest_cpl: the KVM flavour.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..kvm.apps.integrity import POLICIES, TRAP_ACTIONS
from .base import Progress, Row, check_choices, check_range

SIM_MODE = {"none": "none", "trap-code": "trap-code", "trap-all": "trap-all",
            "log-bitmap": "pml", "log-ring": "pml"}


@dataclass(frozen=True)
class KvmIntegrityParams:
    def validate(self) -> None:
        """Choices and the guest's configuration (before anything runs)."""
        check_choices("policies", self.policies, POLICIES)
        check_choices("trap_action", self.trap_action, TRAP_ACTIONS)
        check_range("sim_accesses_per_iteration", self.sim_accesses_per_iteration, 1)
        check_range("seeds", self.seeds, 1)
        check_choices("guest_cpl", str(self.guest_cpl), ("0", "3"))
        config = kvm_config(self, self.seed)
        config.check()
        if "trap-all" in self.policies:
            KvmIntegrity.config_for(config, "trap-all", self).check()

    policies: tuple[str, ...] = POLICIES
    code_pages: int = 64
    data_pages: int = 256
    iterations: int = 200_000
    trap_all_iterations: int = 20_000  # trap-all runs at most this many (every write exits)
    data_writes: int = 1  # data words stored per iteration (each one exits under trap-all)
    review_every: int = 20_000  # iterations between reviews (log policies)
    review_ms: float = 0.0  # > 0: reviews every this many ms of guest TSC instead
    patch_every: int = 10_000  # iterations between legitimate patches (0: none)
    patch_pages: int = 4
    hooks: int = 10
    transient_pairs: int = 2
    attack_pages: int = 4
    trap_action: str = "deny"  # "deny" (prevent) or "log" (perform and report)
    ring_entries: int = 4096
    stamp_every: int = 1024  # iterations per guest TSC stamp (a power of two)
    simulate: bool = True  # run the simulated integrity-monitor beside
    sim_accesses_per_iteration: int = 4
    sim_warmup: int = 10_000
    seeds: int = 3  # repeated by the shared driver (experiments.seeds), 95% intervals
    seed: int = 0
    guest_cpl: int = 3


def kvm_config(p: KvmIntegrityParams, seed: int) -> Any:
    from ..kvm.apps.common import user_mode
    from ..kvm.apps.integrity import IntegrityConfig

    return IntegrityConfig(
        code_pages=p.code_pages, data_pages=p.data_pages, iterations=p.iterations,
        data_writes=p.data_writes, review_every=p.review_every, review_ms=p.review_ms,
        patch_every=p.patch_every,
        patch_pages=p.patch_pages, hooks=p.hooks, transient_pairs=p.transient_pairs,
        attack_pages=p.attack_pages, trap_action=p.trap_action, ring_entries=p.ring_entries,
        stamp_every=p.stamp_every, seed=seed, user=user_mode(p.guest_cpl))


def sim_params(p: KvmIntegrityParams, seed: int, modes: tuple[str, ...]) -> Any:
    """The simulated integrity-monitor's parameters for the same pattern (see the module
    docstring for what matches; with ``review_ms`` the period stays ``review_every``: the
    simulator has no time)."""
    from .integrity_monitor import IntegrityMonitorParams

    k = p.sim_accesses_per_iteration
    patches = p.iterations // p.patch_every if p.patch_every else 0
    return IntegrityMonitorParams(
        modes=modes, accesses=p.iterations * k, warmup=p.sim_warmup,
        period=p.review_every * k, patch_events=patches, patch_keys=max(1, p.patch_pages),
        sites_per_key=1, malicious_writes=p.hooks, attack_pages=p.attack_pages, code_mib=2,
        slab_mib=2, seed=seed,
        # the KVM guest has direct hooks only: none of the simulator's other attacks
        remap_attacks=0, alias_attacks=0, restore_attacks=0, pt_updates=0)


def simulate(p: KvmIntegrityParams, seed: int, policies: list[str]) -> dict[str, Row]:
    """The simulator's row for each counterpart mode, by mode."""
    from .integrity_monitor import IntegrityMonitor

    modes = tuple(dict.fromkeys(SIM_MODE[q] for q in policies))
    rows = IntegrityMonitor().rows(sim_params(p, seed, modes), lambda d, t: None)
    return {r["mode"]: r for r in rows}


def _sim_columns(sim: Row | None, k: int) -> Row:
    if sim is None:
        return {c: None for c in ("sim_malicious_writes", "sim_detected", "sim_prevented",
                                  "sim_vm_exits", "sim_overhead_pct", "sim_mean_delay_accesses",
                                  "sim_max_delay_accesses", "sim_mean_delay_iterations")}
    mean = sim["mean_detection_delay_accesses"]
    return {
        "sim_malicious_writes": sim["malicious_writes"],
        "sim_detected": sim["detected"],
        "sim_prevented": sim["prevented"],
        "sim_vm_exits": sim["vm_exits"],
        "sim_overhead_pct": sim["overhead_cycles_pct"],
        "sim_mean_delay_accesses": mean,
        "sim_max_delay_accesses": sim["max_detection_delay_accesses"],
        "sim_mean_delay_iterations": None if mean is None else round(mean / k, 1),
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def measure(outcome: Any, baseline_cycles: float, baseline_median: float) -> Row:
    """The KVM columns of one policy's run (against policy none's cycles per iteration and
    median stamp period)."""
    from ..kvm.apps.integrity import score

    s, c, cfg = score(outcome), outcome.counters, outcome.config
    its = s.delays_iterations
    cycles = outcome.cycles_per_iteration
    return {
        "iterations": cfg.iterations,
        "code_pages": cfg.code_pages,
        "data_pages": cfg.data_pages,
        "review_every": cfg.review_every,
        "review_ms": cfg.review_ms,
        "trap_action": cfg.trap_action,
        "injected_writes": s.injected,
        "hooks": s.hooks,
        "transient_pairs": s.transients,
        "detected": s.detected,
        "prevented": s.prevented,
        "tampered": s.tampered,
        "transients_flagged": s.transients_flagged,
        "dirty_unchanged": s.dirty_unchanged,
        "false_detections": s.false_detections,
        "mean_delay_us": _round(s.mean_delay_us),
        "max_delay_us": _round(s.max_delay_us),
        "mean_delay_iterations": _round(float(np.mean(its))) if its else None,
        "max_delay_iterations": max(its) if its else None,
        "cycles_per_iteration": round(cycles, 1),
        "overhead_pct": round(100.0 * (cycles / baseline_cycles - 1), 1)
        if baseline_cycles else None,
        "median_cycles_per_iteration": round(float(np.median(outcome.chunks)), 1),
        "median_overhead_pct": round(100.0 * outcome.monitor_cycles(baseline_median)
                                     / (baseline_median * cfg.iterations), 2)
        if baseline_median else None,
        "vmm_exits": outcome.vmm_exits,
        "code_write_exits": c.code_write_exits,
        "data_write_exits": c.data_write_exits,
        "patches_allowed": c.patches_allowed,
        "review_ticks": c.ticks,
        "ring_full_exits": c.ring_full_exits,
        "reviews": c.reviews,
        "pages_compared": c.pages_compared,
        "review_us": round(c.review_us, 1),
        "kvm_exits": outcome.kernel.get("exits"),
        "kvm_pf_taken": outcome.kernel.get("pf_taken"),
        "kvm_insn_emulated": outcome.kernel.get("insn_emulation"),
        "run_ms": round(outcome.seconds * 1e3, 1),
    }


class KvmIntegrity:
    name: ClassVar[str] = "kvm-integrity"
    question: ClassVar[str] = (
        "On real KVM, what do trapping code writes (read-only memslot), trapping every write and "
        "dirty-log review detect, prevent and cost against injected writes to a guest kernel's "
        "code, beside the simulator's figures for the same pattern?"
    )
    Params: ClassVar[type] = KvmIntegrityParams
    demo: ClassVar[dict[str, str]] = {"seeds": "2", "iterations": "40000", "review_every": "4000",
                                      "patch_every": "2000", "trap_all_iterations": "5000"}
    keys: ClassVar[tuple[str, ...]] = ("policy",)

    def policies(self, p: KvmIntegrityParams) -> list[str]:
        """In run order: none first (the baseline), then the requested ones."""
        p.validate()  # also when called without apply_overrides (tests, notebooks)
        return ["none"] + [q for q in POLICIES if q in p.policies and q != "none"]

    @staticmethod
    def config_for(cfg: Any, policy: str, p: KvmIntegrityParams) -> Any:
        """``trap-all`` runs ``trap_all_iterations`` (its own, shorter schedule: the same counts
        of hooks and pairs, fewer patches); the others run ``iterations``."""
        if policy != "trap-all" or p.trap_all_iterations >= p.iterations:
            return cfg
        return replace(cfg, iterations=p.trap_all_iterations)

    def rows(self, params: KvmIntegrityParams, progress: Progress) -> Iterator[Row]:
        p = params
        policies = self.policies(p)
        from ..kvm.apps.common import flavour_columns
        from ..kvm.apps.integrity import run_policy
        from ..kvm.fds import Kvm

        seed = p.seed  # one seed: the shared driver (experiments.seeds) repeats it
        total = len(policies) + int(p.simulate)
        done = 0
        progress(0, total)
        with Kvm.open() as kvm:
            sim: dict[str, Row] = {}
            if p.simulate:
                sim = simulate(p, seed, policies)
                done += 1
                progress(done, total)
            cfg = kvm_config(p, seed)
            baseline = median = 0.0
            for policy in policies:
                outcome = run_policy(kvm, self.config_for(cfg, policy, p), policy)
                if policy == "none":
                    baseline = outcome.cycles_per_iteration
                    median = float(np.median(outcome.chunks))
                row: Row = {"seed": seed, "policy": policy, "sim_mode": SIM_MODE[policy]}
                row.update(measure(outcome, baseline, median))
                row.update(_sim_columns(sim.get(SIM_MODE[policy]),
                                        p.sim_accesses_per_iteration))
                row.update(flavour_columns(p.guest_cpl))
                done += 1
                progress(done, total)
                if policy in p.policies:
                    yield row

    def interpret(self, table: pd.DataFrame, params: KvmIntegrityParams) -> list[str]:
        g = table.groupby("policy", sort=False)
        mean = g.mean(numeric_only=True)
        seeds = table.seed.nunique()
        out: list[str] = []

        def of(policy: str, column: str) -> float:
            return float(mean.loc[policy, column])

        def sim(policy: str) -> bool:  # the simulator ran beside (simulate=true)
            return "sim_detected" in mean.columns and not np.isnan(of(policy, "sim_detected"))

        def cost(policy: str) -> str:
            return (f"{of(policy, 'median_overhead_pct'):+,.1f}% guest cycles by the median "
                    f"of its event periods ({of(policy, 'overhead_pct'):+,.0f}% over the whole "
                    f"loop, host preemption included)")

        if "trap-code" in mean.index:
            text = (
                f"Trapping code writes (read-only code memslot) detected "
                f"{of('trap-code', 'detected'):g} and prevented {of('trap-code', 'prevented'):g}"
                f" of {of('trap-code', 'injected_writes'):g} injected writes with "
                f"{of('trap-code', 'vmm_exits'):,.0f} exits to this VMM, "
                f"{cost('trap-code')}")
            if sim("trap-code"):
                text += (
                    f"; the simulator's trap-code: {of('trap-code', 'sim_detected'):g} of "
                    f"{of('trap-code', 'sim_malicious_writes'):g} hooks detected with "
                    f"{of('trap-code', 'sim_vm_exits'):,.0f} exits, "
                    f"{of('trap-code', 'sim_overhead_pct'):+.1f}% modelled cycles")
            out.append(text + ".")
        if "trap-all" in mean.index:
            out.append(
                f"Trapping every write took {of('trap-all', 'vmm_exits'):,.0f} exits and "
                f"{of('trap-all', 'median_cycles_per_iteration'):,.0f} guest cycles per "
                f"iteration in its median stamp period ({cost('trap-all')}), for the same "
                f"detections "
                f"({of('trap-all', 'detected'):g}).")
        for policy in ("log-bitmap", "log-ring"):
            if policy not in mean.index:
                continue
            ms = of(policy, "review_ms")
            period = f"{ms:g} ms" if ms else f"{of(policy, 'review_every'):,.0f} iterations"
            out.append(
                f"{policy}: {of(policy, 'detected'):g} of {of(policy, 'injected_writes'):g} "
                f"injected writes detected ({of(policy, 'hooks'):g} hooks, "
                f"{of(policy, 'transient_pairs'):g} written then restored), "
                f"{of(policy, 'prevented'):g} prevented ({of(policy, 'tampered'):g} hooks still "
                f"in place at the end), after {of(policy, 'mean_delay_us'):,.0f} us on average "
                f"(max {of(policy, 'max_delay_us'):,.0f} us; "
                f"{of(policy, 'mean_delay_iterations'):,.0f} iterations with reviews every "
                f"{period}); {of(policy, 'transients_flagged'):g} of "
                f"{of(policy, 'transient_pairs'):g} write-then-restore pairs were dirty but "
                f"unchanged at the review (seen, not detected); {cost(policy)}.")
            if sim(policy):
                out[-1] += (
                    f" The simulator's pml: {of(policy, 'sim_detected'):g} of "
                    f"{of(policy, 'sim_malicious_writes'):g} hooks after "
                    f"{of(policy, 'sim_mean_delay_iterations'):,.0f} iteration-equivalents, "
                    f"{of(policy, 'sim_overhead_pct'):+.1f}% modelled cycles.")
        false = int(table.false_detections.sum())
        flavour = (f"{table.kvm_module.iloc[0]}, "
                   f"{'TDP' if table.tdp.iloc[0] else 'shadow paging'}") if len(table) else ""
        floor = (f" Noise floor of the median overhead (policy none): "
                 f"{of('none', 'median_overhead_pct'):+.2f}%." if "none" in mean.index else "")
        out.append(f"False detections over all policies: {false}.{floor} Means over {seeds} "
                   f"seed(s); measured on KVM: {flavour}.")
        return out

    def figures(self, table: pd.DataFrame, params: KvmIntegrityParams) -> dict[str, Figure]:
        g = table.groupby("policy", sort=False).mean(numeric_only=True)
        policies = list(g.index)
        x = np.arange(len(policies))
        figure = Figure(figsize=(13, 4))
        ax_cost, ax_det, ax_delay = figure.subplots(1, 3)
        ax_cost.bar(x, g.cycles_per_iteration, color="tab:blue")
        ax_cost.set_yscale("log")
        ax_cost.set_ylabel("guest cycles per iteration (log, measured)")
        ax_cost.set_title("cost")
        for i, v in enumerate(g.vmm_exits):
            ax_cost.annotate(f"{v:,.0f} exits", (i, g.cycles_per_iteration.iloc[i]),
                             ha="center", va="bottom", fontsize=7)
        w = 0.27
        ax_det.bar(x - w, g.injected_writes, w, label="injected", color="grey")
        ax_det.bar(x, g.detected, w, label="detected (KVM)", color="tab:green")
        ax_det.bar(x + w, g.prevented, w, label="prevented (KVM)", color="tab:red")
        if "sim_detected" in g and g.sim_detected.notna().any():
            ax_det.scatter(x, g.sim_detected, marker="x", color="black", zorder=3,
                           label="detected (sim, of its hooks)")
        ax_det.set_ylabel("writes")
        ax_det.set_title("detection and prevention")
        ax_det.legend(fontsize=7)
        mean_us = pd.to_numeric(g.mean_delay_us, errors="coerce")
        max_us = pd.to_numeric(g.max_delay_us, errors="coerce")
        ax_delay.bar(x, mean_us.fillna(0), color="tab:green", label="mean")
        ax_delay.scatter(x, max_us, marker="_", s=200, color="black", label="max", zorder=3)
        ax_delay.set_yscale("symlog", linthresh=1.0)
        ax_delay.set_ylabel("write to detection (us, measured)")
        period = (f"{params.review_ms:g} ms" if params.review_ms
                  else f"{params.review_every:,} iterations")
        ax_delay.set_title(f"delay (reviews every {period})")
        ax_delay.legend(fontsize=7)
        for ax in (ax_cost, ax_det, ax_delay):
            ax.set_xticks(x)
            ax.set_xticklabels(policies, fontsize=8)
        module = table.kvm_module.iloc[0] if len(table) else "n/a"
        figure.suptitle(f"integrity monitor on KVM ({module}, measured) beside the simulator")
        figure.tight_layout()
        return {"kvm-integrity": figure}
