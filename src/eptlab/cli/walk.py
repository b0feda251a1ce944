"""``eptlab walk``: build a one-mapping scenario and show one cold two-dimensional walk."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..arch.access import Access, Mode
from ..arch.bits import LEVEL_NAMES, PageSize
from ..arch.ept import parse_permissions
from ..arch.exits import describe_qualification
from ..arch.paging import PageFaultError
from ..mmu.scenario import NestedSpace
from ..mmu.walker import DATA, Translation


class Levels(StrEnum):
    four = "4"
    five = "5"


class Size(StrEnum):
    k4 = "4k"
    m2 = "2m"
    g1 = "1g"


class AccessKind(StrEnum):
    read = "read"
    write = "write"
    fetch = "fetch"


DEFAULT_GVA = 0x7F12_3456_7ABC
DEFAULT_GVA_TEXT = hex(DEFAULT_GVA)


def _perms(value: str) -> str:
    try:
        parse_permissions(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _address(value: str) -> int:
    try:
        address = int(value, 0)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an integer (use 0x... for hex)") from None
    if not 0 <= address < 1 << 64:
        raise typer.BadParameter(f"{value!r} is not a 64-bit address (0 .. 2^64-1)")
    return address


def walk_space(
    guest_levels: int = 4,
    ept_levels: int = 4,
    guest_page: PageSize = PageSize.SIZE_4K,
    ept_page: PageSize = PageSize.SIZE_4K,
    ept_perms: str = "rwx",
    table_perms: str = "rwx",
    ept_ad: bool = False,
    gva: int = DEFAULT_GVA,
    page_user: bool = False,
    table_ept_page: PageSize | None = None,
) -> NestedSpace:
    """The one-mapping scenario the walk options describe: ``gva`` mapped by a guest page
    (a user page when ``page_user``) backed by EPT, the guest tables given ``table_perms``.

    ``ept_page`` backs all of the guest's memory, page tables included (as a hypervisor backs
    guest RAM alike); ``table_ept_page`` sets the page tables' EPT page size apart."""
    space = NestedSpace.create(
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        ept_ad=ept_ad,
        table_ept_page=ept_page if table_ept_page is None else table_ept_page,
    )
    space.map(gva, guest_page, ept_page, ept_perms=ept_perms, user=page_user)
    if table_perms != "rwx":
        space.protect_tables(table_perms)
    return space


def run_walk(
    guest_levels: int = 4,
    ept_levels: int = 4,
    guest_page: PageSize = PageSize.SIZE_4K,
    ept_page: PageSize = PageSize.SIZE_4K,
    access: Access = Access.READ,
    ept_perms: str = "rwx",
    table_perms: str = "rwx",
    ept_ad: bool = False,
    user: bool = False,
    gva: int = DEFAULT_GVA,
    page_user: bool | None = None,
    table_ept_page: PageSize | None = None,
) -> Translation:
    """Build the scenario the CLI describes (:func:`walk_space`) and walk ``gva`` once, cold.
    The access is a user-mode one when ``user``; the page is a user page when ``page_user``
    (default: ``user``)."""
    space = walk_space(
        guest_levels=guest_levels,
        ept_levels=ept_levels,
        guest_page=guest_page,
        ept_page=ept_page,
        ept_perms=ept_perms,
        table_perms=table_perms,
        ept_ad=ept_ad,
        gva=gva,
        page_user=user if page_user is None else page_user,
        table_ept_page=table_ept_page,
    )
    return space.walker().translate(gva, access, Mode.USER if user else Mode.SUPERVISOR)


# The walk options, shared by every command that walks (``walk``, ``explore``).
GuestLevelsOption = Annotated[Levels, typer.Option(help="Guest paging levels (5 = LA57).")]
EptLevelsOption = Annotated[Levels, typer.Option(help="EPT page-walk length.")]
GuestPageOption = Annotated[Size, typer.Option(help="Guest page size of the mapping.")]
EptPageOption = Annotated[
    Size, typer.Option(help="EPT page size backing all guest memory, page tables included.")
]
TableEptPageOption = Annotated[
    Size | None,
    typer.Option(help="EPT page size backing the guest page tables (default: --ept-page)."),
]
AccessOption = Annotated[AccessKind, typer.Option(help="Kind of access.")]
EptPermsOption = Annotated[
    str, typer.Option(callback=_perms, help="EPT leaf permissions of the data page, e.g. r-x.")
]
TablePermsOption = Annotated[
    str, typer.Option(callback=_perms, help="EPT permissions of the guest page-table pages.")
]
EptAdOption = Annotated[bool, typer.Option("--ept-ad", help="Enable EPT accessed/dirty flags.")]
UserOption = Annotated[bool, typer.Option("--user", help="User-mode access to a user page.")]
GvaOption = Annotated[str, typer.Option(help="Guest-linear address to walk.")]


def walk_from_options(
    *,
    guest_levels: Levels,
    ept_levels: Levels,
    guest_page: Size,
    ept_page: Size,
    table_ept_page: Size | None = None,
    access: AccessKind,
    ept_perms: str,
    table_perms: str,
    ept_ad: bool,
    user: bool,
    gva: str,
) -> Translation:
    """:func:`run_walk` with the values of the walk options as the CLI parsed them."""
    return run_walk(
        guest_levels=int(guest_levels.value),
        ept_levels=int(ept_levels.value),
        guest_page=PageSize.parse(guest_page.value),
        ept_page=PageSize.parse(ept_page.value),
        table_ept_page=None if table_ept_page is None else PageSize.parse(table_ept_page.value),
        access=Access.parse(access.value),
        ept_perms=ept_perms,
        table_perms=table_perms,
        ept_ad=ept_ad,
        user=user,
        gva=_address(gva),
    )


def walk(
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
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> int:
    """Show one cold two-dimensional walk (every memory reference, the outcome, the exit)."""
    result = walk_from_options(
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
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        render(result, Console(width=max(110, Console().width)))
    return 0


def render(t: Translation, console: Console) -> None:
    """Human-readable view of a walk."""
    table = Table(title=f"{t.access.name.lower()} of {t.gva:#x}: {t.count} memory references")
    for column in ("#", "entry read", "on behalf of", "translating", "entry at HPA", "value"):
        table.add_column(column, justify="right" if column == "#" else "left", no_wrap=True)
    for i, ref in enumerate(t.references, 1):
        name = ("EPT " if ref.dim.value == "ept" else "") + LEVEL_NAMES[ref.level]
        target = "data" if ref.for_level == DATA else f"guest {LEVEL_NAMES[ref.for_level]}"
        table.add_row(
            str(i),
            name,
            target,
            f"GPA {ref.gpa:#x}",
            f"{ref.address:#x}",
            f"{ref.value:#018x}",
        )
    console.print(table)
    if t.hpa is not None:
        console.print(
            f"GVA {t.gva:#x} -> GPA {t.gpa:#x} -> HPA {t.hpa:#x} "
            f"(guest page {t.guest_page.label if t.guest_page else '?'}, "
            f"EPT page {t.ept_page.label if t.ept_page else '?'})"
        )
    if t.fault is not None:
        bits = [f.name for f in PageFaultError if t.fault.error_code & f]
        console.print(
            f"guest fault: vector {t.fault.vector}, error code {t.fault.error_code:#x} "
            f"{bits}, address {t.fault.address:#x}"
        )
    if t.exit is not None:
        e = t.exit
        console.print(f"VM exit: reason {int(e.reason)} ({e.reason.name})")
        if hasattr(e, "gpa") and e.gpa is not None:
            console.print(f"  guest-physical address {e.gpa:#x}")
        if e.qualification:
            console.print(
                f"  exit qualification {e.qualification:#x} "
                f"{describe_qualification(e.qualification)}"
            )
        why = getattr(e, "why", None)
        if why:
            console.print(f"  misconfigured entry at level {getattr(e, 'level', '?')}: {why}")
