"""Means and 95% intervals over seeds, and how readings and figures quote them.

A run repeats every configuration with ``seeds`` seeds; :func:`summarize` turns its rows into
one row per configuration with, for every measured column ``c``, the mean over the seeds (column
``c``) and the bounds of its 95% confidence interval (``c_lo``, ``c_hi``): Student's t with
n - 1 degrees of freedom, ``mean +- t(0.975, n-1) * s / sqrt(n)`` (``s`` the sample standard
deviation). With one seed there is no interval: the bounds are the mean and ``n`` says 1.

Readings compare with the overlap rule (:func:`compare`): two values whose intervals overlap are
reported as "no difference within the interval", never ranked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib.axes import Axes
from scipy import stats

LEVEL = 0.95
SEED = "seed"
"""The column the seeds driver adds to every row."""
COUNT = "n"
"""The summary's column of seeds per configuration."""
LOW, HIGH = "_lo", "_hi"
"""Suffixes of a measured column's interval bounds in a summary."""
OVERLAP = "no difference within the interval"


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` seeds and its 95% interval ``[lo, hi]`` (``lo == hi`` when ``n == 1``,
    or when every seed gave the same value)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    @property
    def exact(self) -> bool:
        """Every seed gave the same value (or there was one seed): no spread."""
        return self.lo == self.hi

    def overlaps(self, other: Interval) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (``factor`` > 0: 100 for a percentage)."""
        low, high = sorted((self.lo * factor, self.hi * factor))
        return Interval(self.mean * factor, low, high, self.n)

    def within(self, low: float, high: float) -> Interval:
        """The interval cut to the possible values ``[low, high]`` (a rate: 0 and 1); the
        mean, inside them already, stays."""
        return Interval(self.mean, max(self.lo, low), min(self.hi, high), self.n)

    def text(self, fmt: str = "{:,.1f}", unit: str = "") -> str:
        """``"3.6x [3.4, 3.8]"``; just ``"12"`` when every seed agreed, or with one seed (a
        reading says once that one seed has no interval: :func:`one_seed_note`)."""
        if self.exact:
            return f"{fmt.format(self.mean)}{unit}"
        return interval_text(self.lo, self.mean, self.hi, fmt, unit)


@functools.lru_cache(maxsize=256)
def _t_quantile(level: float, freedom: int) -> float:
    """Student's t quantile of a two-sided ``level`` interval (scipy's takes ~0.1 ms, and a
    summary asks for the same few thousands of times)."""
    return float(stats.t.ppf(0.5 + level / 2, freedom))


def interval(values: Iterable[Any], level: float = LEVEL, *, clip: bool = True) -> Interval:
    """Mean and Student-t interval of ``values`` (NaN and None left out). With ``clip``, when
    no value is negative (counts, times, rates) the interval's lower bound stops at 0: the mean
    cannot be negative, and cutting the interval to the possible means keeps its coverage."""
    if isinstance(values, pd.Series) and pd.api.types.is_numeric_dtype(values):
        x = values.to_numpy(float)  # the common case (a summary's column): no conversion
    else:
        x = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if np.all(x == x[0]):  # no spread: keep the value exact (a mean can round)
        value = float(x[0])
        return Interval(value, value, value, n)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1)
    half = _t_quantile(level, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    low = max(mean - half, 0.0) if clip and x.min() >= 0 else mean - half
    return Interval(mean, low, mean + half, n)


def one_seed_note(table: pd.DataFrame) -> list[str]:
    """The sentence a reading of a one-seed table ends with (none for several seeds)."""
    if seeds_of(table) != 1:
        return []
    return ["One seed was run: the numbers above are single values with no interval (run "
            "with seeds >= 2 for intervals)."]


def interval_text(lo: float, mean: float, hi: float, fmt: str = "{:,.1f}", unit: str = "") -> str:
    """``interval_text(3.4, 3.6, 3.8, "{:.1f}", "x") == "3.6x [3.4, 3.8]"``; a unit that is a
    word (``" cycles"``) follows the bracket: ``"517 [418, 620] cycles"``."""
    bounds = f"[{fmt.format(lo)}, {fmt.format(hi)}]"
    if unit.startswith(" "):
        return f"{fmt.format(mean)} {bounds}{unit}"
    return f"{fmt.format(mean)}{unit} {bounds}"


Relation = Literal["higher", "lower", "overlap"]


def relation(a: Interval, b: Interval) -> Relation:
    """``"overlap"`` when the intervals overlap (no ranking), else which side ``a`` is on."""
    if a.overlaps(b):
        return "overlap"
    return "higher" if a.mean > b.mean else "lower"


def verdict(a: Interval, b: Interval, higher: str = "higher", lower: str = "lower") -> str:
    """``higher`` or ``lower`` (``a`` against ``b``) where the intervals do not overlap, else
    ``"no difference within the interval"``."""
    how = relation(a, b)
    return OVERLAP if how == "overlap" else higher if how == "higher" else lower


def compare(
    a: Interval,
    b: Interval,
    names: tuple[str, str] = ("", ""),
    fmt: str = "{:,.1f}",
    unit: str = "",
    words: tuple[str, str] = ("higher than", "lower than"),
) -> str:
    """One clause comparing ``a`` and ``b`` with the overlap rule, e.g. ``"pml 2.1 [1.9, 2.3]
    is lower than trap-code 5.0 [4.6, 5.4]"`` or ``"pml 2.1 [1.9, 2.3] and trap-code 2.2 [2.0,
    2.5]: no difference within the interval"``."""
    left = " ".join(filter(None, (names[0], a.text(fmt, unit))))
    right = " ".join(filter(None, (names[1], b.text(fmt, unit))))
    how = relation(a, b)
    if how == "overlap":
        return f"{left} and {right}: {OVERLAP}"
    return f"{left} is {words[0] if how == 'higher' else words[1]} {right}"


def times(iv: Interval, words: str = "as much") -> str:
    """A ratio's interval in words: ``"3.6x [3.4, 3.8] as much"``; when the interval holds 1,
    ``"1.0x [0.9, 1.1]: no difference within the interval"`` instead of a ranking."""
    if iv.lo <= 1.0 <= iv.hi and not iv.exact:
        return f"{iv.text(unit='x')}: {OVERLAP}"
    return f"{iv.text(unit='x')} {words}"


def change(
    name: str, before: Interval, after: Interval, fmt: str = "{:,.1f}", unit: str = ""
) -> str:
    """``"NAME from A to B"`` where the intervals do not overlap, else ``"NAME A and B (no
    difference within the interval)"``: a change is claimed only beyond the intervals."""
    if relation(after, before) == "overlap":
        return f"{name} {before.text(fmt, unit)} and {after.text(fmt, unit)} ({OVERLAP})"
    return f"{name} from {before.text(fmt, unit)} to {after.text(fmt, unit)}"


# -- tables ---------------------------------------------------------------------------------


def measured_columns(table: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The numeric columns that are neither keys nor the seed (booleans are not measured)."""
    return [
        c
        for c in table.columns
        if c not in keys
        and c != SEED
        and pd.api.types.is_numeric_dtype(table[c])
        and not pd.api.types.is_bool_dtype(table[c])
    ]


def summarize(table: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per configuration (the ``keys`` columns' values, in first-seen order): ``n`` (the
    seeds), then for every measured column its mean (same name) and interval bounds (``_lo``,
    ``_hi``). Other columns (text, flags) keep their value when every seed agrees, else their
    distinct values joined by ``" | "``; such a column is then text throughout (so that it
    stores as one type)."""
    keys = [k for k in keys if k in table.columns]
    measured = measured_columns(table, keys)
    other = [c for c in table.columns if c not in keys and c not in measured and c != SEED]
    rows: list[dict[str, Any]] = []
    groups = table.groupby(keys, sort=False, dropna=False) if keys else [((), table)]
    for values, group in groups:
        key_values = values if isinstance(values, tuple) else (values,)
        row: dict[str, Any] = dict(zip(keys, key_values, strict=True))
        row[COUNT] = len(group)
        for column in measured:
            iv = interval(group[column])
            row[column], row[column + LOW], row[column + HIGH] = iv.mean, iv.lo, iv.hi
        for column in other:
            distinct = list(dict.fromkeys(group[column].tolist()))
            row[column] = distinct[0] if len(distinct) == 1 else " | ".join(map(str, distinct))
        rows.append(row)
    columns = keys + [COUNT] + [
        c for m in measured for c in (m, m + LOW, m + HIGH)
    ] + other
    summary = pd.DataFrame(rows, columns=columns)
    for column in other:  # seeds disagreed somewhere: the whole column as text
        if any(isinstance(v, str) for v in summary[column]) and not all(
            isinstance(v, str) for v in summary[column]
        ):
            summary[column] = summary[column].map(str)
    return summary


def at(summary_row: Any, column: str) -> Interval:
    """The interval of ``column`` in one summary row (a Series, a namedtuple or a namespace)."""

    def get(name: str) -> Any:
        return summary_row[name] if isinstance(summary_row, pd.Series) else getattr(
            summary_row, name
        )

    n = int(get(COUNT))
    return Interval(float(get(column)), float(get(column + LOW)), float(get(column + HIGH)), n)


def column(summary: pd.DataFrame, name: str) -> list[Interval]:
    """The interval of column ``name`` in every summary row, in order."""
    return [at(row, name) for _, row in summary.iterrows()]


def pick(summary: pd.DataFrame, column: str, **where: Any) -> Interval:
    """The interval of ``column`` in the one summary row matching ``where`` (``key=value``);
    NaN with ``n == 0`` when no row matches."""
    mask = np.ones(len(summary), dtype=bool)
    for key, value in where.items():
        mask &= (summary[key] == value).to_numpy()
    rows = summary[mask]
    if not len(rows):
        return Interval(math.nan, math.nan, math.nan, 0)
    return at(rows.iloc[0], column)


def by_seed(table: pd.DataFrame, **where: Any) -> pd.DataFrame:
    """The rows matching ``where`` (``key=value``), indexed by seed: for per-seed derived values
    (ratios, sums) whose interval is then taken with :func:`interval`."""
    mask = np.ones(len(table), dtype=bool)
    for key, value in where.items():
        mask &= (table[key] == value).to_numpy()
    rows = table[mask]
    if SEED in rows.columns:
        return rows.set_index(SEED)
    return rows.assign(**{SEED: 0}).set_index(SEED)


def seeds_of(table: pd.DataFrame) -> int:
    """How many distinct seeds ``table`` holds (1 without a seed column)."""
    return int(table[SEED].nunique()) if SEED in table.columns else 1


def text_table(summary: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """The summary for reading: each measured column as ``"mean [lo, hi]"`` (just the mean when
    every seed agreed), bounds columns dropped."""
    measured = [c for c in summary.columns if c + LOW in summary.columns]
    out = summary.drop(columns=[c + s for c in measured for s in (LOW, HIGH)])
    for column in measured:
        out[column] = [
            _cell(m, lo, hi, digits)
            for m, lo, hi in zip(summary[column], summary[column + LOW], summary[column + HIGH],
                                 strict=True)
        ]
    return out


def _cell(mean: float, lo: float, hi: float, digits: int) -> str:
    if mean != mean:  # NaN
        return ""

    def number(value: float) -> str:
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"

    return number(mean) if lo == hi else f"{number(mean)} [{number(lo)}, {number(hi)}]"


# -- figures --------------------------------------------------------------------------------


def yerr(intervals: Sequence[Interval]) -> npt.NDArray[np.float64]:
    """Matplotlib's ``yerr`` (2 x n: below, above the mean) for ``intervals``; 0 where none."""
    below = [iv.mean - iv.lo for iv in intervals]
    above = [iv.hi - iv.mean for iv in intervals]
    out: npt.NDArray[np.float64] = np.nan_to_num(np.array([below, above], dtype=np.float64))
    return out


def bars(
    ax: Axes, x: npt.ArrayLike, intervals: Sequence[Interval], width: float = 0.8, **kwargs: Any
) -> None:
    """Bars at ``x`` of the means with their 95% intervals as error bars."""
    means = np.array([iv.mean for iv in intervals], dtype=float)
    ax.bar(x, np.nan_to_num(means), width, yerr=yerr(intervals), capsize=2,
           error_kw={"elinewidth": 0.8, "ecolor": "black"}, **kwargs)


def ratio(numerator: pd.Series, denominator: pd.Series) -> Interval:
    """The interval of ``numerator / denominator`` taken seed by seed (Series indexed by seed,
    as :func:`by_seed` gives them); seeds with a zero denominator are left out."""
    num, den = numerator.astype(float), denominator.astype(float)
    return interval((num / den.where(den != 0)).to_numpy())


def reduction(before: pd.Series, after: pd.Series) -> Interval:
    """The interval of ``(before - after) / before`` seed by seed (a fraction: 0.42 is 42%)."""
    b, a = before.astype(float), after.astype(float)
    return interval(((b - a) / b.where(b != 0)).to_numpy())
