"""``eptlab demo``: the main job on built-in defaults.

A tour of the reference walker (the cost of a cold two-dimensional walk for every combination of
paging depths and page sizes, and the architectural events a hypervisor sees; ``out/walks.*``),
then every experiment at a small built-in scale (``out/NAME/``), and one self-contained HTML
report of all of it (``out/report.html``).
"""

from __future__ import annotations

import csv
import json
from itertools import product
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..arch.access import Access
from ..arch.bits import PageSize
from ..errors import EptlabError
from ..report import build_report
from .costs import ProfileOption
from .walk import run_walk

EVENTS = [
    ("write to a read-only EPT page (copy-on-write)", {"access": Access.WRITE, "ept_perms": "r-x"}),
    ("fetch from a non-executable EPT page", {"access": Access.FETCH, "ept_perms": "rw-"}),
    ("guest walk hits a non-present EPT entry", {"table_perms": "---"}),
    ("EPT A/D on: page-table reads are writes", {"table_perms": "r-x", "ept_ad": True}),
    ("write-without-read EPT entry", {"ept_perms": "-w-"}),
    ("user-mode read of a supervisor page", {"user": True, "page_user": False}),
]


def demo(
    out: Annotated[Path, typer.Option(help="Directory for the results.")] = Path("out"),
    experiments: Annotated[
        bool, typer.Option(help="Run the experiments (off: only the walk tour and the report).")
    ] = True,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only this experiment (repeatable).")
    ] = None,
    kvm: Annotated[
        bool, typer.Option(help="Also run the KVM applications when /dev/kvm opens.")
    ] = True,
    profile: ProfileOption = None,
) -> int:
    """The walk tour, every experiment at a small built-in scale, and OUT/report.html."""
    from ..costs import load_profile, use_profile

    with use_profile(load_profile(profile)):
        return _demo(out, experiments, only, kvm)


def _demo(out: Path, experiments: bool, only: list[str] | None, kvm: bool) -> int:
    console = Console()
    rows = []
    for gl, el, gp, ep in product((4, 5), (4, 5), PageSize, PageSize):
        t = run_walk(guest_levels=gl, ept_levels=el, guest_page=gp, ept_page=ep)
        rows.append(
            {
                "guest_levels": gl,
                "ept_levels": el,
                "guest_page": gp.label,
                "ept_page": ep.label,
                "references": t.count,
            }
        )
    table = Table(title="Cold 2D walk: memory references (n guest x m EPT levels)")
    for col in ("guest levels", "EPT levels", "guest page", "EPT page", "references"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)

    events = []
    for title, kwargs in EVENTS:
        t = run_walk(**kwargs)  # type: ignore[arg-type]
        outcome = t.exit.as_dict() if t.exit else (t.fault.as_dict() if t.fault else None)
        events.append({"event": title, "references": t.count, "outcome": outcome})
    ev = Table(title="What the hypervisor (or the guest) sees")
    for col in ("situation", "refs", "outcome"):
        ev.add_column(col)
    for e in events:
        o = e["outcome"]
        if isinstance(o, dict) and "reason_name" in o:
            text = f"exit {o['reason']} {o['reason_name']} qual={o['qualification']:#x}"
        elif isinstance(o, dict):
            text = f"#PF error code {o['error_code']:#x} {o['error_bits']}"
        else:
            text = "translated"
        ev.add_row(str(e["event"]), str(e["references"]), text)
    console.print(ev)

    out.mkdir(parents=True, exist_ok=True)
    (out / "walks.json").write_text(json.dumps({"walk_costs": rows, "events": events}, indent=2))
    with (out / "walks.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {out / 'walks.json'} and {out / 'walks.csv'}")
    failed: list[str] = []
    if experiments:
        failed += run_all(out, console, only)
    if kvm and not only:
        failed += run_kvm(out, console)
    report = build_report(out)
    console.print(f"[bold]report:[/] {report}")
    if failed:
        console.print(f"[red]failed (not in the report):[/] {', '.join(failed)}")
    return 1 if failed else 0


def run_all(out: Path, console: Console, only: list[str] | None = None) -> list[str]:
    """Every experiment (or ``only`` these) at its small built-in scale, one progress bar each.
    One that fails is reported and left out of the report; the others still run. Returns the
    names that failed."""
    from ..experiments import get, runner
    from ..experiments.registry import names

    chosen = only or names()
    for name in chosen:
        get(name)  # an unknown name fails before anything runs
    failed = []
    for name in chosen:
        try:
            runner.run(name, dict(get(name).demo), out / name)
            reading = _reading(name, out)
        except EptlabError as exc:
            console.print(f"[red]{name} failed:[/] {exc}")
            (out / name / f"{name}.json").unlink(missing_ok=True)  # no stale section
            failed.append(name)
            continue
        for sentence in reading:
            console.print(f"  [dim]-[/] {sentence}")
    return failed


def run_kvm(out: Path, console: Console) -> list[str]:
    """The KVM experiments (``kvm-*``) at their demo scale into ``out/kvm-NAME``, when /dev/kvm
    opens. Returns the experiments that failed (left out of the report)."""
    from ..experiments import get, runner
    from ..experiments.registry import kvm_names
    from ..kvm.results import unavailable

    why = unavailable()
    if why is not None:
        console.print(f"[yellow]KVM experiments skipped:[/] {why}")
        return []
    failed = []
    for name in kvm_names():
        console.print(f"{name} ...")
        try:
            runner.run(name, dict(get(name).demo), out / name, show_progress=False)
        except EptlabError as exc:
            console.print(f"[red]{name} failed:[/] {exc}")
            (out / name / f"{name}.json").unlink(missing_ok=True)
            failed.append(name)
    if len(failed) < len(kvm_names()):
        from ..report.sections import kvm_section

        for sentence in kvm_section(out).interpretation:
            console.print(f"  [dim]-[/] {sentence}")
    return failed


def _reading(name: str, out: Path) -> list[str]:
    from ..report.sections import experiment_section

    return experiment_section(name, out / name).interpretation
