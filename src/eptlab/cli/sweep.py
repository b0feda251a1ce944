"""``eptlab sweep SPEC.toml``: a parameter grid, resumable, locally or on a Dask cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import ConfigError
from ..sweep.store import PointResult
from .costs import ProfileOption


def sweep(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC.toml", help="The sweep file.")],
    out: Annotated[
        Path | None, typer.Option(help="Result directory (default: the file's `out`).")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option(min=1, help="Local worker processes (default: one per core).")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Dask scheduler address (tcp://HOST:PORT) to run on.")
    ] = None,
    profile: ProfileOption = None,
) -> int:
    """Run every point of a parameter grid; rerun the same command to resume."""
    from ..sweep import load_spec
    from ..sweep.executors import connect

    try:
        spec = load_spec(spec_file, profile)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    client = connect(scheduler) if scheduler is not None else None  # one line if unreachable
    try:
        return _run(spec, out, jobs, client)
    finally:
        if client is not None:
            client.close()


def _run(spec: Any, out: Path | None, jobs: int | None, client: Any) -> int:
    from ..sweep import run_sweep

    console = Console()
    with Progress(
        TextColumn("[bold]sweep"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} points"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("", total=None)

        def on_result(result: PointResult, done: int, total: int) -> None:
            status = "ok" if result.ok else f"[red]failed: {result.error}"
            bar.update(task, completed=done, total=total, description=result.point.experiment)
            if not result.ok:
                console.print(f"point {result.point.point_id} {result.point.as_dict()}: {status}")

        summary = run_sweep(spec, jobs=jobs, scheduler=client, out=out, on_result=on_result)
    console.print(
        f"{summary.points} points: {summary.skipped} already done, {summary.ok} ran ok, "
        f"{summary.failed} failed; dataset {summary.out / 'data'}, "
        f"log {summary.out / 'points.jsonl'}"
    )
    return 1 if summary.failed else 0
