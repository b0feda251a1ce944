"""The physically indexed cache hierarchy: per-vCPU L1 and L2, a shared LLC, then DRAM.

``cache[rows, max_ways]`` holds each set's line tags (-1 empty); ``cdesc[level] = (first row,
sets, ways, per_vcpu)``; a level with 0 sets is absent. Lines are 64 bytes, replacement is LRU,
a line found at one level (or in DRAM) is filled into every level above it (inclusive).

Each row is a ring in recency order: ``heads[row]`` is the way of the most recently used line,
the next ways (wrapping around) hold less and less recent ones, so the way before the head
holds the least recently used line (or is empty: empty ways are the oldest). That is exact LRU
without stamps, and cheap: a miss moves the head back one way and writes the line there (over
the LRU line), a hit moves the lines between the head and the hit forward by one way. A search
compares one contiguous row of tags and can do it in vector registers (the order of the search
does not matter: a line is in a set at most once).
"""

from __future__ import annotations

from . import inline_kernel
from .layout import NCACHE


@inline_kernel
def _search(cache, row, ways, line):  # type: ignore[no-untyped-def]
    """Way of ``line`` in ``row``, or -1."""
    present = False
    for way in range(ways):  # no early exit: the compiler vectorizes this
        present |= cache[row, way] == line
    if not present:
        return -1
    for way in range(ways):
        if cache[row, way] == line:
            return way
    return -1


@inline_kernel
def _fill(cache, heads, row, ways, line):  # type: ignore[no-untyped-def]
    """A missed line replaces the LRU way (the one before the head) and becomes the head."""
    head = heads[row] - 1
    if head < 0:
        head = ways - 1
    cache[row, head] = line
    heads[row] = head


@inline_kernel
def _touch(cache, heads, row, ways, way, line):  # type: ignore[no-untyped-def]
    """A hit at ``way``: the more recent lines move one way on, the line becomes the head."""
    head = heads[row]
    while way != head:
        before = way - 1 if way > 0 else ways - 1
        cache[row, way] = cache[row, before]
        way = before
    cache[row, head] = line


@inline_kernel
def access_line(cache, cdesc, vcpu, hpa, heads):  # type: ignore[no-untyped-def]
    """Where the line of ``hpa`` was found: 0 L1, 1 L2, 2 LLC, 3 DRAM. Every level searched
    before the one that held the line receives it."""
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
        hit = _search(cache, row, ways, line)
        if hit >= 0:
            _touch(cache, heads, row, ways, hit, line)
            found = level
            break
        if level == 0:
            r0 = row
        elif level == 1:
            r1 = row
        else:
            r2 = row
    if r0 >= 0:
        _fill(cache, heads, r0, cdesc[0, 2], line)
    if r1 >= 0:
        _fill(cache, heads, r1, cdesc[1, 2], line)
    if r2 >= 0:
        _fill(cache, heads, r2, cdesc[2, 2], line)
    return found
