"""What the report is made of: one section per experiment, read back from the files the
experiment runner wrote (``OUT/NAME/NAME.json``, ``.parquet``, ``*.png``), plus the walk tour."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError
from ..experiments.base import params_from_dict, records_by
from ..experiments.intervals import one_seed_note, seeds_of, text_table
from ..experiments.registry import get
from ..experiments.seeds import summary_of


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
    # where the numbers come from (set by ``report.collect``, see ``report.model``)
    kind: str = ""  # simulated | measured | architectural
    provenance: str = ""  # one line under the title
    profile_name: str = ""  # simulated: the cost profile's name
    flavour: str = ""  # measured: the KVM module and its second-level paging
    notes: list[tuple[str, list[str]]] = field(default_factory=list)  # titled bullet lists


def experiment_section(name: str, directory: Path) -> Section:
    """The section of experiment ``name`` from its result files in ``directory``."""
    experiment = get(name)()
    summary = read_json(directory / f"{name}.json", "params")
    table = _read_parquet(directory / f"{name}.parquet")
    try:
        params = params_from_dict(experiment.Params, summary["params"])
    except (ConfigError, TypeError) as exc:
        where = str(directory / f"{name}.json")
        raise ConfigError(where, f"params do not fit {name}: {exc}") from None
    try:
        interpretation = list(experiment.interpret(table, params)) + one_seed_note(table)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        # a table too small to say something (e.g. a parameter left a comparison out)
        interpretation = [f"(No interpretation: the table lacks what it compares: {exc}.)"]
    return Section(
        key=name,
        title=name,
        question=experiment.question,
        interpretation=interpretation,
        tables=[(_summary_caption(table), text_table(summary_of(experiment, table)))],
        params=summary["params"],
        figures=sorted(directory.glob("*.png")),
        files=sorted(p for p in directory.iterdir() if p.suffix in (".csv", ".parquet", ".json")),
    )


def _summary_caption(table: pd.DataFrame) -> str:
    seeds = seeds_of(table)
    if seeds == 1:
        return "results (one seed: no intervals)"
    return (
        f"results: mean [95% interval] over {seeds} seeds per configuration (a value without "
        f"brackets was the same in every seed; the row files hold every seed's rows)"
    )


def walks_section(path: Path) -> Section:
    """The walk tour of ``eptlab demo`` (``walks.json``): cold 2D walk costs and exit events."""
    data = read_json(path, "walk_costs", "events")
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
        f"hypervisor handles and {len(events) - exits} "
        f"{'is' if len(events) - exits == 1 else 'are'} seen by the guest or translate.",
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
        tables=[
            ("cold walk: memory references (rows: guest paging, columns: EPT)", _grid(costs)),
            ("what the hypervisor sees", seen),
        ],
        files=[path, path.with_suffix(".csv")],
    )


def _grid(costs: pd.DataFrame) -> pd.DataFrame:
    """Walk costs as a guest x EPT grid (levels and page size on each side)."""
    frame = costs.assign(
        guest=costs.guest_levels.astype(str) + "-level, " + costs.guest_page + " pages",
        ept=costs.ept_levels.astype(str) + "-level, " + costs.ept_page,
    )
    grid = frame.pivot(index="guest", columns="ept", values="references")
    grid.columns.name = None
    return grid.reset_index().rename(columns={"guest": "guest \\ EPT"})


def _outcome(outcome: Any) -> str:
    if isinstance(outcome, dict) and "reason_name" in outcome:
        return f"exit {outcome['reason_name']} qualification {outcome['qualification']:#x}"
    if isinstance(outcome, dict):
        return f"#PF error code {outcome['error_code']:#x}"
    return "translated"


KVM_QUESTION = (
    "What does real KVM do with the same questions: VM fork by copy-on-write, dirty logging "
    "against trapping every write, populating a hinted range, rotating write traps, TSX aborts "
    "on real RTM, and do the simulator and KVM agree where both can answer?"
)


def kvm_section(directory: Path) -> Section:
    """The KVM experiments' results (``OUT/kvm-NAME/kvm-NAME.json`` as ``eptlab run`` writes
    them), keyed by ``NAME``."""
    paths = sorted(directory.glob("kvm-*/kvm-*.json"))
    results = {p.stem.removeprefix("kvm-"): read_json(p, "params", "rows") for p in paths}
    tables = {name: pd.DataFrame(r["rows"]) for name, r in results.items() if r["rows"]}
    if not tables:
        raise ConfigError(str(directory), "no KVM application result has any row")
    reading = []
    if "crosscheck" in tables:  # first: the "at a glance" line of this section
        c = tables["crosscheck"]
        reading.append(
            f"{int(c.equal.sum())} of {len(c)} cross-checks agree between the simulator and KVM "
            f"({'; '.join(c[~c.equal].check) or 'none disagrees'})."
        )
    reading.insert(min(1, len(reading)), flavour_sentence(next(iter(tables.values()))))
    if "dirty-log" in tables:
        d = records_by(tables["dirty-log"], "mode")
        exact = all(r.exact for r in d.values())
        parts = ", ".join(
            f"{m} {r.exits_per_write:g} exits to the VMM and {r.us_per_write:.1f} us per write"
            for m, r in d.items()
        )
        reading.append(
            f"Dirty logging reports {'exactly' if exact else 'NOT exactly'} the pages the guest "
            f"wrote in every mode; {parts}.{_kvm_own_exits(d)}"
        )
    if "fork" in tables:
        f = tables["fork"].sort_values("guest_mib")
        big = f.iloc[-1]
        reading.append(
            f"Forking a {big.guest_mib:,} MiB guest takes {big.fork_ms:.1f} ms "
            f"({f.iloc[0].guest_mib} MiB: {f.iloc[0].fork_ms:.1f} ms); after "
            f"{big.pages_written} written pages a clone holds {big.private_mib_after_writes:g} "
            f"MiB of private memory; clones isolated: {bool(f.isolated.all())}."
        )
    if "prefetch" in tables:
        by_method = tables["prefetch"].groupby("method")  # one row per method and seed
        cycles = by_method["cycles_per_page"].mean()
        if {"demand", "prefault"} <= set(cycles.index):
            mechanism = by_method["mechanism"].first()["prefault"]
            reading.append(
                f"Populating the hinted range ahead ({mechanism}) cuts the guest's cycles per "
                f"page from {cycles['demand']:,.0f} to {cycles['prefault']:,.0f} (means over "
                f"{tables['prefetch'].groupby('method').size().max()} run(s))."
            )
    if "tsx" in tables:
        from ..experiments.kvm_tsx import KvmTsx, KvmTsxParams

        reading += KvmTsx().interpret(tables["tsx"], KvmTsxParams())
    if "integrity" in tables:
        from ..experiments.base import params_from_dict
        from ..experiments.kvm_integrity import KvmIntegrity, KvmIntegrityParams

        params = params_from_dict(KvmIntegrityParams, results["integrity"]["params"])
        reading += KvmIntegrity().interpret(tables["integrity"], params)
    return Section(
        key="kvm",
        title="on real hardware (KVM)",
        question=KVM_QUESTION,
        interpretation=reading,
        tables=[(f"eptlab run kvm-{name}", table) for name, table in tables.items()],
        params={name: _compact(r["params"]) for name, r in results.items()},
        figures=sorted(directory.glob("kvm-*/*.png")),
        files=sorted(p for p in directory.glob("kvm-*/kvm-*.*")
                     if p.suffix in (".csv", ".parquet", ".json")),
    )


def _kvm_own_exits(modes: dict[Any, Any]) -> str:
    """What KVM itself took per write (its vCPU statistics), which the VMM never sees."""
    if not all(hasattr(r, "kvm_exits_per_write") for r in modes.values()):
        return " (These results predate KVM's own exit counts: exits inside KVM are not shown.)"
    inside = ", ".join(
        f"{m} {r.kvm_exits_per_write:.2g} exits and {r.kvm_pf_per_write:.2g} page faults"
        for m, r in modes.items()
    )
    return (
        f" KVM itself took, per write: {inside} (its own statistics; under shadow paging each "
        "round's first store to a page is a write-protect fault KVM handles without exiting "
        "to the VMM)."
    )


def flavour_sentence(table: pd.DataFrame) -> str:
    """Which KVM produced ``table`` (its ``kvm_module`` and ``tdp`` columns), in words."""
    if "kvm_module" not in table or "tdp" not in table:
        return "The KVM flavour is not recorded in these results."
    module, tdp = table.kvm_module.iloc[0], table.tdp.iloc[0]
    if tdp is None or pd.isna(tdp):
        paging = "second-level paging of unknown kind (TDP not reported)"
    elif bool(tdp):
        paging = "hardware EPT/NPT (TDP on)"
    else:
        paging = "KVM's shadow paging (no hardware EPT/NPT)"
    return f"Measured on {module} with {paging}: times are this machine's, not a model's."


def read_json(path: Path, *keys: str) -> dict[str, Any]:
    """A results JSON object with ``keys``; anything else is a ConfigError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(str(path), f"not a readable results file: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "not a results object")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(str(path), f"missing {', '.join(missing)}")
    return data


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), f"not a readable Parquet table: {exc}") from None


def _compact(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())
