"""``eptlab calibrate``: measure this host, write a cost profile of measured values."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from ..calibrate import Calibration
    from ..calibrate.memory import MemoryResults


def _size(n: int) -> str:
    gib, mib = 1 << 30, 1 << 20
    return f"{n / gib:g} GiB" if n >= gib else f"{n / mib:g} MiB" if n >= mib else f"{n >> 10} KiB"


def calibrate(
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write the profile here (TOML; raw samples beside it as .json). "
        "Default: print the TOML.", dir_okay=False)] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Seconds: small sizes only (for tests; not this host's DRAM or "
        "walk figures).")] = False,
    profile: Annotated[Path | None, typer.Option(
        "--profile", help="Base profile: values not measured are kept from it "
        "(default: the shipped one).", dir_okay=False)] = None,
    name: Annotated[str | None, typer.Option(
        help="Profile name (default calibrated-HOSTNAME).")] = None,
    kvm: Annotated[bool, typer.Option(
        "--kvm/--no-kvm", help="Measure the KVM backend where /dev/kvm opens.")] = True,
    walk_max_gib: Annotated[int, typer.Option(
        help="Largest footprint of the 4 KiB/2 MiB walk penalty (powers of 2 from 1 GiB).",
        min=1, max=16)] = 4,
) -> int:
    """Measure cache/DRAM latency, the 4 KiB page-walk penalty, copy bandwidth and (where
    /dev/kvm opens) KVM exit, trap, dirty-log and fork costs; write a cost profile."""
    from ..calibrate import Plan, calibrate, host_info
    from ..costs import load_profile

    base = load_profile(profile)
    host = host_info()
    plan = (Plan.quick(kvm=kvm) if quick else
            Plan.full(host.caches.get("l3", 32 << 20), kvm=kvm, walk_max=walk_max_gib << 30))
    console = Console(stderr=True, width=110)
    with Progress(TextColumn("{task.description:<46}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("calibrating", total=None)

        def step(label: str, total: int) -> None:
            bar.update(task, total=total, advance=1, description=label[:46])

        result = calibrate(plan, base, name or f"calibrated-{host.hostname}", step)
    _report(console, result)
    text = result.profile.to_toml()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result.raw(), indent=1) + "\n")
        console.print(f"wrote {out} (raw samples: {out.with_suffix('.json')})")
    return 0


def _bar(cycles: float, top: float) -> str:
    width = 30
    filled = 0 if cycles <= 1 else round(width * math.log(cycles) / math.log(max(top, 2)))
    return "█" * max(filled, 1)


def _walk_penalty(console: Console, m: MemoryResults) -> None:
    """The table of what 4 KiB pages cost over 2 MiB pages (nothing when not measured)."""
    penalty = m.walk_penalty()
    if not penalty:
        return
    walk = Table(title="random access: 4 KiB pages minus 2 MiB pages, cycles per access")
    for col in ("footprint", "dependent loads", "GUPS (independent RMW)"):
        walk.add_column(col, justify="right")
    gups = dict(m.walk_penalty("gups"))
    for size, s in penalty:
        g = gups.get(size)
        walk.add_row(_size(size), f"{s.median:.1f} ±{s.spread:.1f}",
                     "-" if g is None else f"{g.median:.1f} ±{g.spread:.1f}")
    console.print(walk)


def _report(console: Console, c: Calibration) -> None:
    h, m = c.host, c.memory
    caches = ", ".join(f"{k} {_size(v)}" for k, v in h.caches.items())
    console.print(f"host {h.label}; caches (sysfs) {caches}; TSC {c.clock.tsc_ghz:.3f} GHz, "
                  f"core {c.clock.core_ghz:.3f} GHz; {c.seconds:.0f} s; load average "
                  f"{c.load[0]:.1f} at the start, {c.load[1]:.1f} at the end "
                  f"({os.cpu_count()} CPUs)")
    curve = c.curve
    level_of: dict[int, str] = {}
    if curve is not None:
        for p in curve.plateaus:
            for i in range(p.first, p.last + 1):
                level_of[curve.points[i].footprint_bytes] = p.level
    table = Table(title="pointer chase: core cycles per load "
                  "(median of repeats ± interquartile range)")
    for col in ("footprint", "2m pages", "4k pages", "level", "curve (log scale)"):
        table.add_column(col, justify="right" if col != "curve (log scale)" else "left")
    by_page = {page: {r.footprint_bytes: r for r in pts} for page, pts in m.curve.items()}
    sizes = sorted({f for pts in by_page.values() for f in pts})
    top = max((r.cycles_per_access for pts in m.curve.values() for r in pts), default=2.0)
    for size in sizes:
        cells = []
        for page in ("2m", "4k"):
            r = by_page.get(page, {}).get(size)
            cells.append("-" if r is None else f"{r.cycles_per_access:.1f} ±{r.cycles.spread:.1f}")
        chosen = by_page.get(curve.page if curve else "4k", {}).get(size)
        table.add_row(_size(size), *cells, level_of.get(size, ""),
                      _bar(chosen.cycles_per_access, top) if chosen else "")
    console.print(table)
    if curve is not None:
        console.print(f"levels from the {curve.page} curve: " + "; ".join(
            f"{p.level} {p.latency:.1f} cycles ({_size(p.footprints(curve.sizes)[0])}.."
            f"{_size(p.footprints(curve.sizes)[1])})" for p in curve.plateaus))
    _walk_penalty(console, m)
    values = Table(title=f"measured values of profile {c.profile.name!r}")
    for col in ("key", "value", "unit", "spread", "samples"):
        values.add_column("IQR/median" if col == "spread" else col,
                          justify="left" if col in ("key", "unit") else "right")
    for row in c.profile.as_rows():
        if row["key"] in c.measured:
            values.add_row(row["key"], f"{row['value']:g}", row["unit"],
                           f"{row['spread']:.1%}", str(row["samples"]))
    console.print(values)
    for reason in [*m.skipped, *([f"KVM: {c.kvm_skipped}"] if c.kvm_skipped else [])]:
        console.print(f"skipped: {reason}")
    if "2m" in m.huge_pages and not m.huge_pages["2m"]:
        console.print("note: the OS did not give 2 MiB pages (AnonHugePages); the '2m' "
                      "rows ran on 4 KiB pages")
