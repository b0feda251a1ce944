"""What the report is made of: one section per experiment, read back from the files the
experiment runner wrote (``OUT/NAME/NAME.json``, ``.parquet``, ``*.png``), plus the walk tour."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiments.base import params_from_dict
from ..experiments.registry import get


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    question: str
    interpretation: list[str]
    tables: list[tuple[str, pd.DataFrame]]
    params: dict[str, Any] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def experiment_section(name: str, directory: Path) -> Section:
    """The section of experiment ``name`` from its result files in ``directory``."""
    experiment = get(name)()
    summary = json.loads((directory / f"{name}.json").read_text())
    table = pd.read_parquet(directory / f"{name}.parquet")
    params = params_from_dict(experiment.Params, summary["params"])
    try:
        interpretation = list(experiment.interpret(table, params))
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        # a table too small to say something (e.g. a parameter left a comparison out)
        interpretation = [f"(No interpretation: the table lacks what it compares: {exc}.)"]
    return Section(
        key=name,
        title=name,
        question=experiment.question,
        interpretation=interpretation,
        tables=[("results", table)],
        params=summary["params"],
        figures=sorted(directory.glob("*.png")),
        files=sorted(p for p in directory.iterdir() if p.suffix in (".csv", ".parquet", ".json")),
    )


def walks_section(path: Path) -> Section:
    """The walk tour of ``eptlab demo`` (``walks.json``): cold 2D walk costs and exit events."""
    data = json.loads(path.read_text())
    costs = pd.DataFrame(data["walk_costs"])
    events = data["events"]
    by = {(r["guest_levels"], r["ept_levels"], r["guest_page"], r["ept_page"]): r["references"]
          for r in data["walk_costs"]}
    four, five = by[(4, 4, "4k", "4k")], by[(5, 5, "4k", "4k")]
    big = by[(4, 4, "2m", "2m")]
    exits = sum(1 for e in events if isinstance(e["outcome"], dict) and "reason" in e["outcome"])
    interpretation = [
        f"A cold walk with 4-level guest paging under 4-level EPT makes {four} memory references "
        f"(n*(m+1)+m with n=m=4), {five} with 5 levels in both, and {big} with 2 MiB pages in "
        f"both dimensions; the fewest over all {len(costs)} combinations is "
        f"{costs.references.min()} and the most {costs.references.max()}.",
        f"Of the {len(events)} situations in the second table, {exits} end in a VM exit the "
        f"hypervisor handles and {len(events) - exits} are seen by the guest or translate.",
    ]
    seen = pd.DataFrame(
        [
            {"situation": e["event"], "references": e["references"],
             "outcome": _outcome(e["outcome"])}
            for e in events
        ]
    )
    return Section(
        key="walks",
        title="the two-dimensional walk",
        question="How many memory references does one translation cost under EPT, and which "
        "architectural events does the hypervisor see?",
        interpretation=interpretation,
        tables=[("cold walk: memory references", costs), ("what the hypervisor sees", seen)],
        files=[path, path.with_suffix(".csv")],
    )


def _outcome(outcome: Any) -> str:
    if isinstance(outcome, dict) and "reason_name" in outcome:
        return f"exit {outcome['reason_name']} qualification {outcome['qualification']:#x}"
    if isinstance(outcome, dict):
        return f"#PF error code {outcome['error_code']:#x}"
    return "translated"
