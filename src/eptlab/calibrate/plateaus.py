"""Latency plateaus of a pointer-chase curve: one per level of the memory hierarchy.

Two ways, both automatic. :func:`plateaus_by_size` (used when sysfs gives the L1d, L2 and LLC
sizes): a level's latency is the median of the points well inside it, footprints from twice the
level below's size to half its own (L1: up to half the L1d), and DRAM the largest footprint.
:func:`plateaus` (the fallback, no sizes needed):
the curve (footprint -> cycles per load) is cut into ``levels`` contiguous segments that best
fit a step function in log(latency) (least squares, exact dynamic programme over the cut
points); each segment is a level. A level's latency is the median of its points, except the
last level's (DRAM): the point of the largest footprint, because a random chase over F bytes
still hits a cache of C bytes with probability about C / F, so the last segment keeps rising
towards the memory latency instead of settling (at 4 x LLC, 1/4 are LLC hits). Nothing about
cache sizes is assumed: the sizes from sysfs are only printed beside the cut points to compare.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

LEVELS = ("l1", "l2", "llc", "dram")


@dataclass(frozen=True)
class Plateau:
    level: str
    first: int  # index of the segment's first point in the curve
    last: int  # index of its last point (inclusive)
    indices: tuple[int, ...]  # the points whose median is the latency
    latency: float

    def footprints(self, sizes: Sequence[int]) -> tuple[int, int]:
        """First and last footprint of the segment, given the curve's footprints."""
        return sizes[self.first], sizes[self.last]


def _sse_table(y: Sequence[float]) -> list[list[float]]:
    """sse[i][j]: squared error of y[i..j] around its mean."""
    n = len(y)
    table = [[0.0] * n for _ in range(n)]
    for i in range(n):
        total = square = 0.0
        for j in range(i, n):
            total += y[j]
            square += y[j] * y[j]
            table[i][j] = max(square - total * total / (j - i + 1), 0.0)
    return table


def segments(y: Sequence[float], count: int) -> list[tuple[int, int]]:
    """The ``count`` contiguous segments (first, last) of ``y`` with the least total squared
    error around each segment's mean."""
    n = len(y)
    if not 1 <= count <= n:
        raise ConfigError("curve", f"{n} points cannot make {count} segments")
    sse = _sse_table(y)
    inf = math.inf
    # best[k][j]: least error of y[0..j] cut into k + 1 segments; cut[k][j]: start of the last
    best = [[inf] * n for _ in range(count)]
    cut = [[0] * n for _ in range(count)]
    for j in range(n):
        best[0][j] = sse[0][j]
    for k in range(1, count):
        for j in range(k, n):
            for start in range(k, j + 1):
                err = best[k - 1][start - 1] + sse[start][j]
                if err < best[k][j]:
                    best[k][j], cut[k][j] = err, start
    bounds, j = [], n - 1
    for k in range(count - 1, -1, -1):
        start = cut[k][j] if k else 0
        bounds.append((start, j))
        j = start - 1
    return bounds[::-1]


def plateaus(curve: Sequence[tuple[int, float]], levels: Sequence[str] = LEVELS) -> list[Plateau]:
    """One plateau per level over a curve of (footprint, cycles per load) points sorted by
    footprint (at least one point per level)."""
    if any(b[0] <= a[0] for a, b in zip(curve, curve[1:], strict=False)):
        raise ConfigError("curve", "footprints must increase")
    if any(c <= 0 for _, c in curve):
        raise ConfigError("curve", "latencies must be positive")
    logs = [math.log(c) for _, c in curve]
    out = []
    for level, (first, last) in zip(levels, segments(logs, len(levels)), strict=True):
        idx = (last,) if level == levels[-1] else tuple(range(first, last + 1))
        out.append(Plateau(level, first, last, idx,
                           float(statistics.median(curve[i][1] for i in idx))))
    return out


def plateaus_by_size(curve: Sequence[tuple[int, float]], l1: int, l2: int,
                     llc: int) -> list[Plateau] | None:
    """Levels from the cache sizes: L1 footprints <= l1 / 2, L2 in [2 l1, l2 / 2], LLC in
    [2 l2, llc / 2], DRAM the largest footprint (which must exceed llc). None when a level has
    no point there."""
    sizes = [f for f, _ in curve]
    bounds = {"l1": (0, l1 // 2), "l2": (2 * l1, l2 // 2), "llc": (2 * l2, llc // 2)}
    out = []
    for level, (lo, hi) in bounds.items():
        idx = tuple(i for i, f in enumerate(sizes) if lo <= f <= hi)
        if not idx:
            return None
        out.append(Plateau(level, idx[0], idx[-1], idx,
                           float(statistics.median(curve[i][1] for i in idx))))
    if not sizes or sizes[-1] <= llc:
        return None
    last = len(sizes) - 1
    out.append(Plateau("dram", last, last, (last,), curve[last][1]))
    return out
