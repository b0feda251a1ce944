"""Running an experiment: progress bar, rows written as they arrive (CSV and JSON lines), then
Parquet, JSON and PNG figures at the end. An interrupted run keeps every row it finished."""

from __future__ import annotations

import csv
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import matplotlib

matplotlib.use("Agg")  # files only, no display

import pandas as pd  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from ..costs import CostProfile, use_profile  # noqa: E402
from .base import Experiment, Result, Row, apply_overrides, params_dict  # noqa: E402
from .registry import get  # noqa: E402


def run(
    name: str,
    overrides: dict[str, str] | None = None,
    out: Path | None = None,
    *,
    show_progress: bool = True,
    profile: CostProfile | None = None,
) -> Result:
    """Run experiment ``name`` with parameter overrides and cost ``profile`` (default: the
    active one); write its files under ``out``."""
    with use_profile(profile) as used:
        return _run(name, overrides, out, show_progress=show_progress, profile=used)


def _run(
    name: str,
    overrides: dict[str, str] | None,
    out: Path | None,
    *,
    show_progress: bool,
    profile: CostProfile,
) -> Result:
    experiment: Experiment = get(name)()
    params = apply_overrides(experiment.Params, overrides or {})
    out = Path(out) if out is not None else Path("out") / name
    rows: list[Row] = []
    csv_path, jsonl_path = out / f"{name}.csv", out / f"{name}.jsonl"
    files = [str(csv_path), str(jsonl_path)]
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
        for row in experiment.rows(params, progress):
            if writer is None:  # files appear with the first row: bad parameters leave none
                out.mkdir(parents=True, exist_ok=True)
                csv_file = opened.enter_context(csv_path.open("w", newline=""))
                jsonl = opened.enter_context(jsonl_path.open("w"))
                writer = csv.DictWriter(csv_file, fieldnames=list(row))
                writer.writeheader()
            assert csv_file is not None and jsonl is not None
            rows.append(row)
            writer.writerow(row)
            csv_file.flush()
            jsonl.write(json.dumps(row, default=_jsonable) + "\n")
            jsonl.flush()
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    parquet = out / f"{name}.parquet"
    table.to_parquet(parquet, index=False)
    summary = {"experiment": name, "params": params_dict(params), "rows": rows}
    summary["profile"] = profile.summary()
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    files += [str(parquet), str(out / f"{name}.json")]
    for stem, figure in experiment.figures(table, params).items():
        path = out / f"{stem}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        files.append(str(path))
        import matplotlib.pyplot as plt

        plt.close(figure)
    return Result(name, params_dict(params), table, files)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
