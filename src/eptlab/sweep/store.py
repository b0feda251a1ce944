"""Where a sweep's results go: one Parquet dataset written point by point, and a log of points.

``OUT/data/experiment=NAME/part-<point id>.parquet`` holds the rows of one finished point, every
seed's (the experiment's columns with ``seed`` first, plus ``point_id`` and one ``param_<key>``
column per override), written to a temporary name and renamed, so a file either is complete or
is not there. ``OUT/points.jsonl``
gets one line per finished point (``ok`` or ``error`` with the error), appended and flushed as
points finish. A point counts as done when its ``ok`` line and its part file both exist: that is
what a resumed sweep skips.

``OUT/sweep.json`` records the points of the spec the output belongs to. A sweep whose spec
changed (other points) is refused with the changed keys named, so one output never mixes the
results of two specs; :func:`load` refuses part files that are not points of the recorded spec
and labels an unfinished sweep (``frame.attrs["complete"]``). A running sweep holds an exclusive
lock on ``OUT/.lock``: a second sweep into the same output is refused at once. A log line cut
short by a kill is removed before anything is appended after it.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError
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

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Create the output and hold its lock while a sweep writes to it; raise
        :class:`ConfigError` naming the path when it cannot be created or is in use."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError("out", f"{self.out} exists and is not a directory")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            handle = (self.out / ".lock").open("a+")
        except OSError as exc:
            raise ConfigError("out", f"{self.out}: {exc.strerror or exc}") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise ConfigError(
                    "out",
                    f"{self.out} is in use by another sweep (pid {holder}): wait for it to "
                    "finish or choose another output",
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def adopt(self, points: list[Point]) -> None:
        """Record ``points`` as this output's spec, or refuse a spec other than the recorded
        one (or than the points already logged), naming what changed."""
        recorded = self._recorded()
        if recorded is None:
            recorded = {
                str(r["point_id"]): (str(r.get("experiment")), r.get("overrides") or {})
                for r in self._records()
                if "point_id" in r
            }
            if not set(recorded) - {p.point_id for p in points}:
                self._write_spec(points)
                return
        new = {p.point_id: (p.experiment, p.as_dict()) for p in points}
        if set(recorded) == set(new):
            return
        changed = _changed_keys(list(recorded.values()), list(new.values()))
        raise ConfigError(
            "out",
            f"{self.out} holds the results of another sweep spec (changed: {', '.join(changed)}"
            f"; {len(set(recorded) - set(new))} recorded point(s) not in this spec, "
            f"{len(set(new) - set(recorded))} new): use another output, or remove {self.out} "
            "to start over",
        )

    def _recorded(self) -> dict[str, tuple[str, dict[str, str]]] | None:
        try:
            data = json.loads((self.out / "sweep.json").read_text())
            return {
                str(p["point_id"]): (str(p["experiment"]), dict(p["overrides"]))
                for p in data["points"]
            }
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError("out", f"{self.out / 'sweep.json'} is unreadable: {exc}") from None

    def _write_spec(self, points: list[Point]) -> None:
        from .. import __version__

        record = {
            "eptlab": __version__,
            "points": [
                {"point_id": p.point_id, "experiment": p.experiment, "overrides": p.as_dict()}
                for p in points
            ],
        }
        path = self.out / "sweep.json"
        tmp = path.with_name(f".sweep.json.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)

    def repair_log(self) -> int:
        """Cut a last line left incomplete by a kill (it would swallow the next record);
        returns the bytes removed."""
        if not self.log.exists():
            return 0
        with self.log.open("rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return 0
            keep = 0
            position = size
            while position > 0 and not keep:  # find the last newline, a block at a time
                start = max(0, position - 65536)
                fh.seek(start)
                block = fh.read(position - start)
                index = block.rfind(b"\n")
                if index >= 0:
                    keep = start + index + 1
                position = start
            fh.truncate(keep)
            return size - keep

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
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
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
    """The rows of a sweep (of one experiment, or all with an ``experiment`` column).

    Part files that are not points of the recorded spec (``sweep.json``) are refused with a
    :class:`ConfigError`; ``frame.attrs["complete"]`` says whether every point of the spec has
    finished and ``frame.attrs["missing_points"]`` how many have not."""
    store = SweepStore(Path(out))
    recorded = store._recorded()
    data = Path(out) / "data"
    dirs = sorted(data.glob(f"experiment={experiment or '*'}"))
    parts = [part for d in dirs for part in sorted(d.glob("part-*.parquet"))]
    if recorded is not None:
        stale = [p for p in parts if p.stem.removeprefix("part-") not in recorded]
        if stale:
            raise ConfigError(
                "out",
                f"{len(stale)} part file(s) under {data} are not points of the sweep recorded "
                f"in {Path(out) / 'sweep.json'} (stale results, e.g. {stale[0].name})",
            )
    frames = []
    for d in dirs:
        for part in sorted(d.glob("part-*.parquet")):
            frame = pd.read_parquet(part)
            frame.insert(0, "experiment", d.name.partition("=")[2])
            frames.append(frame)
    result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if recorded is not None:
        wanted = {pid for pid, (name, _) in recorded.items() if experiment in (None, name)}
        missing = len(wanted - store.done())
        result.attrs["complete"] = missing == 0
        result.attrs["missing_points"] = missing
    return result


def _changed_keys(
    old: list[tuple[str, dict[str, str]]], new: list[tuple[str, dict[str, str]]]
) -> list[str]:
    """``experiment.key`` for each parameter whose values differ between two point lists (and
    ``experiment`` for an experiment only one of them has)."""

    def values(points: list[tuple[str, dict[str, str]]]) -> dict[str, dict[str, set[str]]]:
        out: dict[str, dict[str, set[str]]] = {}
        for name, overrides in points:
            keys = out.setdefault(name, {})
            for key, value in overrides.items():
                keys.setdefault(key, set()).add(value)
        return out

    a, b = values(old), values(new)
    changed = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            changed.append(f"{name} ({'added' if name in b else 'removed'})")
            continue
        for key in sorted(set(a[name]) | set(b[name])):
            if a[name].get(key) != b[name].get(key):
                changed.append(f"{name}.{key}")
    return changed or ["the combination of points"]

