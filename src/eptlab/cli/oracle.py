"""``eptlab oracle bochs``: random cases through the reference walker, the fast engine and
Bochs's VMX/EPT emulation; the disagreements by field, adjudicated against the pinned list."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..oracle.bochs import CPU_MODELS, DEFAULT_CPU
from ..oracle.compare import FIELDS
from ..oracle.pinned import BY_KEY
from ..oracle.run import OracleReport, run_oracle

oracle_app = typer.Typer(
    help="Differential testing against an independent implementation.", no_args_is_help=True
)

CpuModel = StrEnum("CpuModel", {name: name for name in CPU_MODELS})  # type: ignore[misc]


@oracle_app.command("bochs")
def bochs(
    cases: Annotated[int, typer.Option(min=1, max=200_000, help="Random cases to run.")] = 1000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the random cases.")] = 0,
    cpu: Annotated[
        CpuModel, typer.Option(help="Bochs CPU model (eptlab's CPU features follow it).")
    ] = CpuModel[DEFAULT_CPU],
    timeout: Annotated[float, typer.Option(min=1, help="Seconds Bochs may run.")] = 1800.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> int:
    """Run CASES random cases through the walker, the engine and Bochs; exit 1 if any
    disagreement falls outside the pinned list (or the engine and the walker differ)."""
    report = run_oracle(cases, seed, cpu=str(cpu.value), timeout=timeout)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        render(report, Console(width=max(110, Console().width)))
    if not report.clean:
        raise typer.Exit(1)
    return 0


def render(report: OracleReport, console: Console) -> None:
    d = report.as_dict()
    console.print(f"Bochs CPU model {report.cpu}; eptlab CPU features: {d['features']}")
    console.print(f"{report.cases} cases (seed {report.seed}); walker outcomes: {d['outcomes']}")
    table = Table(title="Disagreements by field (cases)")
    for column in ("field", "Bochs vs walker", "outside the pinned list", "engine vs walker"):
        table.add_column(column, justify="left" if column == "field" else "right")
    for f in FIELDS:
        table.add_row(
            f,
            str(report.bochs_vs_walker.get(f, 0)),
            str(report.unpinned.get(f, 0)),
            str(report.engine_vs_walker.get(f, 0)),
        )
    console.print(table)
    pinned = Table(title="Pinned Bochs departures from the SDM (cases explained)")
    for column in ("departure", "cases", "SDM"):
        pinned.add_column(column)
    for key, count in sorted(report.pinned.items(), key=lambda kv: -kv[1]):
        sdm = BY_KEY[key].sdm if key in BY_KEY else "(more than one departure)"
        pinned.add_row(key, str(count), sdm)
    console.print(pinned)
    console.print(
        f"outside the pinned list: {report.unpinned_cases} cases; "
        f"engine vs walker: {report.engine_cases} cases"
    )
    for example in report.examples:
        console.print(f"case {example.case_id}: {example.notes}")
        for who, out in (("bochs", example.bochs), ("walker", example.walker)):
            console.print(f"  {who}: " + ", ".join(
                f"{f}={out.get(f)!r}" for f in example.bochs_vs_walker
            ))
