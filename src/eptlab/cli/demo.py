"""``eptlab demo``: the main job on built-in defaults.

A tour of the reference walker (the cost of a cold two-dimensional walk for every combination of
paging depths and page sizes, and the architectural events a hypervisor sees; ``out/walks.*``),
then every experiment at a small built-in scale (``out/NAME/``), and one self-contained HTML
report of all of it (``out/report.html``).
"""

from __future__ import annotations

import csv
import json
import os
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
    jobs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Experiments run at once, one process each (default: the CPUs this process "
            "may use, at most 4). 1: one after the other, each alone on the machine.",
        ),
    ] = None,
) -> int:
    """The walk tour, every experiment at a small built-in scale, and OUT/report.html."""
    from ..costs import load_profile, use_profile

    with use_profile(load_profile(profile)):
        return _demo(out, experiments, only, kvm, jobs or default_jobs(), profile)


def default_jobs() -> int:
    """The CPUs this process may run on, at most :data:`MAX_JOBS`."""
    return max(1, min(MAX_JOBS, len(os.sched_getaffinity(0))))


MAX_JOBS = 4
DEMO_SECONDS = {  # each at demo scale, kernels compiled (2026-12-07, quiet machine, --jobs 2)
    "aslr-side-channel": 30,
    "prefetch-hypercall": 18,
    "tsx-aborts": 18,
    "double-caching": 16,
    "cow-fork": 15,
    "model-vs-machine": 13,
    "trap-debugger": 12,
    "memory-encryption": 11,
    "integrity-monitor": 9,
    "nested-overhead": 3,
}  # only an order: the longest start first, so the workers finish together


def _demo(  # noqa: PLR0913 - the demo command's options, passed on
    out: Path,
    experiments: bool,
    only: list[str] | None,
    kvm: bool,
    jobs: int,
    profile: Path | None,
) -> int:
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
    with_kvm = kvm and not only
    if experiments and jobs > 1:
        failed += run_all_parallel(out, console, only, jobs, profile, with_kvm)
    else:
        if experiments:
            failed += run_all(out, console, only)
        if with_kvm:
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

    failed: list[str] = []
    for name in _chosen(only):
        try:
            runner.run(name, dict(get(name).demo), out / name)
            _print_reading(name, out, console)  # its reading is computed before it prints
        except EptlabError as exc:
            _failed(name, str(exc), out, console, failed)
    return failed


def run_all_parallel(  # noqa: PLR0913 - run_all's arguments and the batch's
    out: Path,
    console: Console,
    only: list[str] | None,
    jobs: int,
    profile: Path | None,
    with_kvm: bool,
) -> list[str]:
    """:func:`run_all` on ``jobs`` worker processes, the longest first; the KVM experiments
    (``with_kvm``) run here meanwhile, while a worker compiles the engine's kernels. Readings
    print as experiments finish. Returns the names that failed."""
    from rich.progress import Progress

    from ..experiments import get
    from ..experiments.batch import Job, run_parallel

    order = sorted(_chosen(only), key=lambda n: -DEMO_SECONDS.get(n, 0))
    batch = [Job(name, dict(get(name).demo), out / name) for name in order]
    failed: list[str] = []

    def meanwhile() -> None:
        if with_kvm:
            failed.extend(run_kvm(out, console))

    console.print(f"{len(batch)} experiments on {jobs} processes (kernels compile first)")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("experiments", total=len(batch))
        for done in run_parallel(batch, jobs, profile, meanwhile):
            name = done.job.name
            progress.advance(task)
            if done.error is not None:
                _failed(name, done.error, out, console, failed)
                continue
            console.print(f"[bold]{name}[/] ({done.seconds:.0f} s)")
            _print_reading(name, out, console)
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
    failed: list[str] = []
    for name in kvm_names():
        console.print(f"{name} ...")
        try:
            runner.run(name, dict(get(name).demo), out / name, show_progress=False)
        except EptlabError as exc:
            _failed(name, str(exc), out, console, failed)
    if len(failed) < len(kvm_names()):
        from ..report.sections import kvm_section

        for sentence in kvm_section(out).interpretation:
            console.print(f"  [dim]-[/] {sentence}")
    return failed


def _chosen(only: list[str] | None) -> list[str]:
    """The experiments to run (``only`` these, else all); an unknown name fails before any
    runs."""
    from ..experiments import get
    from ..experiments.registry import names

    chosen = only or names()
    for name in chosen:
        get(name)
    return chosen


def _failed(name: str, error: str, out: Path, console: Console, failed: list[str]) -> None:
    """Report a failed experiment, drop its JSON (no stale report section), note its name."""
    console.print(f"[red]{name} failed:[/] {error}")
    (out / name / f"{name}.json").unlink(missing_ok=True)
    failed.append(name)


def _print_reading(name: str, out: Path, console: Console) -> None:
    from ..report.sections import experiment_section

    for sentence in experiment_section(name, out / name).interpretation:
        console.print(f"  [dim]-[/] {sentence}")
