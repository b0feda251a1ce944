"""``eptlab list`` and ``eptlab run NAME``: the experiments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError
from .costs import ProfileOption


def list_experiments() -> int:
    """List the experiments and the question each answers."""
    from ..experiments import experiments

    table = Table(title="eptlab experiments")
    table.add_column("name")
    table.add_column("question")
    for name, cls in sorted(experiments().items()):
        table.add_row(name, cls.question)
    Console(width=120).print(table)
    return 0


def parse_sets(values: list[str]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        out[key.strip()] = value.strip()
    return out


def run_experiment(
    name: Annotated[str, typer.Argument(help="Experiment name (see eptlab list).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Parameter override KEY=VALUE (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default out/NAME).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {experiment, params, profile, rows, summary}.")
    ] = False,
    profile: ProfileOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Keep the finished seeds of an interrupted run into OUT (same parameters and "
            "profile) and run only the others.",
        ),
    ] = False,
) -> int:
    """Run one experiment (every seed): progress bar, then CSV, Parquet, JSON and PNG files in
    OUT; prints the mean and 95% interval of each configuration."""
    from ..costs import load_profile
    from ..experiments import get, runner
    from ..experiments.intervals import text_table
    from ..experiments.seeds import summary_of

    overrides = parse_sets(set_ or [])
    costs = load_profile(profile)
    try:
        result = runner.run(
            name, overrides, out, show_progress=not as_json, profile=costs, resume=resume
        )
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    summary = summary_of(get(name)(), result.table)
    if as_json:
        rows = json.loads(result.table.to_json(orient="records"))
        typer.echo(
            json.dumps(
                {
                    "experiment": result.experiment,
                    "params": result.params,
                    "profile": costs.summary(),
                    "rows": rows,
                    "summary": json.loads(summary.to_json(orient="records")),
                }
            )
        )
    else:
        console = Console(width=160)
        console.print(text_table(summary).to_string(index=False))
        console.print("wrote " + ", ".join(result.files))
    return 0
