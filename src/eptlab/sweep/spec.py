"""A sweep specification: experiments x parameter grids, read from TOML.

    out = "out/sweep"           # optional; default out/sweep-<file stem>
    profile = "host.toml"       # optional cost profile (relative to this file); default: shipped

    [[run]]
    experiment = "nested-overhead"
    [run.set]                   # the same for every point of this run
    accesses = 20000
    [run.grid]                  # every combination of these lists is one point
    workloads = [["random"], ["zipf", "gups"]]   # a tuple parameter takes a list per point
    footprint_mib = [64, 256]
    trace = ["", "traces/ls.lackey"]

Workloads and traces are experiment parameters like any other, so they are grid axes too. Every
point is checked against its experiment's parameters before anything runs; a bad key or value is
a :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any

from ..costs import CostProfile
from ..errors import ConfigError
from ..experiments.base import apply_overrides
from ..experiments.registry import get


@dataclass(frozen=True)
class Point:
    """One experiment run with fixed overrides (``key -> text``, as ``eptlab run --set``)."""

    experiment: str
    overrides: tuple[tuple[str, str], ...]
    profile: str = ""  # the cost profile's TOML text ("": the shipped default), sent to workers

    @property
    def point_id(self) -> str:
        """Stable across runs and machines: the resume key (a profile makes another point)."""
        key: list[object] = [self.experiment, list(self.overrides)]
        if self.profile:
            key.append(hashlib.sha256(self.profile.encode()).hexdigest())
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, str]:
        return dict(self.overrides)


@dataclass(frozen=True)
class SweepSpec:
    source: str
    out: Path
    points: list[Point] = field(default_factory=list)


def as_text(value: Any) -> str:
    """A TOML value as the text ``--set`` would take (lists for tuple parameters)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(as_text(v) for v in value)
    return str(value)


MAX_SPEC_BYTES = 1 << 20
"""Largest sweep file read (``eptlab sweep /dev/zero`` is refused, not read forever)."""
MAX_POINTS = 10_000
"""Most points a sweep file may describe (checked before the grid is expanded)."""


def load_spec(path: Path, profile: Path | None = None) -> SweepSpec:
    """Read and validate a sweep file; ``profile`` (a cost profile file) overrides the file's
    ``profile`` key."""
    try:
        with Path(path).open("rb") as fh:
            raw = fh.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise ConfigError(str(path), f"over {MAX_SPEC_BYTES >> 20} MiB: not a sweep file")
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    named = data.get("profile")
    if profile is None and named is not None:
        if not isinstance(named, str) or not named:
            raise ConfigError(f"{path}: profile", "must be the path of a cost profile file")
        profile = Path(path).parent / named
    data.pop("profile", None)
    spec = parse_spec(data, str(path))
    if profile is None:
        return spec
    text = CostProfile.load(profile).to_toml()
    return replace(spec, points=[replace(p, profile=text) for p in spec.points])


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> SweepSpec:
    unknown = set(data) - {"out", "run"}
    if unknown:
        raise ConfigError(f"{source}: {sorted(unknown)[0]}", "unknown key (known: out, run)")
    runs = data.get("run")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{source}: run", "needs at least one [[run]] table")
    out = data.get("out", str(Path("out") / f"sweep-{Path(source).stem}"))
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{source}: out", "must be a non-empty string (a folder)")
    points: list[Point] = []
    for i, run in enumerate(runs):
        points += _points(run, f"{source}: run[{i}]", MAX_POINTS - len(points))
    ids = [p.point_id for p in points]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: run", "the same point appears twice")
    return SweepSpec(source, Path(out), points)


def _points(run: Any, where: str, room: int = MAX_POINTS) -> list[Point]:
    if not isinstance(run, dict):
        raise ConfigError(where, "must be a table")
    unknown = set(run) - {"experiment", "set", "grid"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key (experiment, set, grid)")
    name = run.get("experiment")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.experiment", "missing or not a string")
    try:
        params_type = get(name).Params
    except ConfigError as exc:
        raise ConfigError(f"{where}.experiment", str(exc)) from None
    fixed = {k: as_text(v) for k, v in _table(run, "set", where).items()}
    grid = _table(run, "grid", where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.grid.{key}", "must be a non-empty list of values")
    keys = sorted(grid)
    count = 1
    for key in keys:
        count *= len(grid[key])
        if count > room:
            raise ConfigError(f"{where}.grid", f"more than {MAX_POINTS:,} points in the sweep")
    points = []
    for combo in product(*(grid[k] for k in keys)):
        overrides = dict(fixed) | {k: as_text(v) for k, v in zip(keys, combo, strict=True)}
        try:
            apply_overrides(params_type, overrides)
        except ConfigError as exc:
            section = "grid" if exc.field in grid else "set"
            message = str(exc).partition(": ")[2]
            raise ConfigError(f"{where}.{section}.{exc.field}", message) from None
        points.append(Point(name, tuple(sorted(overrides.items()))))
    return points


def _table(run: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = run.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key}", "must be a table of parameter = value")
    return value
