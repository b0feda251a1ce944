"""Set-associative structures with LRU replacement (TLBs, paging-structure caches, nested TLB).

All of them live in four shared 2-D arrays (tags, data, aux, stamps; rows x max ways); ``desc``
says where each structure's rows start and its shape. A structure with ``sets == 0`` is off.
Per-vCPU structures give each vCPU ``sets`` consecutive rows. Tags are ``key << 16 | context``;
-1 is an empty way.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def lookup(tags, stamps, desc, struct, vcpu, key, ctx, clock):  # type: ignore[no-untyped-def]
    """Flat index (row * max_ways + way) of the hit, or -1. Updates LRU on a hit."""
    sets = desc[struct, 1]
    if sets == 0:
        return -1
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    for way in range(desc[struct, 2]):
        if tags[row, way] == tag:
            clock[0] += 1
            stamps[row, way] = clock[0]
            return row * tags.shape[1] + way
    return -1


@njit(cache=True)
def insert(tags, data, aux, stamps, desc, struct, vcpu, key, ctx, value, extra, clock):  # type: ignore[no-untyped-def]
    """Install (key, ctx) -> (value, extra), replacing the same tag or the LRU way."""
    sets = desc[struct, 1]
    if sets == 0:
        return
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    victim = 0
    oldest = np.int64(0x7FFFFFFFFFFFFFFF)
    for way in range(desc[struct, 2]):
        if tags[row, way] == tag:
            victim = way
            break
        if stamps[row, way] < oldest:
            oldest = stamps[row, way]
            victim = way
    clock[0] += 1
    tags[row, victim] = tag
    data[row, victim] = value
    aux[row, victim] = extra
    stamps[row, victim] = clock[0]


@njit(cache=True)
def drop(tags, flat):  # type: ignore[no-untyped-def]
    """Invalidate the entry at flat index ``flat``."""
    width = tags.shape[1]
    tags[flat // width, flat % width] = -1
