"""Replacement order of the kernels' set-associative structures, on fixed revealing sequences
and long seeded streams, against an independent LRU model (an ordered dict per set: a hit
moves the entry to the end, a miss evicts the front). Unlike the hypothesis tests in
test_lru_rings.py, nothing here depends on a random draw finding the revealing case."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from eptlab.mmu.kernels.assoc import AUX, DATA, NPLANES, TAGS

from .lru_kernels import LEVELS, VCPUS, access_line, cache_arrays, entry_word, insert, lookup


class OrderedCaches:
    """Inclusive L1/L2/LLC, each set an OrderedDict from least to most recently used."""

    def __init__(self) -> None:
        self.sets: dict[tuple[int, int, int], OrderedDict[int, None]] = {}

    def access(self, vcpu: int, line: int) -> int:
        missed: list[tuple[OrderedDict[int, None], int]] = []
        for level, (sets, ways, per_vcpu) in enumerate(LEVELS):
            s = self.sets.setdefault((level, vcpu if per_vcpu else 0, line % sets), OrderedDict())
            if line in s:
                s.move_to_end(line)
                found = level
                break
            missed.append((s, ways))
        else:
            found = 3
        for s, ways in missed:
            if len(s) == ways:
                s.popitem(last=False)
            s[line] = None
        return found


def test_cache_hit_makes_the_line_most_recent() -> None:
    """L1 set 0 of vCPU 0 holds 3 lines (even line numbers). Fill 0, 2, 4; hit 0; a fourth
    line must evict 2 (the LRU one), not 0: the hit refreshed 0."""
    cache, cdesc, heads = cache_arrays()
    for line in (0, 2, 4):
        assert access_line(cache, cdesc, 0, line << 6, heads) == 3  # cold: from DRAM
    assert access_line(cache, cdesc, 0, 0 << 6, heads) == 0  # L1 hit
    access_line(cache, cdesc, 0, 6 << 6, heads)
    assert access_line(cache, cdesc, 0, 0 << 6, heads) == 0  # still in L1
    assert access_line(cache, cdesc, 0, 2 << 6, heads) != 0  # evicted from L1


@pytest.mark.parametrize("seed", range(4))
def test_cache_matches_ordered_model_on_seeded_streams(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cache, cdesc, heads = cache_arrays()
    model = OrderedCaches()
    # few distinct lines, so that hits (and thus recency updates) are frequent
    for vcpu, line in zip(rng.integers(0, VCPUS, 600), rng.integers(0, 24, 600), strict=True):
        assert access_line(cache, cdesc, int(vcpu), int(line) << 6, heads) == model.access(
            int(vcpu), int(line)
        )


SETS, WAYS = 2, 3


def tlb_arrays() -> tuple[np.ndarray, np.ndarray]:
    desc = np.array([[0, SETS, WAYS]], np.int64)
    tlb = np.zeros((SETS, NPLANES, WAYS), np.int64)
    tlb[:, TAGS, :] = -1
    return tlb, desc


def test_tlb_reinsert_makes_the_entry_most_recent() -> None:
    """Set 0 holds 3 entries (even keys). Insert 0, 2, 4; insert 0 again (new value); a
    fourth key must evict 2, not 0, and 0 must carry the new value."""
    tlb, desc = tlb_arrays()
    for key in (0, 2, 4):
        insert(tlb, desc, 0, 0, key, 0, 100 + key, 0)
    insert(tlb, desc, 0, 0, 0, 0, 999, 7)
    insert(tlb, desc, 0, 0, 6, 0, 106, 0)
    row = lookup(tlb, desc, 0, 0, 0, 0)
    assert row >= 0
    assert entry_word(tlb, DATA, row) == 999 and entry_word(tlb, AUX, row) == 7
    assert lookup(tlb, desc, 0, 0, 2, 0) == -1
    assert lookup(tlb, desc, 0, 0, 4, 0) >= 0


def test_tlb_lookup_makes_the_entry_most_recent() -> None:
    tlb, desc = tlb_arrays()
    for key in (0, 2, 4):
        insert(tlb, desc, 0, 0, key, 1, key, 0)
    assert lookup(tlb, desc, 0, 0, 0, 1) >= 0
    insert(tlb, desc, 0, 0, 6, 1, 6, 0)
    assert lookup(tlb, desc, 0, 0, 0, 1) >= 0
    assert lookup(tlb, desc, 0, 0, 2, 1) == -1


@pytest.mark.parametrize("seed", range(4))
def test_tlb_matches_ordered_model_on_seeded_streams(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    tlb, desc = tlb_arrays()
    model: dict[int, OrderedDict[int, int]] = {s: OrderedDict() for s in range(SETS)}
    for n in range(500):
        key, ctx, op = int(rng.integers(0, 8)), int(rng.integers(0, 2)), int(rng.integers(0, 2))
        tag = (key << 16) | ctx
        s = model[key & (SETS - 1)]
        if op == 0:  # insert
            insert(tlb, desc, 0, 0, key, ctx, n, 0)
            if tag not in s and len(s) == WAYS:
                s.popitem(last=False)
            s[tag] = n
            s.move_to_end(tag)
        else:
            row = lookup(tlb, desc, 0, 0, key, ctx)
            assert (row >= 0) == (tag in s), n
            if tag in s:
                s.move_to_end(tag)
                assert entry_word(tlb, DATA, row) == s[tag]
