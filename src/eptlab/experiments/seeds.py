"""Repeating an experiment over seeds: ``params.seeds`` runs with ``seed, seed + 1, ...``, one
progress bar over all of them, a ``seed`` column on every row, and the summary (mean and 95%
interval per configuration, :mod:`.intervals`) that the runner saves beside the rows."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import fields, replace
from typing import Any

import pandas as pd

from ..errors import ConfigError
from .base import Experiment, Progress, Row
from .intervals import SEED, summarize


def seed_list(params: Any) -> list[int]:
    """The seeds a run of ``params`` uses: ``seed .. seed + seeds - 1``."""
    names = {f.name for f in fields(params)}
    if "seeds" not in names or "seed" not in names:
        raise ConfigError("seeds", f"{type(params).__name__} has no seeds/seed parameters")
    count, base = params.seeds, params.seed
    if not isinstance(count, int) or count < 1:
        raise ConfigError("seeds", f"{count!r}: run at least one seed")
    if not isinstance(base, int) or base < 0:
        raise ConfigError("seed", f"{base!r}: the base seed is a non-negative integer")
    return list(range(base, base + count))


def by_seed(experiment: Experiment, params: Any) -> bool:
    """Whether :func:`seeded_rows` runs ``experiment`` one seed after the other (so a run can
    resume after its last finished seed), rather than once."""
    return not getattr(experiment, "seeds_inside", False) and "seeds" in {
        f.name for f in fields(params)
    }


def seeded_rows(
    experiment: Experiment, params: Any, progress: Progress, skip: Collection[int] = ()
) -> Iterator[Row]:
    """Every row of ``experiment`` for each seed of ``params`` but those in ``skip`` (done by
    an earlier run), with its ``seed`` first; the progress of all seeds as one bar (each
    seed's share sized by the first seed's total).

    Two kinds of experiment run once instead: one that loops over its seeds itself
    (``seeds_inside = True``: its rows carry their seed), and one whose parameters have no
    ``seeds``: its rows get ``seed`` = its ``seed`` parameter (0 without one)."""
    if not by_seed(experiment, params):
        base = getattr(params, "seed", 0)
        for row in experiment.rows(params, progress):
            yield {SEED: row.get(SEED, base)} | {k: v for k, v in row.items() if k != SEED}
        return
    seeds = seed_list(params)
    per_seed = 0
    for i, seed in enumerate(seeds):
        if seed in skip:
            continue

        def report(done: int, total: int, i: int = i) -> None:
            nonlocal per_seed
            per_seed = max(per_seed, total)
            progress(i * per_seed + min(done, per_seed), len(seeds) * per_seed)

        for row in experiment.rows(replace(params, seed=seed), report):
            yield {SEED: seed} | {k: v for k, v in row.items() if k != SEED}


def summary_of(experiment: Experiment, table: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% interval per configuration (the experiment's ``keys``) of ``table``; an
    experiment that declares no keys is keyed by its text and boolean columns."""
    keys = getattr(experiment, "keys", None)
    if keys is None:
        keys = tuple(c for c in table.columns if c != SEED and not (
            pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
        ))
    return summarize(table, keys)

