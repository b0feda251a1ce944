"""``eptlab costs``: the cost profile, every value with its source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

ProfileOption = Annotated[
    Path | None,
    typer.Option(
        "--profile",
        help="Cost profile (TOML, see docs/costs.md); its values override the default's.",
        dir_okay=False,
    ),
]


def costs(
    profile: ProfileOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
) -> int:
    """Print the cost profile: key, value, unit, source and reference of every value."""
    from ..costs import load_profile

    p = load_profile(profile)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "name": p.name,
                    "description": p.description,
                    "path": p.path,
                    "values": p.as_rows(),
                },
                indent=1,
            )
        )
        return 0
    counts = ", ".join(f"{n} {kind}" for kind, n in p.sources().items())
    table = Table(title=f"cost profile {p.name!r} ({counts})", show_lines=False)
    for column in ("key", "value", "unit", "source", "ref"):
        table.add_column(column, overflow="fold")
    for row in p.as_rows():
        value = f"{row['value']:g}"
        if row["spread"] is not None:
            value += f" ±{row['spread']:.0%}"
        table.add_row(row["key"], value, row["unit"], row["source"], row["ref"])
    Console(width=160).print(table)
    return 0
