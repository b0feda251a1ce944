"""The physically indexed cache hierarchy: per-vCPU L1 and L2, a shared LLC, then DRAM.

``cache[rows, max_ways]`` holds each set's line tags (-1 empty) in recency order, most recently
used first; ``cdesc[level] = (first row, sets, ways, per_vcpu)``; a level with 0 sets is absent.
Lines are 64 bytes, replacement is LRU, a line found at one level (or in DRAM) is filled into
every level above it (inclusive).

Keeping each set ordered by recency is exact LRU without stamps: a hit moves the line to the
front, a miss drops the last way (the least recently used, or an empty one: empty ways collect
at the back) and puts the new line in front. A set search then reads one contiguous row of tags
and usually stops early, and a miss needs no second pass to find the victim.
"""

from __future__ import annotations

from . import inline_kernel
from .layout import NCACHE


@inline_kernel
def _promote(cache, row, way, line):  # type: ignore[no-untyped-def]
    """Move ``line`` (found at ``way``, or new when ``way`` is the last) to the front of the row:
    the ways before it move back by one."""
    for k in range(way, 0, -1):
        cache[row, k] = cache[row, k - 1]
    cache[row, 0] = line


@inline_kernel
def access_line(cache, cdesc, vcpu, hpa, clock):  # type: ignore[no-untyped-def]
    """Where the line of ``hpa`` was found: 0 L1, 1 L2, 2 LLC, 3 DRAM. Every level searched
    before the one that held the line receives it (``clock`` is unused: the order of a row is
    its LRU state)."""
    line = hpa >> 6
    found = NCACHE
    r0 = -1
    r1 = -1
    r2 = -1
    for level in range(NCACHE):
        sets = cdesc[level, 1]
        if sets == 0:
            continue
        row = cdesc[level, 0] + (vcpu * sets if cdesc[level, 3] else 0) + (line & (sets - 1))
        ways = cdesc[level, 2]
        hit = -1
        for way in range(ways):
            if cache[row, way] == line:
                hit = way
                break
        if hit >= 0:
            if hit > 0:
                _promote(cache, row, hit, line)
            found = level
            break
        if level == 0:
            r0 = row
        elif level == 1:
            r1 = row
        else:
            r2 = row
    # fill the levels that missed: the last way (LRU or empty) leaves, the line enters in front
    if r0 >= 0:
        _promote(cache, r0, cdesc[0, 2] - 1, line)
    if r1 >= 0:
        _promote(cache, r1, cdesc[1, 2] - 1, line)
    if r2 >= 0:
        _promote(cache, r2, cdesc[2, 2] - 1, line)
    return found
