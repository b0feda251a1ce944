"""Set-associative structures with LRU replacement (TLBs, paging-structure caches, nested TLB).

All of them live in one array ``tlb[rows, NPLANES, max_ways]``: each row (a set) holds its ways'
TAGS, then their DATA words, then their AUX words, each plane contiguous, and ``tlb[row, HEAD,
0]``, the way of the most recently used entry; ``desc[s] = (first row, sets, ways)`` says where
structure ``s`` starts and its shape. A structure with ``sets == 0`` is off. Per-vCPU
structures give each vCPU ``sets`` consecutive rows. Tags are ``key << 16 | context``; -1 is an
invalid way.

A row is a ring in recency order (as the data-cache model's rows, :mod:`cache`): from the head
on, wrapping around, the ways hold less and less recently used entries, so the way before the
head is the LRU one. That is exact LRU without stamps: a hit or an insert makes the entry the
head (the entries more recent than it move one way on), an insert of a new tag takes the way
before the head (never-filled ways are the oldest), and an invalidated way keeps its place (it
is reused when it becomes the oldest, as a stamped way would be). A search reads one contiguous
row of tags. (One array rather than several keeps the kernels' calls cheap: numba
reference-counts every array it passes around.)
"""

from __future__ import annotations

from . import inline_kernel

TAGS, DATA, AUX, HEAD = 0, 1, 2, 3
NPLANES = 4


@inline_kernel
def _make_head(tlb, row, ways, way, tag, value, extra):  # type: ignore[no-untyped-def]
    """Entry ``way`` (its old content is dropped) becomes the head and holds (tag, value,
    extra); the entries from the head up to it move one way on."""
    head = tlb[row, HEAD, 0]
    while way != head:
        before = way - 1 if way > 0 else ways - 1
        tlb[row, TAGS, way] = tlb[row, TAGS, before]
        tlb[row, DATA, way] = tlb[row, DATA, before]
        tlb[row, AUX, way] = tlb[row, AUX, before]
        way = before
    tlb[row, TAGS, head] = tag
    tlb[row, DATA, head] = value
    tlb[row, AUX, head] = extra


@inline_kernel
def lookup(tlb, desc, struct, vcpu, key, ctx):  # type: ignore[no-untyped-def]
    """Row of the hit, or -1. A hit becomes the most recently used entry: the row's head, where
    :func:`entry_word` and :func:`drop` find it."""
    sets = desc[struct, 1]
    if sets == 0:
        return -1
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    ways = desc[struct, 2]
    for way in range(ways):
        if tlb[row, TAGS, way] == tag:
            head = tlb[row, HEAD, 0]
            if way != head:
                _make_head(tlb, row, ways, way, tag, tlb[row, DATA, way], tlb[row, AUX, way])
            return row
    return -1


@inline_kernel
def insert(tlb, desc, struct, vcpu, key, ctx, value, extra):  # type: ignore[no-untyped-def]
    """Install (key, ctx) -> (value, extra) as the most recent entry, replacing the same tag or
    the LRU way."""
    sets = desc[struct, 1]
    if sets == 0:
        return
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    tag = (key << 16) | ctx
    ways = desc[struct, 2]
    for way in range(ways):
        if tlb[row, TAGS, way] == tag:
            _make_head(tlb, row, ways, way, tag, value, extra)
            return
    _replace_lru(tlb, row, ways, tag, value, extra)


@inline_kernel
def insert_missed(tlb, desc, struct, vcpu, key, ctx, value, extra):  # type: ignore[no-untyped-def]
    """:func:`insert` of a (key, ctx) known not to be in the structure (a lookup of it missed
    since the last change of the row, or the structure holds nothing for this vCPU): the tag
    search is skipped and the LRU way replaced."""
    sets = desc[struct, 1]
    if sets == 0:
        return
    row = desc[struct, 0] + vcpu * sets + (key & (sets - 1))
    _replace_lru(tlb, row, desc[struct, 2], (key << 16) | ctx, value, extra)


@inline_kernel
def _replace_lru(tlb, row, ways, tag, value, extra):  # type: ignore[no-untyped-def]
    """The LRU way (the one before the head) receives the entry and becomes the head."""
    head = tlb[row, HEAD, 0] - 1
    if head < 0:
        head = ways - 1
    tlb[row, TAGS, head] = tag
    tlb[row, DATA, head] = value
    tlb[row, AUX, head] = extra
    tlb[row, HEAD, 0] = head


@inline_kernel
def entry_word(tlb, plane, row):  # type: ignore[no-untyped-def]
    """The ``plane`` word of the entry that the last hit in ``row`` (from lookup) found."""
    return tlb[row, plane, tlb[row, HEAD, 0]]


@inline_kernel
def drop(tlb, row):  # type: ignore[no-untyped-def]
    """Invalidate the entry that the last hit in ``row`` found (it keeps its place in the
    recency order)."""
    tlb[row, TAGS, tlb[row, HEAD, 0]] = -1
