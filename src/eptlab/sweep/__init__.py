"""Parameter sweeps: a grid of experiment runs written to one Parquet dataset as points finish,
resumable after an interruption, on local processes or a Dask distributed cluster."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .executors import connect, run_dask, run_inline, run_local, run_point
from .spec import Point, SweepSpec, load_spec, parse_spec
from .store import PointResult, SweepStore, load


@dataclass(frozen=True)
class SweepSummary:
    out: Path
    points: int
    skipped: int
    ok: int
    failed: int


def run_sweep(
    spec: SweepSpec,
    *,
    jobs: int | None = None,
    scheduler: Any = None,
    out: Path | None = None,
    on_result: Callable[[PointResult, int, int], None] | None = None,
) -> SweepSummary:
    """Run every point of ``spec`` not already done in ``out``; write each result as it comes.

    ``scheduler`` (an address or a ``distributed.Client``) runs points on Dask; otherwise
    ``jobs`` local processes (default: one per core; 1 runs in this process).
    """
    client = connect(scheduler) if isinstance(scheduler, str) else scheduler
    try:
        store = SweepStore(out or spec.out)
        with store.locked():  # the output is checked (and locked) before any point runs
            store.adopt(spec.points)
            store.repair_log()
            done = store.done()
            todo = [p for p in spec.points if p.point_id not in done]
            if client is not None:
                results = run_dask(todo, client)
            else:
                jobs = jobs or os.cpu_count() or 1
                results = (
                    run_inline(todo) if jobs == 1 or len(todo) <= 1 else run_local(todo, jobs)
                )
            ok = failed = 0
            for i, result in enumerate(results, 1):
                store.save(result)
                ok += result.ok
                failed += not result.ok
                if on_result is not None:
                    on_result(result, i, len(todo))
    finally:
        if client is not None and client is not scheduler:
            client.close()
    return SweepSummary(store.out, len(spec.points), len(spec.points) - len(todo), ok, failed)


__all__ = [
    "Point",
    "PointResult",
    "SweepSpec",
    "SweepStore",
    "SweepSummary",
    "load",
    "load_spec",
    "parse_spec",
    "run_point",
    "run_sweep",
]
