"""The typer application; each subcommand lives in a module of its own."""

from __future__ import annotations

import typer

from . import (
    bench,
    calibrate,
    costs,
    demo,
    experiments,
    explore,
    kvm,
    oracle,
    report,
    sweep,
    trace,
    walk,
)

app = typer.Typer(
    name="eptlab",
    help="A laboratory for second-level address translation (Intel EPT / AMD NPT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("walk")(walk.walk)
app.command("explore")(explore.explore)
app.command("demo")(demo.demo)
app.command("bench")(bench.bench)
app.command("list")(experiments.list_experiments)
app.command("run")(experiments.run_experiment)
app.command("sweep")(sweep.sweep)
app.command("report")(report.report)
app.command("costs")(costs.costs)
app.command("calibrate")(calibrate.calibrate)
app.add_typer(trace.trace_app, name="trace")
app.add_typer(kvm.kvm_app, name="kvm")
app.add_typer(oracle.oracle_app, name="oracle")
