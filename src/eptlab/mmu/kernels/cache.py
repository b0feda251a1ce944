"""The physically indexed cache hierarchy: per-vCPU L1 and L2, a shared LLC, then DRAM.

``cache[2, rows, max_ways]`` holds line tags (plane 0, -1 empty) and LRU stamps (plane 1);
``cdesc[level] = (first row, sets, ways, per_vcpu)``; a level with 0 sets is absent. Lines are
64 bytes, replacement is LRU, fills go into every level that missed (inclusive).
"""

from __future__ import annotations

from numba import njit

from .layout import NCACHE

LINE_TAGS, LINE_STAMPS = 0, 1


@njit(cache=True, inline="always")
def access_line(cache, cdesc, vcpu, hpa, clock):  # type: ignore[no-untyped-def]
    """Where the line of ``hpa`` was found: 0 L1, 1 L2, 2 LLC, 3 DRAM (then filled)."""
    line = hpa >> 6
    found = NCACHE
    for level in range(NCACHE):
        sets = cdesc[level, 1]
        if sets == 0:
            continue
        row = cdesc[level, 0] + (vcpu * sets if cdesc[level, 3] else 0) + (line & (sets - 1))
        for way in range(cdesc[level, 2]):
            if cache[LINE_TAGS, row, way] == line:
                clock[0] += 1
                cache[LINE_STAMPS, row, way] = clock[0]
                found = level
                break
        if found == level:
            break
    for level in range(found):  # fill the levels that missed
        sets = cdesc[level, 1]
        if sets == 0:
            continue
        row = cdesc[level, 0] + (vcpu * sets if cdesc[level, 3] else 0) + (line & (sets - 1))
        victim = 0
        oldest = cache[LINE_STAMPS, row, 0]
        for way in range(1, cdesc[level, 2]):
            if cache[LINE_STAMPS, row, way] < oldest:
                oldest = cache[LINE_STAMPS, row, way]
                victim = way
        clock[0] += 1
        cache[LINE_TAGS, row, victim] = line
        cache[LINE_STAMPS, row, victim] = clock[0]
    return found
