"""``eptlab bench``: accesses per second of the fast engine and of the reference walker, measured
in the same run, for the standard workloads (and a real trace when one is given)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .. import bench as bench_lib
from ..arch.bits import PageSize
from ..memory.layout import LAYOUTS
from .costs import ProfileOption

STARTUP_PROBE = """
import time
t0 = time.perf_counter()
from eptlab.arch import Access
from eptlab.mmu.config import MmuConfig
from eptlab.mmu.engine import Accesses, Engine
from eptlab.mmu.scenario import NestedSpace
space = NestedSpace.create(layout="contiguous")
space.map(0x7F0000000000)
engine = Engine(space.memory, MmuConfig(), space.features)
engine.add_vcpu(space.guest, space.vmcs)
assert engine.run(Accesses.build([0x7F0000000000], Access.READ)).done
print(time.perf_counter() - t0)
"""


def startup_seconds() -> float:
    """Seconds a fresh Python process needs to import eptlab and perform its first access
    (kernels already compiled and cached: run this after a warm-up)."""
    out = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    )
    return round(float(out.stdout.strip().splitlines()[-1]), 3)


def bench(
    accesses: Annotated[int, typer.Option(help="Accesses per workload.", min=1)] = 4_000_000,
    workloads: Annotated[
        str, typer.Option(help="Comma-separated: seq64, seq4k, random, zipf.")
    ] = "seq64,seq4k,random,zipf",
    trace: Annotated[
        Path | None,
        typer.Option(help="Also run this valgrind lackey trace.", exists=True, dir_okay=False),
    ] = None,
    guest_page: Annotated[str, typer.Option(help="Guest page size: 4k, 2m or 1g.")] = "4k",
    ept_page: Annotated[str, typer.Option(help="EPT page size: 4k, 2m or 1g.")] = "4k",
    walker_sample: Annotated[
        int, typer.Option(help="Accesses timed on the walker.", min=10)
    ] = 3000,
    layout: Annotated[
        str,
        typer.Option(help="Memory layout: contiguous (default, comparable across versions) or "
                     "aged (docs/layouts.md)."),
    ] = "contiguous",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    profile: ProfileOption = None,
) -> int:
    """Measure engine throughput against the reference walker on the same streams."""
    from ..costs import load_profile, use_profile

    costs = load_profile(profile)
    with use_profile(costs):
        return _bench(
            accesses, workloads, trace, guest_page, ept_page, walker_sample, as_json, layout
        )


def _bench(
    accesses: int,
    workloads: str,
    trace: Path | None,
    guest_page: str,
    ept_page: str,
    walker_sample: int,
    as_json: bool,
    layout: str = "contiguous",
) -> int:
    from ..costs import active_profile

    names = [w.strip() for w in workloads.split(",") if w.strip()]
    for name in names:
        if name not in bench_lib.WORKLOADS:
            raise typer.BadParameter(
                f"{name!r} is not one of {', '.join(bench_lib.WORKLOADS)}", param_hint="--workloads"
            )
    try:
        gp, ep = PageSize.parse(guest_page), PageSize.parse(ept_page)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if layout not in LAYOUTS:
        raise typer.BadParameter(
            f"{layout!r} is not one of {', '.join(LAYOUTS)}", param_hint="--layout"
        )
    console = Console(stderr=True)
    results = []
    with console.status("benchmarking") as status:
        for name in names:
            status.update(f"{name}: {accesses:,} accesses")
            results.append(
                bench_lib.run(
                    name, accesses, walker_sample=walker_sample, guest_page=gp, ept_page=ep,
                    layout=layout,
                )
            )
        if trace is not None:
            status.update(f"trace {trace}")
            results.append(
                bench_lib.run(
                    "trace", accesses, trace=trace, walker_sample=walker_sample, layout=layout
                )
            )
        status.update("startup time of a second process")
        startup = startup_seconds()
    report = {
        "results": [r.as_dict() for r in results],
        "startup_seconds": startup,
        "guest_page": gp.label,
        "ept_page": ep.label,
        "layout": layout,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "profile": active_profile().summary(),
    }
    if as_json:
        typer.echo(json.dumps(report))
        return 0
    table = Table(
        title=f"Engine vs reference walker ({gp.label} guest pages, {ep.label} EPT pages, "
        f"{layout} layout)"
    )
    for col in (
        "workload",
        "accesses",
        "engine acc/s",
        "walker acc/s",
        "ratio",
        "C acc/s",
        "engine/C",
        "walks/acc",
        "cycles/acc",
        "peak RSS MiB",
    ):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in results:
        table.add_row(
            r.workload,
            f"{r.accesses:,}",
            f"{r.accesses_per_s:,.0f}",
            f"{r.walker_accesses_per_s:,.0f}",
            f"{r.ratio:,.0f}x",
            "-" if r.c_accesses_per_s is None else f"{r.c_accesses_per_s:,.0f}",
            "-" if r.c_fraction is None else f"{r.c_fraction:.2f}",
            f"{r.walks_per_access:.3f}",
            f"{r.cycles_per_access:.0f}",
            f"{r.peak_rss_mib:,.0f}",
        )
    out = Console()
    out.print(table)
    out.print(
        "engine/C: the engine's throughput as a fraction of a plain C loop on the same stream, "
        "same run (benchmarks/c_limit: uncached 2D walk, same L1/L2 TLBs, no data caches)"
    )
    out.print(f"second-process start to first access: {startup:.2f} s")
    out.print(f"cycles priced by cost profile {active_profile().name!r} (eptlab costs)")
    return 0
