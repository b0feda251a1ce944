"""Running an experiment: progress bar, rows written as they arrive (CSV and JSON lines), then
Parquet, JSON and PNG figures at the end. Parameters and the output location are checked before
anything runs; files are written in ``OUT.partial`` and replace ``OUT`` only when complete
(:mod:`.output`); an interrupted run keeps every row it finished there, labelled partial."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import matplotlib

matplotlib.use("Agg")  # files only, no display

import pandas as pd  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from ..costs import CostProfile, use_profile  # noqa: E402
from .base import Experiment, Result, Row, apply_overrides, params_dict  # noqa: E402
from .intervals import SEED  # noqa: E402
from .output import RunOutput, atomic_write  # noqa: E402
from .registry import get  # noqa: E402
from .seeds import by_seed, seeded_rows, summary_of  # noqa: E402


def run(
    name: str,
    overrides: dict[str, str] | None = None,
    out: Path | None = None,
    *,
    show_progress: bool = True,
    profile: CostProfile | None = None,
    resume: bool = False,
) -> Result:
    """Run experiment ``name`` with parameter overrides and cost ``profile`` (default: the
    active one); write its files under ``out``. ``resume``: keep the finished seeds of an
    interrupted run of the same parameters and profile (:mod:`.output`), run the others."""
    with use_profile(profile) as used:
        return _run(name, overrides, out, show_progress=show_progress, profile=used,
                    resume=resume)


def _run(
    name: str,
    overrides: dict[str, str] | None,
    out: Path | None,
    *,
    show_progress: bool,
    profile: CostProfile,
    resume: bool,
) -> Result:
    experiment: Experiment = get(name)()
    params = apply_overrides(experiment.Params, overrides or {})
    out = Path(out) if out is not None else Path("out") / name
    staged, kept = RunOutput.open(  # checks `out` before any compute
        out, name, params_dict(params), profile.summary(), resume=resume and by_seed(
            experiment, params)
    )
    rows: list[Row] = list(kept)
    csv_path, jsonl_path = staged.path(f"{name}.csv"), staged.path(f"{name}.jsonl")
    try:
        _run_rows(experiment, params, name, rows, staged, csv_path, jsonl_path, show_progress)
        table = pd.DataFrame(rows)
        parquet = staged.path(f"{name}.parquet")
        atomic_write(parquet, lambda tmp: table.to_parquet(tmp, index=False))
        intervals = summary_of(experiment, table)  # mean and 95% interval per configuration
        atomic_write(staged.path(f"{name}-summary.csv"),
                     lambda tmp: intervals.to_csv(tmp, index=False))
        atomic_write(staged.path(f"{name}-summary.parquet"),
                     lambda tmp: intervals.to_parquet(tmp, index=False))
        summary = {"experiment": name, "params": params_dict(params), "rows": rows,
                   "summary": json.loads(intervals.to_json(orient="records"))}
        summary["profile"] = profile.summary()
        atomic_write(
            staged.path(f"{name}.json"),
            lambda tmp: tmp.write_text(json.dumps(summary, indent=1, default=_jsonable)),
        )
        import matplotlib.pyplot as plt

        for stem, figure in experiment.figures(table, params).items():
            atomic_write(staged.path(f"{stem}.png"), partial(_save_png, figure))
            plt.close(figure)
        files = staged.commit()
    except KeyboardInterrupt:
        print("eptlab: " + staged.interrupted("interrupted (SIGINT)"), file=sys.stderr)
        raise
    except BaseException as exc:
        staged.interrupted(f"stopped by {type(exc).__name__}")
        raise
    return Result(name, params_dict(params), table, files)


def _run_rows(
    experiment: Experiment,
    params: Any,
    name: str,
    rows: list[Row],
    staged: RunOutput,
    csv_path: Path,
    jsonl_path: Path,
    show_progress: bool,
) -> None:
    """Run the experiment, appending each row to ``rows`` and to the CSV and JSON-lines files
    as it arrives."""
    with (
        ExitStack() as opened,
        Progress(
            TextColumn(f"[bold]{name}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            disable=not show_progress,
            transient=False,
        ) as bar,
    ):
        task = bar.add_task(name, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        writer: csv.DictWriter[str] | None = None
        jsonl: TextIO | None = None
        csv_file: TextIO | None = None
        kept, rows[:] = list(rows), []  # the finished seeds of a resumed run come first
        current: int | None = None
        track = by_seed(experiment, params)  # else the seeds are not run one after the other
        new = seeded_rows(experiment, params, progress, staged.seeds_done)
        for row in itertools.chain(kept, new):
            if writer is None:
                csv_file = opened.enter_context(csv_path.open("w", newline=""))
                jsonl = opened.enter_context(jsonl_path.open("w"))
                writer = csv.DictWriter(csv_file, fieldnames=list(row))
                writer.writeheader()
            assert csv_file is not None and jsonl is not None
            if track and current is not None and current not in (row[SEED], *staged.seeds_done):
                staged.seeds_done.append(current)  # a seed's rows end where the next begin
                staged.write_manifest("partial")
            current = row[SEED]
            rows.append(row)
            if not row.keys() <= set(writer.fieldnames):  # a later row adds columns: widen
                fields = list(dict.fromkeys([*writer.fieldnames, *row]))
                csv_file.seek(0)
                csv_file.truncate()
                writer = csv.DictWriter(csv_file, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows[:-1])
            writer.writerow(row)
            csv_file.flush()
            jsonl.write(json.dumps(row, default=_jsonable) + "\n")
            jsonl.flush()
            staged.rows = len(rows)
        if track and current is not None and current not in staged.seeds_done:
            staged.seeds_done.append(current)  # the last seed ran to its end


def _save_png(figure: Any, path: Path) -> None:
    figure.savefig(path, format="png", dpi=110, bbox_inches="tight")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
