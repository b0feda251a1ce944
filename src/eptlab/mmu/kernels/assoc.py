"""Set-associative structures with LRU replacement (TLBs, paging-structure caches, nested TLB).

All of them live in one array ``tlb[rows, max_ways, 4]`` (each way's TAGS, DATA, AUX, STAMPS
words side by side);
``desc[s] = (first row, sets, ways)`` says where structure ``s`` starts and its shape. A
structure with ``sets == 0`` is off. Per-vCPU structures give each vCPU ``sets`` consecutive
rows. Tags are ``key << 16 | context``; -1 is an empty way. (One array rather than four keeps
the kernels' calls cheap: numba reference-counts every array it passes around.)
"""

from __future__ import annotations

import numpy as np

from . import inline_kernel

TAGS, DATA, AUX, STAMPS = 0, 1, 2, 3
NPLANES = 4


@inline_kernel
def lookup(tlb, desc, struct, vcpu, key, ctx, clock):  # type: ignore[no-untyped-def]
    """Row * max_ways + way of the hit, or -1. Updates LRU on a hit."""
    sets = desc[struct, 1]
    if sets == 0:
        return -1
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    for way in range(desc[struct, 2]):
        if tlb[row, way, TAGS] == tag:
            clock[0] += 1
            tlb[row, way, STAMPS] = clock[0]
            return row * tlb.shape[1] + way
    return -1


@inline_kernel
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
        if tlb[row, way, TAGS] == tag:
            victim = way
            break
        if tlb[row, way, STAMPS] < oldest:
            oldest = tlb[row, way, STAMPS]
            victim = way
    clock[0] += 1
    tlb[row, victim, TAGS] = tag
    tlb[row, victim, DATA] = value
    tlb[row, victim, AUX] = extra
    tlb[row, victim, STAMPS] = clock[0]


@inline_kernel
def entry_word(tlb, plane, flat):  # type: ignore[no-untyped-def]
    """The ``plane`` word of the entry at flat index ``flat`` (as returned by lookup)."""
    width = tlb.shape[1]
    return tlb[flat // width, flat % width, plane]


@inline_kernel
def drop(tlb, flat):  # type: ignore[no-untyped-def]
    """Invalidate the entry at flat index ``flat``."""
    width = tlb.shape[1]
    tlb[flat // width, flat % width, TAGS] = -1
