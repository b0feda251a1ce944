"""``eptlab report``: (re)build the HTML report from the results already in a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    out: Annotated[
        Path, typer.Option(help="Folder with the results (as `eptlab demo` left).")
    ] = Path("out"),
) -> int:
    """Write OUT/report.html from the walk tour and experiment results found in OUT."""
    from ..report import build_report, collect

    if not collect(out):
        raise typer.BadParameter(f"no results in {out} (run `eptlab demo` or `eptlab run NAME`)")
    typer.echo(str(build_report(out)))
    return 0
