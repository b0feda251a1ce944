"""Where a sweep's results go: one Parquet dataset written point by point, and a log of points.

``OUT/data/experiment=NAME/part-<point id>.parquet`` holds the rows of one finished point (the
experiment's columns plus ``point_id`` and one ``param_<key>`` column per override), written to a
temporary name and renamed, so a file either is complete or is not there. ``OUT/points.jsonl``
gets one line per finished point (``ok`` or ``error`` with the error), appended and flushed as
points finish. A point counts as done when its ``ok`` line and its part file both exist: that is
what a resumed sweep skips.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .spec import Point


@dataclass(frozen=True)
class PointResult:
    """What running one point gave: its rows, or the error that stopped it."""

    point: Point
    rows: list[dict[str, Any]]
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


class SweepStore:
    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.data = self.out / "data"
        self.log = self.out / "points.jsonl"

    def part(self, point: Point) -> Path:
        return self.data / f"experiment={point.experiment}" / f"part-{point.point_id}.parquet"

    def done(self) -> set[str]:
        """Ids of points finished with ``ok`` whose part file exists."""
        if not self.log.exists():
            return set()
        ok: dict[str, str] = {}
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption
            if record.get("status") == "ok":
                ok[record["point_id"]] = record["experiment"]
        return {
            pid
            for pid, name in ok.items()
            if (self.data / f"experiment={name}" / f"part-{pid}.parquet").exists()
        }

    def save(self, result: PointResult) -> None:
        point = result.point
        if result.ok and result.rows:
            frame = pd.DataFrame(result.rows)
            frame.insert(0, "point_id", point.point_id)
            for key, value in point.overrides:
                frame[f"param_{key}"] = value
            path = self.part(point)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        record = {
            "point_id": point.point_id,
            "experiment": point.experiment,
            "overrides": point.as_dict(),
            "status": "ok" if result.ok else "error",
            "error": result.error,
            "rows": len(result.rows),
            "seconds": round(result.seconds, 3),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def points(self) -> pd.DataFrame:
        """The point log, last record per point."""
        if not self.log.exists():
            return pd.DataFrame(columns=["point_id", "experiment", "status", "error"])
        records = []
        for line in self.log.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return pd.DataFrame(records).drop_duplicates("point_id", keep="last")


def load(out: Path, experiment: str | None = None) -> pd.DataFrame:
    """The rows of a sweep (of one experiment, or all with an ``experiment`` column)."""
    data = Path(out) / "data"
    dirs = sorted(data.glob(f"experiment={experiment or '*'}"))
    frames = []
    for d in dirs:
        for part in sorted(d.glob("part-*.parquet")):
            frame = pd.read_parquet(part)
            frame.insert(0, "experiment", d.name.partition("=")[2])
            frames.append(frame)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)

