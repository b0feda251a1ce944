"""Set-associative structures with LRU replacement (TLBs, paging-structure caches, nested TLB).

All of them live in one array ``tlb[4, rows, max_ways]`` (planes TAGS, DATA, AUX, STAMPS);
``desc[s] = (first row, sets, ways)`` says where structure ``s`` starts and its shape. A
structure with ``sets == 0`` is off. Per-vCPU structures give each vCPU ``sets`` consecutive
rows. Tags are ``key << 16 | context``; -1 is an empty way. (One array rather than four keeps
the kernels' calls cheap: numba reference-counts every array it passes around.)
"""

from __future__ import annotations

import numpy as np
from numba import njit

TAGS, DATA, AUX, STAMPS = 0, 1, 2, 3
NPLANES = 4


@njit(cache=True, _nrt=False, inline="always")
def lookup(tlb, desc, struct, vcpu, key, ctx, clock):  # type: ignore[no-untyped-def]
    """Row * max_ways + way of the hit, or -1. Updates LRU on a hit."""
    sets = desc[struct, 1]
    if sets == 0:
        return -1
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    for way in range(desc[struct, 2]):
        if tlb[TAGS, row, way] == tag:
            clock[0] += 1
            tlb[STAMPS, row, way] = clock[0]
            return row * tlb.shape[2] + way
    return -1


@njit(cache=True, _nrt=False, inline="always")
def insert(tlb, desc, struct, vcpu, key, ctx, value, extra, clock):  # type: ignore[no-untyped-def]
    """Install (key, ctx) -> (value, extra), replacing the same tag or the LRU way."""
    sets = desc[struct, 1]
    if sets == 0:
        return
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    victim = 0
    oldest = np.int64(0x7FFFFFFFFFFFFFFF)
    for way in range(desc[struct, 2]):
        if tlb[TAGS, row, way] == tag:
            victim = way
            break
        if tlb[STAMPS, row, way] < oldest:
            oldest = tlb[STAMPS, row, way]
            victim = way
    clock[0] += 1
    tlb[TAGS, row, victim] = tag
    tlb[DATA, row, victim] = value
    tlb[AUX, row, victim] = extra
    tlb[STAMPS, row, victim] = clock[0]


@njit(cache=True, _nrt=False, inline="always")
def entry_word(tlb, plane, flat):  # type: ignore[no-untyped-def]
    """The ``plane`` word of the entry at flat index ``flat`` (as returned by lookup)."""
    width = tlb.shape[2]
    return tlb[plane, flat // width, flat % width]


@njit(cache=True, _nrt=False, inline="always")
def drop(tlb, flat):  # type: ignore[no-untyped-def]
    """Invalidate the entry at flat index ``flat``."""
    width = tlb.shape[2]
    tlb[TAGS, flat // width, flat % width] = -1
