"""Set-associative structures with LRU replacement (TLBs, paging-structure caches, nested TLB).

All of them live in one array ``tlb[rows, NPLANES, max_ways]``: each row (a set) holds its ways'
TAGS, then their DATA words, then their AUX words, each plane contiguous, the ways in recency
order (most recently used first); ``desc[s] = (first row, sets, ways)`` says where structure
``s`` starts and its shape. A structure with ``sets == 0`` is off. Per-vCPU structures give
each vCPU ``sets`` consecutive rows. Tags are ``key << 16 | context``; -1 is an invalid way.

Recency order is exact LRU without stamps: a hit or an insert puts the entry in front, an insert
of a new tag drops the last way (never-filled ways collect at the back), and an invalidated way
keeps its place (it is reused when it becomes the oldest, as a stamped way would be). A search
reads one contiguous row of tags. (One array rather than three keeps the kernels' calls cheap:
numba reference-counts every array it passes around.)
"""

from __future__ import annotations

from . import inline_kernel

TAGS, DATA, AUX = 0, 1, 2
NPLANES = 3


@inline_kernel
def _put_front(tlb, row, way, tag, value, extra):  # type: ignore[no-untyped-def]
    """Ways ``0..way-1`` move back by one (way ``way`` is overwritten), then (tag, value, extra)
    becomes way 0."""
    for k in range(way, 0, -1):
        tlb[row, TAGS, k] = tlb[row, TAGS, k - 1]
        tlb[row, DATA, k] = tlb[row, DATA, k - 1]
        tlb[row, AUX, k] = tlb[row, AUX, k - 1]
    tlb[row, TAGS, 0] = tag
    tlb[row, DATA, 0] = value
    tlb[row, AUX, 0] = extra


@inline_kernel
def lookup(tlb, desc, struct, vcpu, key, ctx):  # type: ignore[no-untyped-def]
    """Row * max_ways + way of the hit, or -1. A hit becomes the most recently used way (way
    0)."""
    sets = desc[struct, 1]
    if sets == 0:
        return -1
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    for way in range(desc[struct, 2]):
        if tlb[row, TAGS, way] == tag:
            if way > 0:
                _put_front(tlb, row, way, tag, tlb[row, DATA, way], tlb[row, AUX, way])
            return row * tlb.shape[2]
    return -1


@inline_kernel
def insert(tlb, desc, struct, vcpu, key, ctx, value, extra):  # type: ignore[no-untyped-def]
    """Install (key, ctx) -> (value, extra) in front, replacing the same tag or the LRU way."""
    sets = desc[struct, 1]
    if sets == 0:
        return
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    ways = desc[struct, 2]
    victim = ways - 1
    for way in range(ways):
        if tlb[row, TAGS, way] == tag:
            victim = way
            break
    _put_front(tlb, row, victim, tag, value, extra)


@inline_kernel
def entry_word(tlb, plane, flat):  # type: ignore[no-untyped-def]
    """The ``plane`` word of the entry at flat index ``flat`` (as returned by lookup)."""
    width = tlb.shape[2]
    return tlb[flat // width, plane, flat % width]


@inline_kernel
def drop(tlb, flat):  # type: ignore[no-untyped-def]
    """Invalidate the entry at flat index ``flat`` (it keeps its place in the recency order)."""
    width = tlb.shape[2]
    tlb[flat // width, TAGS, flat % width] = -1
