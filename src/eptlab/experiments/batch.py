"""Several experiments at once, one per worker process (``eptlab demo --jobs N``).

The workers are spawned (no state inherited from this process) and run
:func:`eptlab.experiments.runner.run` as a single run would, each into its own directory. The
engine's kernels are compiled first, in one worker, while this process does something else
(``meanwhile``): compiled by two cold workers at once they would cost twice the CPU.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..costs import load_profile
from ..errors import EptlabError

T = TypeVar("T")


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

    with spawned_pool(workers) as pool:
        warm = pool.submit(warm_up)
        if meanwhile is not None:
            meanwhile()
        warm.result()
        yield from as_finished([pool.submit(run_job, job, profile) for job in jobs])


def spawned_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes (no state inherited from this process)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(
        "spawn"))


def as_finished(futures: Sequence[Future[T]]) -> Generator[T, None, None]:
    """Each future's result as it finishes; those not started yet are cancelled when the
    caller stops early (an error, Ctrl-C, a consumer that breaks off)."""
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()
