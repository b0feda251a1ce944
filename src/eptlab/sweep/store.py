"""Where a sweep's results go: one Parquet dataset written point by point, and a log of points.

``OUT/data/experiment=NAME/part-<point id>.parquet`` holds the rows of one finished point, every
seed's (the experiment's columns with ``seed`` first, plus ``point_id`` and one ``param_<key>``
column per override), written to a temporary name and renamed, so a file either is complete or
is not there. ``OUT/points.jsonl``
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
        return self._part(point.experiment, point.point_id)

    def _part(self, experiment: object, point_id: str) -> Path:
        return self.data / f"experiment={experiment}" / f"part-{point_id}.parquet"

    def done(self) -> set[str]:
        """Ids of points whose last record is ``ok``, with their part file or no rows at all."""
        last = {str(r["point_id"]): r for r in self._records() if "point_id" in r}
        return {
            pid
            for pid, r in last.items()
            if r.get("status") == "ok"
            and (r.get("rows") == 0 or self._part(r.get("experiment"), pid).exists())
        }

    def _records(self) -> list[dict[str, Any]]:
        """The log's records in order; lines cut short by an interruption are skipped."""
        if not self.log.exists():
            return []
        records = []
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

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
        records = [r for r in self._records() if "point_id" in r]
        if not records:
            return pd.DataFrame(columns=["point_id", "experiment", "status", "error"])
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

