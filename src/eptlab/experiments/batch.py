"""Several experiments at once, one per worker process (``eptlab demo --jobs N``).

The workers are spawned (no state inherited from this process) and run
:func:`eptlab.experiments.runner.run` as a single run would, each into its own directory. The
engine's kernels are compiled first, in one worker, while this process does something else
(``meanwhile``): compiled by two cold workers at once they would cost twice the CPU.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from ..costs import load_profile
from ..errors import EptlabError


@dataclass(frozen=True)
class Job:
    """One experiment run: its name, parameter overrides and output directory."""

    name: str
    overrides: dict[str, str]
    out: Path


@dataclass(frozen=True)
class Finished:
    """A job's end: ``error`` is the run's :class:`EptlabError` as text (None: it succeeded)."""

    job: Job
    error: str | None
    seconds: float


def run_job(job: Job, profile: Path | None) -> Finished:
    """Run ``job`` under the cost profile at ``profile`` (None: the default), in this process."""
    from . import runner

    start = time.perf_counter()
    try:
        runner.run(
            job.name, job.overrides, job.out, show_progress=False, profile=load_profile(profile)
        )
    except EptlabError as exc:
        return Finished(job, str(exc), time.perf_counter() - start)
    return Finished(job, None, time.perf_counter() - start)


def run_parallel(
    jobs: Sequence[Job],
    workers: int,
    profile: Path | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> Iterator[Finished]:
    """Run ``jobs`` on ``workers`` processes, in the order given (put the longest first),
    yielding each as it finishes. ``meanwhile`` runs here while the kernels compile."""
    from ..mmu.warm import warm_up

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        warm = pool.submit(warm_up)
        if meanwhile is not None:
            meanwhile()
        warm.result()
        futures = [pool.submit(run_job, job, profile) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
