"""What an experiment is: a question, a parameters dataclass, and a run that yields result rows
one at a time (so they can be written as they come), plus figures drawn from the table."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Protocol

import pandas as pd
from matplotlib.figure import Figure

from ..errors import ConfigError, EptlabError

Row = dict[str, Any]
Progress = Callable[[int, int], None]
"""``progress(done, total)``: called by an experiment as it advances."""


class Experiment(Protocol):
    """One question, answered by a table and figures."""

    name: ClassVar[str]
    question: ClassVar[str]
    Params: ClassVar[type]
    demo: ClassVar[dict[str, str]]
    """Overrides (as ``--set`` takes them) for the small built-in scale of ``eptlab demo``."""
    keys: ClassVar[tuple[str, ...]]
    """The columns that identify a configuration: rows with the same keys and different seeds
    are repeats, summarized by mean and interval (:mod:`.intervals`); the other numeric columns
    are measured."""

    def rows(self, params: Any, progress: Progress) -> Iterator[Row]:
        """Yield result rows of one seed (``params.seed``); each is a flat dict of the documented
        columns. :func:`.seeds.seeded_rows` repeats it for every seed."""
        ...

    def figures(self, table: pd.DataFrame, params: Any) -> dict[str, Figure]:
        """Figures by file stem, drawn from the finished table (every seed's rows): means with
        their 95% intervals as error bars."""
        ...

    def interpret(self, table: pd.DataFrame, params: Any) -> list[str]:
        """Two or three sentences that read the finished table (every seed's rows): computed from
        its numbers, quoting intervals, ranking two values only where their intervals do not
        overlap."""
        ...


MAX_INT = (1 << 63) - 1
"""Largest integer parameter: every integer parameter is a count, a size or a seed, held in an
int64 somewhere (numpy, numba)."""


def apply_overrides(params_type: type, overrides: dict[str, str]) -> Any:
    """Build ``params_type`` from its defaults and ``key=value`` strings, converting each value
    to the field's type, then :func:`validate` the result. Unknown keys, empty values (for
    anything but a string), unconvertible values and values out of range raise
    :class:`ConfigError` naming the parameter, before anything runs."""
    known = {f.name: f for f in fields(params_type)}
    defaults = params_type()
    values: dict[str, Any] = {}
    for key, text in overrides.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(key, f"unknown parameter (known: {', '.join(sorted(known))})")
        current = getattr(defaults, name)
        if not text.strip() and not isinstance(current, str):
            raise ConfigError(key, "empty value (give a value, or leave the parameter out)")
        try:
            values[name] = _convert(text, current)
        except ValueError as exc:
            raise ConfigError(key, f"cannot use {_short(text)}: {exc}") from None
    params = dataclasses.replace(defaults, **values)
    validate(params)
    return params


def validate(params: Any) -> None:
    """Check a parameters dataclass before anything runs: the generic rules (integers are
    0 .. 2**63-1, floats finite and >= 0, tuples hold at least one value), then the
    experiment's own ``validate()`` method, if it has one (choices, ranges, combinations)."""
    for f in fields(params):
        value = getattr(params, f.name)
        items = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value:
            raise ConfigError(f.name, "needs at least one value")
        for item in items:
            _check_value(f.name, item)
    check = getattr(params, "validate", None)
    if callable(check):
        check()


def _check_value(name: str, value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not 0 <= value <= MAX_INT:
        raise ConfigError(name, f"{_short(str(value))} is not in 0 .. 2**63-1")
    if isinstance(value, float) and not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(name, f"{value} is not a finite number >= 0")


def check_choices(name: str, values: Any, allowed: Iterable[str]) -> None:
    """Each of ``values`` (a string or a tuple of them) is one of ``allowed``."""
    allowed = tuple(allowed)
    for value in values if isinstance(values, tuple) else (values,):
        if value not in allowed:
            raise ConfigError(name, f"{_short(str(value))} is not one of {', '.join(allowed)}")


def check_range(name: str, values: Any, low: float, high: float | None = None) -> None:
    """Each of ``values`` (a number or a tuple of them) is in ``low .. high``."""
    for value in values if isinstance(values, tuple) else (values,):
        if value < low or (high is not None and value > high):
            bound = f"{low:g} .. {high:g}" if high is not None else f">= {low:g}"
            raise ConfigError(name, f"{value} is not in {bound}")


def check_trace_path(name: str, value: str, special: Iterable[str] = ()) -> None:
    """``value`` is one of ``special`` or names a trace that opens: it exists, is not a
    directory and, for a regular file, its format is recognized (a pipe is not read here)."""
    if value in tuple(special):
        return
    path = Path(value)
    if not path.exists():
        raise ConfigError(name, f"{_short(value)}: no such file")
    if path.is_dir():
        raise ConfigError(name, f"{_short(value)} is a directory, not a trace file")
    if path.is_file():
        from ..traces.info import detect_format

        try:
            detect_format(path)
        except EptlabError as exc:
            raise ConfigError(name, str(exc)) from None


def table_bytes(footprint: int, leaf: int = 4096, levels: int = 4) -> int:
    """Bytes of 4 KiB table pages that map ``footprint`` bytes with ``leaf``-sized pages in a
    ``levels``-level radix tree (one table per 512 entries at each level)."""
    skipped = {4096: 0, 2 << 20: 1, 1 << 30: 2}[leaf]  # a large leaf sits in a higher level
    total, span = 0, leaf * 512
    for _ in range(levels - skipped):
        total += -(-footprint // span)
        span *= 512
    return total * 4096


def available_memory() -> int | None:
    """Bytes this machine can still give a process (``MemAvailable``), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_table_memory(name: str, need: int, what: str) -> None:
    """Refuse up front a configuration whose page tables (``need`` bytes: each table page is a
    4 KiB row in this process) would take more than half of the memory still available."""
    have = available_memory()
    if have is not None and need > have // 2:
        raise ConfigError(
            name,
            f"{what} need about {need / (1 << 30):,.1f} GiB of page tables in this process; "
            f"{have / (1 << 30):,.1f} GiB is available (at most half is used)",
        )


def _short(text: str) -> str:
    """A value as quoted in a message: at most 40 characters."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _convert(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        return _int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if current and isinstance(current[0], int):
            return tuple(_int(t) for t in items)
        if current and isinstance(current[0], float):
            return tuple(float(t) for t in items)
        return tuple(items)
    return text


def _int(text: str) -> int:
    digits = text.strip().replace("_", "")
    if len(digits) > 40:
        raise ValueError("more than 64 bits")
    return int(digits, 0)


def params_dict(params: Any) -> dict[str, Any]:
    """JSON-friendly view of a parameters dataclass."""
    out = {}
    for f in fields(params):
        value = getattr(params, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def params_from_dict(params_type: type, values: dict[str, Any]) -> Any:
    """Inverse of :func:`params_dict` (lists back to tuples); unknown keys are a ConfigError."""
    known = {f.name for f in fields(params_type)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"not a parameter of {params_type.__name__}")
    return params_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class Result:
    """A finished run: the table and where its files went."""

    experiment: str
    params: dict[str, Any]
    table: pd.DataFrame
    files: list[str]


def ratio_text(numerator: float, denominator: float) -> str:
    """``"3.2x"`` (or ``"n/a"`` when the denominator is zero): for interpretations."""
    return f"{numerator / denominator:.1f}x" if denominator else "n/a"


def saved_text(before: float, after: float) -> str:
    """How much smaller ``after`` is than ``before``, as ``"42%"``."""
    return f"{(before - after) / before:.0%}" if before else "n/a"


def records_by(table: pd.DataFrame, *keys: str) -> dict[Any, SimpleNamespace]:
    """Rows of ``table`` by the value of column ``keys[0]`` (or by the tuple of the ``keys``
    columns' values), as objects with each column's value in its own type (ints stay ints),
    for writing interpretations."""
    records = table.to_dict("records")
    if len(keys) == 1:
        return {r[keys[0]]: SimpleNamespace(**r) for r in records}
    return {tuple(r[k] for k in keys): SimpleNamespace(**r) for r in records}
