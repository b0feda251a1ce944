"""``eptlab report``: (re)build the HTML report from the results already in a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    out: Annotated[
        Path, typer.Option(help="Folder with the results (as `eptlab demo` left them).")
    ] = Path("out"),
    screenshot: Annotated[
        Path | None, typer.Option(help="Also save a PNG of the page's top (headless Chromium).")
    ] = None,
    height: Annotated[int, typer.Option(min=200, help="Screenshot height in pixels.")] = 1800,
) -> int:
    """Write OUT/report.html from the walk tour and experiment results found in OUT."""
    from ..report import build_report, collect, left_out

    for note in left_out(out):
        typer.echo(f"eptlab report: {note}", err=True)
    if not collect(out):
        raise typer.BadParameter(f"no results in {out} (run `eptlab demo` or `eptlab run NAME`)")
    page = build_report(out)
    typer.echo(str(page))
    if screenshot is not None:
        from ..browser import screenshot as take

        typer.echo(str(take(page, screenshot, height=height)))
    return 0
