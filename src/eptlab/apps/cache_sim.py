"""One vCPU's view of the engine's cache hierarchy, driven one line at a time.

The hit/miss decisions are the engine's own: :func:`eptlab.mmu.kernels.cache.access_line` (L1
and L2 per vCPU, the shared LLC, 64-byte lines, LRU, inclusive fill without back-invalidation)
run on arrays shaped as :class:`eptlab.mmu.engine.Engine` shapes them, for one vCPU. Latencies
are the :class:`~eptlab.mmu.config.CacheConfig` ones (from the cost profile).

The kernel indexes the LLC by line bits only. A sliced LLC (:class:`SliceHash`) is modelled by
handing the kernel a relabelled line: the top ``log2(slices)`` bits of the LLC index are
replaced by the line's slice, so the kernel's set is ``slice * sets_per_slice + inner index``.
The relabelling leaves the L1 and L2 index bits alone and is a bijection on lines when the
hash restricted to the replaced bits is invertible (checked), so every hit and miss is the
sliced cache's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ..mmu.config import CacheConfig
from ..mmu.kernels.cache import access_lines
from .llc_slices import SliceHash

LINE_SHIFT = 6
_access_lines = cast(Callable[..., None], access_lines)  # a numba dispatcher


def _gf2_rank(rows: list[int]) -> int:
    rank = 0
    rows = list(rows)
    for bit in range(64):
        pivot = next((r for r in rows if r >> bit & 1), None)
        if pivot is None:
            continue
        rows.remove(pivot)
        rows = [r ^ pivot if r >> bit & 1 else r for r in rows]
        rank += 1
    return rank


class CacheSim:
    """L1, L2 and LLC of one vCPU, with the engine's geometry, replacement and latencies."""

    def __init__(self, config: CacheConfig | None = None, slices: str = "off") -> None:
        config = config or CacheConfig()
        levels = (config.l1, config.l2, config.llc)
        if any(level.sets == 0 for level in levels):
            raise ConfigError("cache", "the prime+probe model needs L1, L2 and LLC enabled")
        self.config = config
        self.slices = SliceHash.named(slices)
        self.cdesc = np.zeros((3, 4), np.int64)
        row, ways = 0, 1
        for i, level in enumerate(levels):
            self.cdesc[i] = (row, level.sets, level.ways, int(i < 2))
            row += level.sets
            ways = max(ways, level.ways)
        self.cache = np.full((row, ways), -1, np.int64)
        self.heads = np.zeros(row, np.int32)
        self.latency = (config.l1.latency, config.l2.latency, config.llc.latency,
                        config.dram_latency)
        self._latency_of = np.array([*self.latency, 0], np.int64)  # [-1]: no access
        index_bits = config.llc.sets.bit_length() - 1
        self.inner_bits = index_bits - self.slices.bits  # set-in-slice bits
        if self.inner_bits < config.l2.sets.bit_length() - 1:
            raise ConfigError("slice_hashes", f"{slices}: fewer sets per slice than L2 sets")
        self._shift = LINE_SHIFT + self.inner_bits  # lowest HPA bit the slice replaces
        replaced = [(m >> self._shift) & (self.slices.slices - 1) for m in self.slices.masks]
        if _gf2_rank(replaced) != self.slices.bits:
            raise ConfigError("slice_hashes", f"{slices} is not invertible on HPA bits "
                              f"{self._shift}.. for {config.llc.sets} LLC sets")

    def label(self, hpa: int) -> int:
        """The address the kernel is given for ``hpa``: slice bits in place of the top LLC
        index bits (``hpa`` itself with no slicing)."""
        if not self.slices.bits:
            return hpa
        top = (self.slices.slices - 1) << self._shift
        return (hpa & ~top) | (self.slices.of(hpa) << self._shift)

    def llc_set(self, hpa: int) -> int:
        """The LLC set of ``hpa``: ``slice * sets_per_slice + inner index``."""
        return (self.label(hpa) >> LINE_SHIFT) & (self.config.llc.sets - 1)

    def level(self, label: int) -> int:
        """Access a :meth:`label`-ed line; returns where it was found (0 L1 .. 3 DRAM)."""
        return int(self.levels(np.array([label], np.int64))[0])

    def levels(self, labels: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Access each :meth:`label`-ed line of ``labels`` in order (a negative label: no
        access); where each was found (0 L1 .. 3 DRAM; -1 for no access)."""
        found = np.empty(len(labels), np.int64)
        _access_lines(self.cache, self.cdesc, 0, labels, self.heads, found)
        return found

    def latencies(self, labels: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """:meth:`levels`, as latencies in cycles (0 for no access)."""
        return self._latency_of[self.levels(labels)]
