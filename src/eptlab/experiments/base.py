"""What an experiment is: a question, a parameters dataclass, and a run that yields result rows
one at a time (so they can be written as they come), plus figures drawn from the table."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Any, ClassVar, Protocol

import pandas as pd
from matplotlib.figure import Figure

from ..errors import ConfigError

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


def apply_overrides(params_type: type, overrides: dict[str, str]) -> Any:
    """Build ``params_type`` from its defaults and ``key=value`` strings, converting each value
    to the field's type. Unknown keys and unconvertible values raise :class:`ConfigError`."""
    known = {f.name: f for f in fields(params_type)}
    defaults = params_type()
    values: dict[str, Any] = {}
    for key, text in overrides.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(key, f"unknown parameter (known: {', '.join(sorted(known))})")
        current = getattr(defaults, name)
        try:
            values[name] = _convert(text, current)
        except ValueError as exc:
            raise ConfigError(key, f"cannot use {text!r}: {exc}") from None
    return dataclasses.replace(defaults, **values)


def _convert(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        return int(text.replace("_", ""), 0)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if current and isinstance(current[0], int):
            return tuple(int(t, 0) for t in items)
        if current and isinstance(current[0], float):
            return tuple(float(t) for t in items)
        return tuple(items)
    return text


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
