"""``eptlab trace``: record a real program's memory accesses, summarize a trace file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..traces.info import TraceInfo, summarize
from ..traces.record import record as record_trace

trace_app = typer.Typer(
    name="trace",
    help="Record and inspect memory-access traces (valgrind lackey, ChampSim, native).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _os_error(exc: OSError, path: Path, hint: str) -> typer.BadParameter:
    return typer.BadParameter(f"{path}: {exc.strerror or exc}", param_hint=hint)


@trace_app.command("record", context_settings={"allow_interspersed_args": False})
def record(
    command: Annotated[
        list[str],
        typer.Argument(help="The program to run and its arguments (after --).", metavar="COMMAND"),
    ],
    output: Annotated[
        Path,
        typer.Option("-o", "--output", help="Native trace file to write.", dir_okay=False),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Keep the first N accesses, then stop the program."),
    ] = None,
) -> int:
    """Run COMMAND under valgrind lackey and write its accesses in the native format."""
    try:
        info = record_trace(command, output, stdout=2 if as_json else None, limit=limit)
    except OSError as exc:
        raise _os_error(exc, output, "'-o' / '--output'") from None
    show(info, as_json)
    return 0


@trace_app.command("info")
def info(
    path: Annotated[
        Path,
        typer.Argument(
            help="Trace file (native, ChampSim, lackey).",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> int:
    """Summarize a trace: accesses, read/write/fetch mix, distinct pages, address range."""
    try:
        result = summarize(path)
    except OSError as exc:
        raise _os_error(exc, path, "'PATH'") from None
    show(result, as_json)
    return 0


def show(info: TraceInfo, as_json: bool) -> None:
    """Print a summary as one JSON object or as a table."""
    if as_json:
        typer.echo(json.dumps(info.as_dict()))
    else:
        render(info, Console())


def _share(part: int, whole: int) -> str:
    return f"{part:,} ({100 * part / whole:.1f}%)" if whole else f"{part:,}"


def render(t: TraceInfo, console: Console) -> None:
    """Human-readable summary of a trace."""
    table = Table(title=f"{t.path} ({t.format})", show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_row("accesses", f"{t.accesses:,}")
    table.add_row("reads", _share(t.reads, t.accesses))
    table.add_row("writes", _share(t.writes, t.accesses))
    table.add_row("fetches", _share(t.fetches, t.accesses))
    table.add_row("distinct 4 KiB pages", f"{t.unique_pages:,}")
    table.add_row("footprint", f"{t.footprint_bytes / (1 << 20):,.2f} MiB")
    if t.min_address is not None and t.max_address is not None:
        table.add_row("lowest address", f"{t.min_address:#x}")
        table.add_row("highest address", f"{t.max_address:#x}")
    console.print(table)
