"""Running points: in this process, on local worker processes, or on a Dask cluster.

Every executor runs the same function, :func:`run_point`, and yields results as points finish
(not in submission order), so the store can write each one as it arrives.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from ..costs import CostProfile, use_profile
from ..errors import ConfigError
from ..experiments.base import apply_overrides
from ..experiments.batch import as_finished, spawned_pool
from ..experiments.registry import get
from ..experiments.seeds import seeded_rows
from .spec import Point
from .store import PointResult


def run_point(point: Point) -> PointResult:
    """Run one point to the end, every seed of it (rows carry ``seed``); an exception becomes
    the point's recorded error."""
    start = time.perf_counter()
    try:
        default = CostProfile.default()
        profile = CostProfile.from_toml(point.profile, known=default) if point.profile else default
        with use_profile(profile):
            experiment = get(point.experiment)()
            params = apply_overrides(experiment.Params, point.as_dict())
            rows = [
                dict(r) | {"profile": profile.name}
                for r in seeded_rows(experiment, params, lambda done, total: None)
            ]
        return PointResult(point, rows, None, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - one point's failure must not stop the sweep
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "eptlab" in f.filename] or frames
        where = ours[-1]
        error = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        return PointResult(point, [], error, time.perf_counter() - start)


def run_inline(points: Sequence[Point]) -> Iterator[PointResult]:
    for point in points:
        yield run_point(point)


def run_local(points: Sequence[Point], jobs: int) -> Iterator[PointResult]:
    """One worker process per job (spawned: no state inherited from this process)."""
    with spawned_pool(jobs) as pool:
        yield from as_finished([pool.submit(run_point, p) for p in points])


CONNECT_TIMEOUT = 5.0
"""Seconds to reach a Dask scheduler before giving up."""


def connect(address: str, timeout: float | None = None) -> Any:
    """A ``distributed.Client`` for ``address``; a malformed or unreachable address is a
    :class:`ConfigError` naming it, after at most ``timeout`` seconds."""
    from distributed import Client
    from distributed.comm.addressing import parse_address

    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    try:
        scheme, location = parse_address(address, strict=True)
        if not location:
            raise ValueError("no host:port")
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            "scheduler", f"{address!r} is not a scheduler address (tcp://HOST:PORT): {exc}"
        ) from None
    try:
        return Client(address, timeout=f"{timeout}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(
            "scheduler", f"{address}: no Dask scheduler answered within {timeout:g} s ({exc})"
        ) from None


def run_dask(points: Sequence[Point], scheduler: Any) -> Iterator[PointResult]:
    """On a Dask distributed cluster: ``scheduler`` is an address or a ``Client``."""
    from distributed import Client
    from distributed import as_completed as dask_completed

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    try:
        futures = client.map(run_point, list(points), pure=False)
        try:
            for future in dask_completed(futures):
                yield future.result()
        finally:
            client.cancel(futures)
    finally:
        if client is not scheduler:
            client.close()
