"""The oracle run: generate cases, run them through the reference walker, the fast engine and
Bochs, adjudicate every Bochs/walker disagreement against the pinned list."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ..mmu.walker import ReferenceWalker
from .bochs import CPU_MODELS, DEFAULT_CPU, run_bochs
from .cases import FEATURES, TABLE_LOW, Case, build_case
from .compare import (
    FIELDS,
    CaseReport,
    Fields,
    bochs_fields,
    differing,
    engine_fields,
    walker_fields,
)
from .pinned import DEPARTURES, BochsWalker


@dataclass
class OracleReport:
    cases: int
    seed: int
    cpu: str
    vmx: dict[str, object]
    outcomes: Counter[str] = field(default_factory=Counter)
    bochs_vs_walker: Counter[str] = field(default_factory=Counter)  # field -> cases, all
    unpinned: Counter[str] = field(default_factory=Counter)  # field -> cases, not pinned
    engine_vs_walker: Counter[str] = field(default_factory=Counter)
    pinned: Counter[str] = field(default_factory=Counter)  # departure -> cases
    examples: list[CaseReport] = field(default_factory=list)  # unpinned ones (a few)
    engine_examples: list[CaseReport] = field(default_factory=list)
    order: Counter[str] = field(default_factory=Counter)  # event-order checks (see _order)
    unpinned_cases: int = 0
    engine_cases: int = 0  # cases where the engine and the walker differ
    seconds: dict[str, float] = field(default_factory=dict)  # build, bochs, compare

    @property
    def clean(self) -> bool:
        """No disagreement outside the pinned list, and the engine agrees with the walker."""
        return self.unpinned_cases == 0 and self.engine_cases == 0

    def as_dict(self) -> dict[str, object]:
        return {
            "cases": self.cases,
            "seed": self.seed,
            "cpu": self.cpu,
            "features": {
                "maxphyaddr": FEATURES.maxphyaddr,
                "ept_execute_only": FEATURES.ept_execute_only,
                "advanced_ept_exit_info": FEATURES.advanced_ept_exit_info,
                "mbec": False,
                "ept_levels": 4,
                "guest_levels": 4,
                "protection_keys": CPU_MODELS[self.cpu],
            },
            "vmx_capabilities": self.vmx,
            "outcomes": dict(self.outcomes),
            "bochs_vs_walker_by_field": dict(self.bochs_vs_walker),
            "pinned_by_departure": dict(self.pinned),
            "unpinned_cases": self.unpinned_cases,
            "engine_vs_walker_cases": self.engine_cases,
            "unpinned_by_field": dict(self.unpinned),
            "engine_vs_walker_by_field": dict(self.engine_vs_walker),
            "event_order": dict(self.order),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "unpinned_examples": [_example(r) for r in self.examples],
            "engine_examples": [_example(r) for r in self.engine_examples],
        }


def _show(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value)
    if isinstance(value, frozenset | tuple):
        return sorted(_show(v) for v in value)  # type: ignore[type-var]
    return value


def _example(r: CaseReport) -> dict[str, object]:
    fields = set(r.bochs_vs_walker) | set(r.engine_vs_walker) | {"outcome"}
    return {
        "case": r.case_id,
        "notes": r.notes,
        "fields": sorted(fields),
        **{
            who: {f: _show(v) for f, v in out.items() if f in fields}
            for who, out in (("bochs", r.bochs), ("walker", r.walker), ("engine", r.engine))
        },
    }


def _guest_flags(out: Fields) -> frozenset[tuple[int, int]]:
    flags = out.get("flags", frozenset())
    assert isinstance(flags, frozenset)
    return frozenset(f for f in flags if f[0] >= TABLE_LOW)  # guest tables live above 64 MiB


def _order(tally: Counter[str], walker: Fields, bochs: Fields) -> None:
    """The two event orders the SDM leaves open, as the walker and Bochs show them:

    * ``final-violation``: the final GPA's EPT check fails (qualification bit 8) after the
      guest walk passed: are the guest A/D flags written (eptlab: yes)?
    * ``guest-fault``: a #PF: are any guest A flags set on the levels above (eptlab: no)?
    """
    if bochs["outcome"] != walker["outcome"]:
        return  # (a pinned departure changed the event itself)
    qual = walker.get("qualification")
    if walker["outcome"] == "ept_violation" and isinstance(qual, int) and qual & 0x100:
        key = "final-violation"
        written = bool(_guest_flags(walker))
    elif walker["outcome"] == "fault":
        key = "guest-fault"
        written = bool(_guest_flags(walker))
    else:
        return
    tally[f"{key}: cases"] += 1
    tally[f"{key}: walker wrote guest A/D"] += written
    tally[f"{key}: Bochs wrote guest A/D"] += bool(_guest_flags(bochs))
    tally[f"{key}: same guest A/D"] += _guest_flags(walker) == _guest_flags(bochs)


def adjudicate(
    case_factory: Callable[[], Case],
    bochs: Fields,
    walker_class: type[ReferenceWalker] = ReferenceWalker,
) -> str | None:
    """The pinned departure that makes the walker give Bochs's outcome, or None."""
    for departure in DEPARTURES:
        variant = BochsWalker.with_departures(departure.key, base=walker_class)
        if not differing(bochs, walker_fields(case_factory(), variant)):
            return departure.key
    every = BochsWalker.with_departures(*(d.key for d in DEPARTURES), base=walker_class)
    if not differing(bochs, walker_fields(case_factory(), every)):
        return "several"
    return None


def run_oracle(
    cases: int,
    seed: int = 0,
    *,
    cpu: str = DEFAULT_CPU,
    timeout: float = 900.0,
    keep_examples: int = 10,
    walker_class: type[ReferenceWalker] = ReferenceWalker,
) -> OracleReport:
    """Generate and run ``cases`` random cases (seed ``seed``) on Bochs's ``cpu`` model.
    ``walker_class``: the walker under test (a subclass of the reference walker)."""
    pke = CPU_MODELS[cpu]

    def make(i: int) -> Case:
        return build_case(i, seed, pke=pke)

    start = time.perf_counter()
    records = [make(i).record() for i in range(cases)]  # (a case's memory is not kept)
    built = time.perf_counter()
    vmx, lines = run_bochs(records, cpu=cpu, timeout=timeout)
    ran = time.perf_counter()
    del records
    report = OracleReport(cases, seed, cpu, vmx)
    for i in range(cases):
        case = make(i)
        line = lines.get(i)
        bochs: Fields = {"outcome": "missing"} if line is None else bochs_fields(case, line)
        walker = walker_fields(make(i), walker_class)
        engine = engine_fields(case)  # (after bochs_fields: the engine consumes the case)
        report.outcomes[str(walker["outcome"])] += 1
        _order(report.order, walker, bochs)
        r = CaseReport(i, case.notes, walker, engine, bochs)
        r.bochs_vs_walker = differing(bochs, walker)
        r.engine_vs_walker = differing(engine, walker)
        report.bochs_vs_walker.update(r.bochs_vs_walker)
        report.engine_vs_walker.update(r.engine_vs_walker)
        if r.engine_vs_walker:
            report.engine_cases += 1
            if len(report.engine_examples) < keep_examples:
                report.engine_examples.append(r)
        if r.bochs_vs_walker:
            r.pinned = adjudicate(partial(make, i), bochs, walker_class)
            if r.pinned is None:
                report.unpinned.update(r.bochs_vs_walker)
                report.unpinned_cases += 1
                if len(report.examples) < keep_examples:
                    report.examples.append(r)
            else:
                report.pinned[r.pinned] += 1
    report.seconds = {
        "build": built - start,
        "bochs": ran - built,
        "compare": time.perf_counter() - ran,
    }
    return report


__all__ = ["FIELDS", "OracleReport", "run_oracle"]
