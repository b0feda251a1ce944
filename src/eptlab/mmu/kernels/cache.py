"""The physically indexed cache hierarchy: per-vCPU L1 and L2, a shared LLC, then DRAM.

``cache[rows, max_ways, 2]`` holds each way's line tag (-1 empty) and LRU stamp side by side;
``cdesc[level] = (first row, sets, ways, per_vcpu)``; a level with 0 sets is absent. Lines are
64 bytes, replacement is LRU, a line found at one level (or in DRAM) is filled into every level
above it (inclusive).
"""

from __future__ import annotations

from . import inline_kernel
from .layout import NCACHE

LINE_TAGS, LINE_STAMPS = 0, 1


@inline_kernel
def access_line(cache, cdesc, vcpu, hpa, clock):  # type: ignore[no-untyped-def]
    """Where the line of ``hpa`` was found: 0 L1, 1 L2, 2 LLC, 3 DRAM. One pass per level finds
    the line or, at the same time, the LRU way that will receive it."""
    line = hpa >> 6
    found = NCACHE
    r0 = -1
    r1 = -1
    r2 = -1
    v0 = 0
    v1 = 0
    v2 = 0
    for level in range(NCACHE):
        sets = cdesc[level, 1]
        if sets == 0:
            continue
        row = cdesc[level, 0] + (vcpu * sets if cdesc[level, 3] else 0) + (line & (sets - 1))
        victim = 0
        oldest = cache[row, 0, LINE_STAMPS]
        hit = -1
        for way in range(cdesc[level, 2]):
            if cache[row, way, LINE_TAGS] == line:
                hit = way
                break
            stamp = cache[row, way, LINE_STAMPS]
            if stamp < oldest:
                oldest = stamp
                victim = way
        clock[0] += 1
        if hit >= 0:
            cache[row, hit, LINE_STAMPS] = clock[0]
            found = level
            break
        if level == 0:
            r0, v0 = row, victim
        elif level == 1:
            r1, v1 = row, victim
        else:
            r2, v2 = row, victim
    # fill the levels that missed (their victims were chosen during the search)
    if r0 >= 0:
        cache[r0, v0, LINE_TAGS] = line
        cache[r0, v0, LINE_STAMPS] = clock[0]
    if r1 >= 0:
        cache[r1, v1, LINE_TAGS] = line
        cache[r1, v1, LINE_STAMPS] = clock[0]
    if r2 >= 0:
        cache[r2, v2, LINE_TAGS] = line
        cache[r2, v2, LINE_STAMPS] = clock[0]
    return found
