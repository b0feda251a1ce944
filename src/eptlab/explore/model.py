"""What the walk explorer shows, computed from one walk of the reference walker.

The grid is the familiar picture of a two-dimensional walk: one row per guest level the walk
visited (PML5E/PML4E .. the guest leaf) plus the row of the final data address, one column per
EPT level plus the read of the guest entry itself. Every memory reference of the walk is one
cell, so the cell count is the walker's reference count (24 for 4/4, 35 for 5/5, fewer with
large pages; SDM Vol. 3C §29.3.2). Nothing here is a constant: rows, columns and cells come from
the walker's references.

Cache scenarios say which references a hit in each translation cache removes; each rule is one
small function over the reference list, and the page only displays their results.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import TypeVar

from ..arch.bits import LEVEL_NAMES
from ..arch.ept import MEMTYPE_MASK, MEMTYPE_SHIFT, Ept, ept_is_leaf, ept_is_present
from ..arch.exits import (
    EPT_QUAL_MEANING,
    EptMisconfig,
    EptQual,
    EptViolation,
    ExitReason,
    GuestFault,
    PmlFull,
)
from ..arch.paging import PAGE_FAULT_MEANING, PTE_PAT, PageFaultError, Pte
from ..errors import ConfigError
from ..mmu.walker import DATA, Dim, Reference, Translation

F = TypeVar("F", bound=IntFlag)

GUEST_COLUMN = 0
"""``Column.level`` of the column holding the guest-entry reads (EPT columns use levels 1..5)."""


# -- the grid ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One row: the guest level whose entry is located (``for_level``), or :data:`DATA`."""

    for_level: int
    label: str


@dataclass(frozen=True, slots=True)
class Column:
    """One column: an EPT level (1..5) or :data:`GUEST_COLUMN`."""

    level: int
    label: str


@dataclass(frozen=True, slots=True)
class Cell:
    """The reference ``index`` (0-based walk order) at ``row``, ``col`` of the grid."""

    index: int
    row: int
    col: int
    label: str
    reference: Reference


@dataclass(frozen=True, slots=True)
class Slot:
    """A grid position without a reference: ``absent`` (a large page ends the EPT walk above
    it), ``unreached`` (the walk stopped before it) or ``data`` (the data access itself)."""

    row: int
    col: int
    kind: str


@dataclass(frozen=True, slots=True)
class Grid:
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    cells: tuple[Cell, ...]
    slots: tuple[Slot, ...]


def row_label(for_level: int) -> str:
    return "data" if for_level == DATA else LEVEL_NAMES[for_level]


def cell_label(ref: Reference) -> str:
    """``gL4 / eL3`` for the EPT read at level 3 translating the guest PML4E's GPA, ``gL4``
    for the guest PML4E read itself, ``data / eL1`` for the final translation."""
    row = "data" if ref.for_level == DATA else f"gL{ref.for_level}"
    return row if ref.dim == Dim.GUEST else f"{row} / eL{ref.level}"


def grid_of(translation: Translation) -> Grid:
    """Rows, columns and cells of ``translation``'s walk, in the walker's order."""
    refs = translation.references
    row_keys: list[int] = []
    for ref in refs:
        if ref.for_level not in row_keys:
            row_keys.append(ref.for_level)
    ept_levels = sorted({r.level for r in refs if r.dim == Dim.EPT}, reverse=True)
    if ept_levels:
        ept_levels = list(range(ept_levels[0], ept_levels[-1] - 1, -1))
    columns = [Column(level, f"EPT {LEVEL_NAMES[level]}") for level in ept_levels]
    columns.append(Column(GUEST_COLUMN, "guest entry"))
    col_of = {c.level: i for i, c in enumerate(columns)}
    rows = tuple(Row(k, row_label(k)) for k in row_keys)
    row_of = {k: i for i, k in enumerate(row_keys)}

    cells = tuple(
        Cell(
            i,
            row_of[ref.for_level],
            col_of[GUEST_COLUMN if ref.dim == Dim.GUEST else ref.level],
            cell_label(ref),
            ref,
        )
        for i, ref in enumerate(refs)
    )
    taken = {(c.row, c.col) for c in cells}
    stopped = not translation.ok
    last = cells[-1] if cells else None
    slots = []
    for r, row in enumerate(rows):
        for c, col in enumerate(columns):
            if (r, c) in taken:
                continue
            if row.for_level == DATA and col.level == GUEST_COLUMN:
                kind = "unreached" if stopped else "data"
            elif stopped and last is not None and r == last.row and c > last.col:
                kind = "unreached"
            else:
                kind = "absent"
            slots.append(Slot(r, c, kind))
    return Grid(rows, tuple(columns), cells, tuple(slots))


# -- cache scenarios: one rule per structure ------------------------------------------------


def tlb_hit(refs: Sequence[Reference]) -> frozenset[int]:
    """A TLB hit (a combined translation, GVA -> HPA) removes the whole walk
    (SDM Vol. 3A §4.10.2, Vol. 3C §29.4.1)."""
    return frozenset(range(len(refs)))


def guest_psc_hit(refs: Sequence[Reference], level: int) -> frozenset[int]:
    """The guest paging-structure cache holds the entry at ``level`` (PML5E..PDE): the walk
    starts below it (SDM Vol. 3A §4.10.3.2). Removed: the guest reads at ``level`` and above,
    their EPT walks, and the EPT walk that locates the next table, because under EPT the
    cached entry is a combined paging-structure-cache entry that holds the host-physical
    address of that table (SDM Vol. 3C §29.4.1)."""
    return frozenset(
        i
        for i, r in enumerate(refs)
        if (r.dim == Dim.GUEST and r.level >= level)
        or (r.dim == Dim.EPT and r.for_level != DATA and r.for_level >= level - 1)
    )


def nested_tlb_hit(refs: Sequence[Reference], rows: Iterable[int]) -> frozenset[int]:
    """The nested TLB (guest-physical translations, GPA -> HPA, SDM Vol. 3C §29.4.1) holds
    the pages of the guest rows ``rows`` (a guest level, or :data:`DATA` for the data page):
    the EPT walks of those rows are removed, the guest reads stay."""
    wanted = set(rows)
    return frozenset(i for i, r in enumerate(refs) if r.dim == Dim.EPT and r.for_level in wanted)


def _ept_walks(refs: Sequence[Reference]) -> list[list[int]]:
    """Indices of the references of each EPT walk (consecutive EPT reads of one GPA)."""
    walks: list[list[int]] = []
    previous: Reference | None = None
    for i, r in enumerate(refs):
        if r.dim != Dim.EPT:
            previous = None
            continue
        if previous is None or (previous.gpa, previous.for_level) != (r.gpa, r.for_level):
            walks.append([])
        walks[-1].append(i)
        previous = r
    return walks


def ept_psc_hit(refs: Sequence[Reference], level: int) -> frozenset[int]:
    """The EPT paging-structure caches hold EPT entries down to ``level`` (EPT PML5E..PDE):
    each EPT walk starts below the lowest cached entry it uses (SDM Vol. 3C §29.4.1,
    guest-physical paging-structure-cache entries). They cache only entries that reference a
    table, so a walk that ends in a large page at level ``k`` keeps its reads at ``k`` and
    below."""
    removed: set[int] = set()
    for walk in _ept_walks(refs):
        lowest_read = refs[walk[-1]].level
        start = max(level, lowest_read + 1)
        removed.update(i for i in walk if refs[i].level >= start)
    return frozenset(removed)


# -- the scenarios the page offers ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheOption:
    """One choice in one group of the page's scenario controls."""

    group: str  # "tlb", "psc", "ntlb_tables", "ntlb_data", "epsc"
    value: int  # 0 = off; a level for "psc"/"epsc"; 1 = on for the others
    label: str
    removed: frozenset[int]
    available: bool
    why: str  # why it is not available ("" when it is)


GROUPS = ("tlb", "psc", "ntlb_tables", "ntlb_data", "epsc")
GROUP_TITLES = {
    "tlb": "TLB",
    "psc": "Guest paging-structure caches",
    "ntlb_tables": "Nested TLB (table pages)",
    "ntlb_data": "Nested TLB (data page)",
    "epsc": "EPT paging-structure caches",
}


def cache_options(translation: Translation) -> list[CacheOption]:
    """Every non-trivial option of every group, with what it removes from this walk.

    A walk that ends in a fault or an exit must still reach the reference where it stopped:
    no cached mapping is created from a not-present or misconfigured entry (SDM Vol. 3A
    §4.10.2.1, Vol. 3C §29.4.2), and a cached mapping whose rights refuse the access is not
    what reports the fault: the processor walks again (a page fault invalidates the entries for
    the address, SDM Vol. 3A §4.10.4.1; the fast engine drops such an entry and walks). So
    options that would remove that reference are shown but not offered, and the TLB is never
    offered for such a walk."""
    refs = translation.references
    stopped = not translation.ok
    must_happen = {len(refs) - 1, outcome_of(translation).at} if stopped else set()

    def option(group: str, value: int, label: str, removed: frozenset[int]) -> CacheOption:
        why = ""
        if stopped and group == "tlb":
            why = "the fault or exit comes from a walk, not from a TLB entry"
        elif must_happen & removed:
            why = "it would skip the reference where the walk stops"
        elif not removed:
            why = "it removes nothing from this walk"
        return CacheOption(group, value, label, removed, not why, why)

    options = [option("tlb", 1, "hit: GVA \u2192 HPA", tlb_hit(refs))]
    guest_levels = [r.level for r in refs if r.dim == Dim.GUEST]
    rows_seen = {r.for_level for r in refs}
    for level in sorted(set(guest_levels), reverse=True):
        if level - 1 in rows_seen and level > 1:  # the entry referenced a table: cacheable
            name = LEVEL_NAMES[level]
            options.append(option("psc", level, name, guest_psc_hit(refs, level)))
    table_rows = [k for k in rows_seen if k != DATA]
    options.append(
        option(
            "ntlb_tables", 1, "GPA \u2192 HPA of the table pages", nested_tlb_hit(refs, table_rows)
        )
    )
    options.append(
        option("ntlb_data", 1, "GPA \u2192 HPA of the data page", nested_tlb_hit(refs, [DATA]))
    )
    ept_levels = sorted({r.level for r in refs if r.dim == Dim.EPT}, reverse=True)
    for level in ept_levels:
        if level > 1:
            name = f"EPT {LEVEL_NAMES[level]}"
            options.append(option("epsc", level, name, ept_psc_hit(refs, level)))
    return options


def scenario_key(choice: dict[str, int]) -> str:
    """The page's key for a combination: the values of :data:`GROUPS`, joined by ``-``."""
    return "-".join(str(choice.get(g, 0)) for g in GROUPS)


def combine(options: Sequence[CacheOption], choice: dict[str, int]) -> frozenset[int]:
    """References removed when the caches hold what ``choice`` says (group -> value): a
    reference is skipped when any structure holding it spares the walk its read."""
    removed: set[int] = set()
    for o in options:
        if choice.get(o.group, 0) == o.value:
            removed |= o.removed
    return frozenset(removed)


def scenario_table(options: Sequence[CacheOption]) -> dict[str, list[int]]:
    """The removed references of every combination of available options, by
    :func:`scenario_key` (a few hundred at most)."""
    values: dict[str, list[int]] = {g: [0] for g in GROUPS}
    for o in options:
        if o.available:
            values[o.group].append(o.value)
    table: dict[str, list[int]] = {}
    for combo in itertools.product(*(values[g] for g in GROUPS)):
        choice = dict(zip(GROUPS, combo, strict=True))
        table[scenario_key(choice)] = sorted(combine(options, choice))
    return table


# -- the outcome: exit reason, qualification, error code -----------------------------------


@dataclass(frozen=True, slots=True)
class BitRow:
    bit: int
    name: str
    value: int
    meaning: str


def flag_rows(flags: Iterable[F], value: int, meaning: Mapping[F, str]) -> list[BitRow]:
    """One row per flag of an ``IntFlag`` class, lowest bit first: number, name, value and
    what it says."""
    rows = [
        BitRow(
            int(f).bit_length() - 1,
            f.name or hex(f),
            int(bool(value & f)),
            meaning.get(f, ""),
        )
        for f in flags
    ]
    return sorted(rows, key=lambda r: r.bit)


def qualification_bits(qualification: int) -> list[BitRow]:
    """The EPT-violation exit qualification bit by bit (SDM Vol. 3C Table 28-7)."""
    return flag_rows(EptQual, qualification, EPT_QUAL_MEANING)


def error_code_bits(error_code: int) -> list[BitRow]:
    """The #PF error code bit by bit (SDM Vol. 3A §4.7)."""
    return flag_rows(PageFaultError, error_code, PAGE_FAULT_MEANING)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the walk ended and at which reference (``at`` is None when no reference was
    read, e.g. a non-canonical address or a GPA beyond the EPT walk's reach)."""

    kind: str  # "translated", "ept_violation", "ept_misconfig", "pml_full", "guest_fault"
    title: str
    at: int | None
    details: list[tuple[str, str]]
    bits_title: str
    bits: list[BitRow]
    note: str


def _exit_reference(translation: Translation, gpa: int | None) -> tuple[int | None, str]:
    refs = translation.references
    if not refs:
        return None, "no entry was read"
    last = len(refs) - 1
    if gpa is None or refs[last].gpa == gpa:
        return last, ""
    for i, r in enumerate(refs):
        if r.dim == Dim.GUEST and r.gpa == gpa:
            # SDM Vol. 3C §29.3.3.2: the processor's accessed/dirty update of a guest entry
            # is a write for EPT; it happens after the guest walk read every entry
            return i, "the processor's write of the accessed/dirty flag into this guest entry"
    return last, ""


def outcome_of(translation: Translation) -> Outcome:
    t = translation
    e = t.exit
    if isinstance(e, EptViolation):
        at, note = _exit_reference(t, e.gpa)
        details = [("guest-physical address", f"{e.gpa:#x}")]
        details.append(("guest-linear address", "not valid" if e.gla is None else f"{e.gla:#x}"))
        details.append(("exit qualification", f"{e.qualification:#x}"))
        return Outcome(
            "ept_violation",
            f"VM exit {int(e.reason)}: {e.reason.name}",
            at,
            details,
            "Exit qualification",
            qualification_bits(e.qualification),
            note,
        )
    if isinstance(e, EptMisconfig):
        at, note = _exit_reference(t, e.gpa)
        details = [
            ("guest-physical address", f"{e.gpa:#x}"),
            ("misconfigured entry", f"EPT {LEVEL_NAMES.get(e.level, str(e.level))}"),
            ("rule broken", e.why),
            ("exit qualification", f"{e.qualification:#x} (none for this exit)"),
        ]
        return Outcome(
            "ept_misconfig",
            f"VM exit {int(e.reason)}: {e.reason.name}",
            at,
            details,
            "",
            [],
            note,
        )
    if isinstance(e, PmlFull):
        at, note = _exit_reference(t, None)
        return Outcome(
            "pml_full", f"VM exit {int(e.reason)}: {e.reason.name}", at, [], "", [], note
        )
    f = t.fault
    if isinstance(f, GuestFault):
        at = len(t.references) - 1 if t.references else None
        names = {14: "#PF (page fault)", 13: "#GP (general protection)"}
        details = [
            ("vector", f"{f.vector} {names.get(f.vector, '')}".strip()),
            ("error code", f"{f.error_code:#x}"),
            ("faulting address (CR2)" if f.vector == 14 else "address", f"{f.address:#x}"),
            ("VM exit", f"none: the guest handles it (no {ExitReason.EXCEPTION_NMI.name} exit)"),
        ]
        return Outcome(
            "guest_fault",
            "Guest fault",
            at,
            details,
            "#PF error code" if f.vector == 14 else "",
            error_code_bits(f.error_code) if f.vector == 14 else [],
            "" if at is not None else "no entry was read",
        )
    assert t.gpa is not None and t.hpa is not None
    details = [
        ("guest-linear address", f"{t.gva:#x}"),
        ("guest-physical address", f"{t.gpa:#x}"),
        ("host-physical address", f"{t.hpa:#x}"),
        ("guest page", t.guest_page.label if t.guest_page else "?"),
        ("EPT page", t.ept_page.label if t.ept_page else "?"),
    ]
    return Outcome("translated", "Translated", None, details, "", [], "")


# -- the references, described -----------------------------------------------------------------


def entry_flags(ref: Reference, mbec: bool = False) -> str:
    """Names of the flags set in the entry as read (guest ``Pte`` or ``Ept`` bits). Bit 7 of a
    PML5E/PML4E (guest or EPT) is reserved, not PS; an EPT entry with only bit 10 set is
    present under mode-based execute control (``mbec``, SDM Vol. 3C §29.3.2)."""
    value = ref.value
    if ref.dim == Dim.EPT:
        if not ept_is_present(value, mbec):
            return "not present"
        ept_names = []
        for flag in Ept:
            if value & flag:
                top = flag == Ept.PS and ref.level >= 4
                ept_names.append("bit7(reserved)" if top else flag.name or "")
        if ept_is_leaf(value, ref.level):
            ept_names.append(f"MT={(value & MEMTYPE_MASK) >> MEMTYPE_SHIFT}")
        return " ".join(ept_names)
    if not value & Pte.P:
        return "not present"
    large = ref.level in (2, 3) and value & Pte.PS
    names = []
    for f in Pte:
        if not value & f:
            continue
        if f == Pte.PS and ref.level == 1:
            names.append("PAT" if value & PTE_PAT else "")  # bit 7 of a PTE is PAT
        elif f == Pte.PS and ref.level >= 4:
            names.append("bit7(reserved)")  # SDM Vol. 3A Tables 4-14/4-15: reserved (must be 0)
        elif f == Pte.LARGE_PAT and not large:
            continue  # bit 12 is an address bit unless the entry maps a large page
        else:
            names.append(f.name or "")
    return " ".join(n for n in names if n)


def reference_rows(translation: Translation, mbec: bool = False) -> list[dict[str, object]]:
    """The reference table: one dict per reference, addresses as hex strings (64-bit values
    do not fit a JavaScript number)."""
    rows: list[dict[str, object]] = []
    for i, r in enumerate(translation.references):
        entry = ("EPT " if r.dim == Dim.EPT else "guest ") + LEVEL_NAMES[r.level]
        target = "data" if r.for_level == DATA else f"guest {LEVEL_NAMES[r.for_level]}"
        rows.append(
            {
                "index": i,
                "dim": r.dim.value,
                "level": r.level,
                "for_level": r.for_level,
                "entry": entry,
                "for": target,
                "label": cell_label(r),
                "gpa": f"{r.gpa:#x}",
                "gpa_role": "entry at GPA" if r.dim == Dim.GUEST else "translating GPA",
                "hpa": f"{r.address:#x}",
                "value": f"{r.value:#018x}",
                "flags": entry_flags(r, mbec),
            }
        )
    return rows


# -- everything the page needs -----------------------------------------------------------------


def check_choice(options: Sequence[CacheOption], choice: Mapping[str, int]) -> dict[str, int]:
    """``choice`` (group -> value) if every value is an available option of this walk."""
    for group, value in choice.items():
        if group not in GROUPS:
            raise ConfigError("cache", f"unknown group {group!r} (one of {', '.join(GROUPS)})")
        if value == 0:
            continue
        match = [o for o in options if o.group == group and o.value == value]
        if not match:
            offered = [str(o.value) for o in options if o.group == group]
            raise ConfigError(
                "cache", f"{group}={value} is not offered for this walk (offered: {offered})"
            )
        if not match[0].available:
            raise ConfigError("cache", f"{group}={value} is not available: {match[0].why}")
    return {g: int(choice.get(g, 0)) for g in GROUPS}


def explorer_data(
    translation: Translation,
    *,
    command: str,
    initial_step: int = 0,
    initial_choice: Mapping[str, int] | None = None,
    mbec: bool = False,
) -> dict[str, object]:
    """The JSON document the page embeds: grid, references, scenarios and outcome. The page
    opens with the caches holding ``initial_choice`` and ``initial_step`` references done."""
    t = translation
    grid = grid_of(t)
    options = cache_options(t)
    outcome = outcome_of(t)
    choice = check_choice(options, initial_choice or {})
    walked = t.count - len(combine(options, choice))
    if not 0 <= initial_step <= walked:
        raise ConfigError("step", f"{initial_step} is outside 0..{walked} for this walk")
    return {
        "command": command,
        "summary": {
            "access": f"{t.mode.name.lower()} {t.access.name.lower()}",
            "gva": f"{t.gva:#x}",
            "count": t.count,
            "rows": len(grid.rows),
            "ept_columns": len(grid.columns) - 1,
        },
        "initial_step": initial_step,
        "initial_choice": choice,
        "rows": [{"for_level": r.for_level, "label": r.label} for r in grid.rows],
        "columns": [{"level": c.level, "label": c.label} for c in grid.columns],
        "cells": [
            {"index": c.index, "row": c.row, "col": c.col, "label": c.label} for c in grid.cells
        ],
        "slots": [{"row": s.row, "col": s.col, "kind": s.kind} for s in grid.slots],
        "references": reference_rows(t, mbec),
        "groups": [{"key": g, "title": GROUP_TITLES[g]} for g in GROUPS],
        "options": [
            {
                "group": o.group,
                "value": o.value,
                "label": o.label,
                "removes": len(o.removed),
                "available": o.available,
                "why": o.why,
            }
            for o in options
        ],
        "scenarios": scenario_table(options),
        "outcome": {
            "kind": outcome.kind,
            "title": outcome.title,
            "at": outcome.at,
            "details": [list(d) for d in outcome.details],
            "bits_title": outcome.bits_title,
            "bits": [
                {"bit": b.bit, "name": b.name, "value": b.value, "meaning": b.meaning}
                for b in outcome.bits
            ],
            "note": outcome.note,
        },
    }
