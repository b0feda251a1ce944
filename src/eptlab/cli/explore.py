"""``eptlab explore``: write (and serve) the interactive page of one two-dimensional walk."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from ..arch.bits import LEVEL_NAMES
from ..explore.model import explorer_data
from ..explore.page import render_page
from .walk import (
    DEFAULT_GVA_TEXT,
    AccessKind,
    AccessOption,
    EptAdOption,
    EptLevelsOption,
    EptPageOption,
    EptPermsOption,
    GuestLevelsOption,
    GuestPageOption,
    GvaOption,
    Levels,
    Size,
    TableEptPageOption,
    TablePermsOption,
    UserOption,
    walk_from_options,
)

DEFAULT_OUT = Path("out/explorer.html")


OWN_OPTIONS = frozenset({"out", "step", "cache", "serve", "port", "screenshot"})
LEVEL_BY_NAME = {name.lower(): level for level, name in LEVEL_NAMES.items()}


def _cache_choice(values: list[str]) -> dict[str, int]:
    """``--cache`` values: ``tlb``, ``ntlb_tables``, ``ntlb_data`` (on), ``psc=LEVEL`` and
    ``epsc=LEVEL`` with LEVEL a number (2..5) or an entry name (pde, pdpte, pml4e, pml5e)."""
    choice: dict[str, int] = {}
    for text in values:
        group, _, level = text.replace("-", "_").partition("=")
        if not level:
            choice[group] = 1
        elif level.isdigit():
            choice[group] = int(level)
        elif level.lower() in LEVEL_BY_NAME:
            choice[group] = LEVEL_BY_NAME[level.lower()]
        else:
            raise typer.BadParameter(f"{text!r}: the level is a number or an entry name (pde)")
    return choice


def _command_line(ctx: typer.Context) -> str:
    """``eptlab explore`` with the walk options given on the command line (for the page)."""
    words = ["eptlab", "explore"]
    for param in ctx.command.params:
        name = param.name
        if name is None or name in OWN_OPTIONS:
            continue
        source = ctx.get_parameter_source(name)
        if source is None or source.name != "COMMANDLINE":  # typer vendors its own click
            continue
        value = ctx.params[name]
        if isinstance(value, bool):
            if value:
                words.append(param.opts[0])
        else:
            words += [param.opts[0], str(getattr(value, "value", value))]
    return shlex.join(words)


def explore(
    ctx: typer.Context,
    guest_levels: GuestLevelsOption = Levels.four,
    ept_levels: EptLevelsOption = Levels.four,
    guest_page: GuestPageOption = Size.k4,
    ept_page: EptPageOption = Size.k4,
    table_ept_page: TableEptPageOption = None,
    access: AccessOption = AccessKind.read,
    ept_perms: EptPermsOption = "rwx",
    table_perms: TablePermsOption = "rwx",
    ept_ad: EptAdOption = False,
    user: UserOption = False,
    gva: GvaOption = DEFAULT_GVA_TEXT,
    out: Annotated[Path, typer.Option(help="Where to write the page.")] = DEFAULT_OUT,
    step: Annotated[
        int, typer.Option(min=0, help="References already stepped through when it opens.")
    ] = 0,
    cache: Annotated[
        list[str] | None,
        typer.Option(
            help="Cache scenario the page opens with (repeatable): tlb, psc=pde, "
            "ntlb_tables, ntlb_data, epsc=pdpte."
        ),
    ] = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve the page on 127.0.0.1 until Ctrl-C.")
    ] = False,
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port for --serve (0: a free one).")
    ] = 8000,
    screenshot: Annotated[
        Path | None,
        typer.Option(help="Also render the page in headless Chromium and save a PNG here."),
    ] = None,
) -> int:
    """Write an interactive page that steps through one two-dimensional walk."""
    translation = walk_from_options(
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        guest_page=guest_page,
        ept_page=ept_page,
        table_ept_page=table_ept_page,
        access=access,
        ept_perms=ept_perms,
        table_perms=table_perms,
        ept_ad=ept_ad,
        user=user,
        gva=gva,
    )
    data = explorer_data(
        translation,
        command=_command_line(ctx),
        initial_step=step,
        initial_choice=_cache_choice(cache or []),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(data), encoding="utf-8")
    typer.echo(f"wrote {out} ({translation.count} references)")
    if screenshot is not None:
        from ..browser import screenshot as take

        typer.echo(f"wrote {take(out, screenshot)}")
    if serve:
        from ..explore.serve import make_server, url_of

        server = make_server(out, port)
        typer.echo(f"serving {url_of(server, out)} (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0
