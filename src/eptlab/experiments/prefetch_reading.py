"""The reading of prefetch-hypercall, computed from its rows: for every vCPU count, what backing
ahead, warming on top of it, warming alone (on backed memory) and asynchronous page faults change
against no hint; which factor gives the gain in mean and p99 access cycles, seed by seed; and the
stale uses."""

from __future__ import annotations

import pandas as pd

from .intervals import (
    OVERLAP,
    Interval,
    by_seed,
    change,
    interval,
    ratio,
    reduction,
    relation,
    seeds_of,
)

LAZY, BACKED = "lazy", "backed"


def _rows(table: pd.DataFrame, vcpus: int, policy: str, memory: str = LAZY) -> pd.DataFrame:
    return by_seed(table, vcpus=vcpus, policy=policy, memory=memory)


def _moved(name: str, before: pd.DataFrame, after: pd.DataFrame, col: str, unit: str = "") -> str:
    return change(name, interval(before[col]), interval(after[col]), "{:,.0f}", unit)


def _less(before: pd.Series, after: pd.Series) -> str:
    """``" (31% [29, 33] less)"``, ``" (12% [10, 14] more)"``, or nothing where the
    intervals overlap."""
    if relation(interval(after), interval(before)) == "overlap":
        return ""  # the change clause already says so
    cut = reduction(before, after).scaled(100)
    if cut.mean >= 0:
        return f" ({cut.text('{:.0f}', '%')} less)"
    more = Interval(-cut.mean, -cut.hi, -cut.lo, cut.n)
    return f" ({more.text('{:.0f}', '%')} more)"


def share(none: pd.DataFrame, back: pd.DataFrame, both: pd.DataFrame, col: str) -> Interval:
    """Seed by seed, the part of the full hint's gain in ``col`` that backing ahead alone gives:
    ``(none - back) / (none - both)`` (1.0: all of it; above 1: warming on top costs)."""
    gain = none[col].astype(float) - both[col].astype(float)
    return interval(((none[col] - back[col]) / gain.where(gain != 0)).to_numpy(), clip=False)


def _factor(name: str, part: Interval) -> str:
    """Which factor gives the gain, by the interval of backing's share."""
    text = f"{part.scaled(100).text('{:.0f}', '%')} of the {name} gain"
    if part.n == 0 or part.mean != part.mean:
        return f"the {name} did not move with the hint"
    if part.lo > 0.5:
        return f"backing ahead gives {text}"
    if part.hi < 0.5:
        return f"warming gives most of the {name} gain (backing ahead: {text})"
    return f"backing ahead gives {text}: neither factor leads ({OVERLAP})"


def _hint_sentences(table: pd.DataFrame, vcpus: int) -> list[str]:
    none, back, both = (_rows(table, vcpus, p) for p in ("none", "back", "back+warm"))
    out = []
    if len(none) and len(both):
        out.append(
            f"{vcpus} vCPU(s), the full hint (no hint -> back + warm): "
            f"{_moved('EPT violations', none, both, 'ept_violations')}, "
            f"{_moved('mean access latency', none, both, 'mean_access_cycles', ' cycles')}, "
            f"{_moved('p99', none, both, 'p99_access_cycles', ' cycles')}, "
            f"{_moved('total cycles', none, both, 'total_cycles')}"
            f"{_less(none.total_cycles, both.total_cycles)}."
        )
    if len(none) and len(back):
        total = _moved("total cycles", none, back, "total_cycles")
        out.append(
            f"{vcpus} vCPU(s), backing ahead (no hint -> back only): "
            f"{_moved('EPT violations', none, back, 'ept_violations')}, "
            f"{_moved('mean access latency', none, back, 'mean_access_cycles', ' cycles')}, "
            f"{_moved('p99', none, back, 'p99_access_cycles', ' cycles')}, "
            f"{total}{_less(none.total_cycles, back.total_cycles)}."
        )
    if len(back) and len(both):
        out.append(
            f"{vcpus} vCPU(s), warming on top (back only -> back + warm): "
            f"{_moved('nested-TLB hits', back, both, 'nested_tlb_hits')}, "
            f"{_moved('mean access latency', back, both, 'mean_access_cycles', ' cycles')}, "
            f"{_moved('p99', back, both, 'p99_access_cycles', ' cycles')}, "
            f"{_moved('total cycles', back, both, 'total_cycles')}"
            f"{_less(back.total_cycles, both.total_cycles)}."
        )
    if len(none) and len(back) and len(both):
        mean = share(none, back, both, "mean_access_cycles")
        p99 = share(none, back, both, "p99_access_cycles")
        out.append(
            f"{vcpus} vCPU(s), which factor: {_factor('mean', mean)}; {_factor('p99', p99)}."
        )
    return out


def _warm_only(table: pd.DataFrame, vcpus: int) -> list[str]:
    cold, warm = _rows(table, vcpus, "none", BACKED), _rows(table, vcpus, "warm", BACKED)
    if not len(cold) or not len(warm):
        return []
    return [
        f"{vcpus} vCPU(s), warming alone on memory backed before the run (no hint -> warm "
        f"only): {_moved('EPT violations', cold, warm, 'ept_violations')}, "
        f"{_moved('mean access latency', cold, warm, 'mean_access_cycles', ' cycles')}, "
        f"{_moved('p99', cold, warm, 'p99_access_cycles', ' cycles')}, "
        f"{_moved('total cycles', cold, warm, 'total_cycles')}"
        f"{_less(cold.total_cycles, warm.total_cycles)}."
    ]


def _async(table: pd.DataFrame, vcpus: int) -> list[str]:
    none, apf = _rows(table, vcpus, "none"), _rows(table, vcpus, "async-pf")
    if not len(none) or not len(apf):
        return []
    both = _rows(table, vcpus, "back+warm")
    idle = ratio(apf.idle_cycles, apf.total_cycles).scaled(100)
    against = ""
    if len(both):
        against = (
            f"; against the full hint {_moved('total cycles', both, apf, 'total_cycles')}"
        )
    return [
        f"{vcpus} vCPU(s), asynchronous page faults (no hint -> async PF): "
        f"{_moved('total cycles', none, apf, 'total_cycles')}"
        f"{_less(none.total_cycles, apf.total_cycles)}, "
        f"{_moved('p99', none, apf, 'p99_access_cycles', ' cycles')}; "
        f"{interval(apf.overlapped_accesses).text('{:,.0f}')} accesses of another task ran "
        f"while one waited, {interval(apf.idle_cycles).text('{:,.0f}')} cycles idle "
        f"({idle.text('{:.0f}', '%')} of its vCPU time){against}."
    ]


def reading(table: pd.DataFrame, protocol: str, backing: str) -> list[str]:
    """Every sentence of the reading (see the module docstring)."""
    out: list[str] = []
    for vcpus in sorted(dict.fromkeys(table.vcpus)):
        out += _hint_sentences(table, vcpus) + _warm_only(table, vcpus) + _async(table, vcpus)
    if "async-pf" in set(table.policy):
        out.append(
            "By construction: the hint's rows have no first-touch EPT violations left because "
            "the hint maps every page before the guest's accesses; the async-PF rows pay two "
            "events, two task switches and a kick exit per first touch (profile prices), which "
            + (
                "exceed a zero-fill backing, so they cannot gain here; KVM takes the async "
                "path only when the host fault would wait (swap, post-copy): see backing=swap."
                if backing == "zero"
                else "the other task's work can hide only up to the swap-in wait. The "
                "async rows gain from the waiting task's swap-in overlapping the other task's "
                "work and its own swap-in (two workers at once, the device taken to serve both "
                "without queueing), while the hint reads its pages one after another (a real "
                "handler would issue them together): this comparison favours async PF."
            )
        )
    stale = int(table.stale_uses.sum())
    out.append(
        f"Stale uses of a remapped frame over all {len(table)} runs ({seeds_of(table)} seed(s)) "
        f"with the {protocol!r} protocol: {stale}; remaps done: {int(table.remaps.sum())}."
    )
    return out
