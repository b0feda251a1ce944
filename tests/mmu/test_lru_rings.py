"""The kernels' set-associative structures keep each set as a ring in recency order instead of
LRU stamps. These tests drive the kernels directly with random operations and compare them, step
by step, with plain LRU models written the obvious way: stamps and "evict the oldest" (the
previous representation), so any difference in what is kept or evicted shows up."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.mmu.kernels.assoc import DATA, NPLANES, TAGS

from .lru_kernels import (
    LEVELS,
    VCPUS,
    access_line,
    cache_arrays,
    drop,
    entry_word,
    insert,
    lookup,
)

# -- data caches ---------------------------------------------------------------------------------


class StampedCaches:
    """Inclusive-fill L1/L2/LLC with per-line LRU stamps."""

    def __init__(self) -> None:
        self.sets: dict[tuple[int, int, int], dict[int, int]] = {}  # (level, vcpu, set) -> stamps
        self.clock = 0

    def access(self, vcpu: int, line: int) -> int:
        missed = []
        found = 3
        for level, (sets, _ways, per_vcpu) in enumerate(LEVELS):
            lines = self.sets.setdefault((level, vcpu if per_vcpu else 0, line % sets), {})
            self.clock += 1
            if line in lines:
                lines[line] = self.clock
                found = level
                break
            missed.append(lines)
        for lines, (_, ways, _) in zip(missed, LEVELS, strict=False):
            if len(lines) == ways:
                del lines[min(lines, key=lines.__getitem__)]
            lines[line] = self.clock
        return found


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, VCPUS - 1), st.integers(0, 40)), max_size=300))
def test_cache_rings_are_lru(accesses: list[tuple[int, int]]) -> None:
    cache, cdesc, heads = cache_arrays()
    model = StampedCaches()
    for vcpu, line in accesses:
        assert access_line(cache, cdesc, vcpu, line << 6, heads) == model.access(vcpu, line)


# -- TLBs and paging-structure caches --------------------------------------------------------------

SETS, WAYS = 2, 3


class StampedTlb:
    """One structure of SETS x WAYS entries, one vCPU: first matching tag hits, a new tag
    replaces the first way with the oldest stamp, an invalidated way keeps its stamp."""

    def __init__(self) -> None:
        self.rows = [[[-1, 0, 0] for _ in range(WAYS)] for _ in range(SETS)]  # tag, data, stamp
        self.clock = 0

    def _row(self, key: int) -> list[list[int]]:
        return self.rows[key & (SETS - 1)]

    def lookup(self, key: int, ctx: int) -> list[int] | None:
        for way in self._row(key):
            if way[0] == (key << 16) | ctx:
                self.clock += 1
                way[2] = self.clock
                return way
        return None

    def insert(self, key: int, ctx: int, value: int) -> None:
        ways = self._row(key)
        tag = (key << 16) | ctx
        same = [w for w in ways if w[0] == tag]
        victim = same[0] if same else min(ways, key=lambda w: w[2])  # first oldest
        self.clock += 1
        victim[:] = [tag, value, self.clock]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["lookup", "insert", "drop"]), st.integers(0, 7), st.integers(0, 1)
        ),
        max_size=200,
    )
)
def test_tlb_rings_are_lru(ops: list[tuple[str, int, int]]) -> None:
    desc = np.array([[0, SETS, WAYS]], np.int64)
    tlb = np.zeros((SETS, NPLANES, WAYS), np.int64)
    tlb[:, TAGS, :] = -1
    model = StampedTlb()
    for n, (op, key, ctx) in enumerate(ops):
        if op == "insert":
            insert(tlb, desc, 0, 0, key, ctx, 1000 + n, 0)
            model.insert(key, ctx, 1000 + n)
            continue
        row = lookup(tlb, desc, 0, 0, key, ctx)
        way = model.lookup(key, ctx)
        assert (row >= 0) == (way is not None)
        if way is None:
            continue
        assert entry_word(tlb, DATA, row) == way[1]
        if op == "drop":
            drop(tlb, row)
            way[0] = -1
