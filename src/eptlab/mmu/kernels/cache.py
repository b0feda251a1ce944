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

Data accesses (:func:`access_data`, not page-walk references: :func:`access_line`) also drive
the prefetchers configured in ``pcfg`` (:class:`eptlab.mmu.config.PrefetcherConfig`), whose
per-page stream table is ``pf[vcpu, position, PF_*]`` (a ring in recency order: :func:`_train`).
A prefetched line carries PREFETCHED in its tag until a demand access uses it, which counts a
useful prefetch.
"""

from __future__ import annotations

from . import inline_kernel, kernel
from .layout import (
    NCACHE,
    PF_DEGREE,
    PF_DISTANCE,
    PF_KIND,
    PF_KIND_NEXT_LINE,
    PF_KIND_STRIDE,
    PF_L1_NEXT_LINE,
    PF_LAST,
    PF_PAGE,
    PF_STREAMS,
    PF_STRIDE,
    ST_PF_ISSUED,
    ST_PF_USEFUL,
)

# A line brought by a prefetch carries this flag in its tag until a demand access uses it (tags
# are line numbers, < 2^46): searches compare tags without it.
PREFETCHED = 1 << 62
LINE_MASK = PREFETCHED - 1
LINES_PER_PAGE = 64  # 4 KiB / 64 B: prefetches stay inside the 4 KiB page of their trigger


@inline_kernel
def _search(cache, row, ways, line):  # type: ignore[no-untyped-def]
    """Way of ``line`` in ``row``, or -1."""
    present = False
    for way in range(ways):  # no early exit: the compiler vectorizes this
        present |= (cache[row, way] & LINE_MASK) == line
    if not present:
        return -1
    for way in range(ways):
        if (cache[row, way] & LINE_MASK) == line:
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
def _row_of(cdesc, level, vcpu, line):  # type: ignore[no-untyped-def]
    sets = cdesc[level, 1]
    return cdesc[level, 0] + (vcpu * sets if cdesc[level, 3] else 0) + (line & (sets - 1))


@inline_kernel
def _lookup_fill(cache, cdesc, vcpu, line, heads, top, top_tag, top_missed):  # type: ignore[no-untyped-def]
    """Search ``line`` from level ``top`` down; the level that holds it makes it its most
    recent line, every level searched before receives it (level ``top`` as ``top_tag``).
    ``top_missed``: the row of level ``top`` is known not to hold it (not searched again).
    Returns the level that held it (NCACHE: DRAM), + 4 if its tag carried PREFETCHED."""
    found = NCACHE
    flagged = 0
    r0 = -1
    r1 = -1
    r2 = -1
    for level in range(top, NCACHE):
        sets = cdesc[level, 1]
        if sets == 0:
            continue
        row = _row_of(cdesc, level, vcpu, line)
        ways = cdesc[level, 2]
        hit = -1 if (top_missed and level == top) else _search(cache, row, ways, line)
        if hit >= 0:
            if cache[row, hit] & PREFETCHED:
                flagged = 4
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
        _fill(cache, heads, r0, cdesc[0, 2], top_tag if top == 0 else line)
    if r1 >= 0:
        _fill(cache, heads, r1, cdesc[1, 2], top_tag if top == 1 else line)
    if r2 >= 0:
        _fill(cache, heads, r2, cdesc[2, 2], top_tag if top == 2 else line)
    return found + flagged


@inline_kernel
def access_line(cache, cdesc, vcpu, hpa, heads):  # type: ignore[no-untyped-def]
    """Where the line of ``hpa`` was found: 0 L1, 1 L2, 2 LLC, 3 DRAM. Every level searched
    before the one that held the line receives it. (Page-walk references come here: they
    neither train nor trigger the prefetcher.)"""
    line = hpa >> 6
    return _lookup_fill(cache, cdesc, vcpu, line, heads, 0, line, False) & 3


@inline_kernel
def _prefetch(cache, cdesc, vcpu, line, heads, top, stats):  # type: ignore[no-untyped-def]
    """Bring ``line`` into level ``top`` (and the levels below it that miss it), tagged as
    prefetched. Dropped, and not counted, if level ``top`` is absent or already holds it."""
    sets = cdesc[top, 1]
    if sets == 0:
        return
    if _search(cache, _row_of(cdesc, top, vcpu, line), cdesc[top, 2], line) >= 0:
        return
    _lookup_fill(cache, cdesc, vcpu, line, heads, top, line | PREFETCHED, True)
    stats[vcpu, ST_PF_ISSUED] += 1


@inline_kernel
def _train(pf, pcfg, vcpu, line):  # type: ignore[no-untyped-def]
    """The stride prefetcher's per-page stream table, exact LRU: record an L1 miss of ``line``;
    returns the stride (in lines) to prefetch along, or 0.

    The table is a ring in recency order, as the cache rows are: ``pf[vcpu, streams, 1]`` is
    the position of the most recent stream (-1 reads as 0), the positions after it (wrapping)
    hold less and less recent ones, so a new page replaces the one before the head (empty
    entries, page -1, are the oldest) and becomes the head; a known page moves to the head."""
    page = line >> 6
    offset = line & (LINES_PER_PAGE - 1)
    streams = pcfg[PF_STREAMS]
    head = pf[vcpu, streams, 1]
    if head < 0:
        head = 0
    slot = -1
    if pf[vcpu, head, PF_PAGE] == page:  # the stream of the last miss: the common case
        slot = head
    else:
        for k in range(streams):
            if pf[vcpu, k, PF_PAGE] == page:
                slot = k
                break
    last = offset
    stride = 0
    if slot >= 0:
        last = pf[vcpu, slot, PF_LAST]
        stride = pf[vcpu, slot, PF_STRIDE]
        way = slot
        while way != head:  # the more recent streams move one position on
            before = way - 1 if way > 0 else streams - 1
            pf[vcpu, way, PF_PAGE] = pf[vcpu, before, PF_PAGE]
            pf[vcpu, way, PF_LAST] = pf[vcpu, before, PF_LAST]
            pf[vcpu, way, PF_STRIDE] = pf[vcpu, before, PF_STRIDE]
            way = before
    else:
        head = head - 1 if head > 0 else streams - 1  # the LRU (or an empty) entry
    go = 0
    delta = offset - last
    if delta != 0:  # two successive equal deltas confirm the stride
        if delta == stride:
            go = stride
        stride = delta
        last = offset
    pf[vcpu, streams, 1] = head
    pf[vcpu, head, PF_PAGE] = page
    pf[vcpu, head, PF_LAST] = last
    pf[vcpu, head, PF_STRIDE] = stride
    return go


@inline_kernel
def access_data(cache, cdesc, vcpu, hpa, heads, pf, pcfg, stats):  # type: ignore[no-untyped-def]
    """A demand data access: :func:`access_line`, then, on an L1 miss, the prefetchers (the
    L1 next-line one, then the L2 one, which both see only L1 misses). A demand hit on a
    prefetched line counts as a useful prefetch (once: the hit clears the flag)."""
    line = hpa >> 6
    got = _lookup_fill(cache, cdesc, vcpu, line, heads, 0, line, False)
    found = got & 3
    if got & 4:
        stats[vcpu, ST_PF_USEFUL] += 1
    kind = pcfg[PF_KIND]
    if found == 0 or (kind == 0 and pcfg[PF_L1_NEXT_LINE] == 0):
        return found
    base = line - (line & (LINES_PER_PAGE - 1))
    offset = line & (LINES_PER_PAGE - 1)
    if pcfg[PF_L1_NEXT_LINE] and offset + 1 < LINES_PER_PAGE:
        _prefetch(cache, cdesc, vcpu, line + 1, heads, 0, stats)
    stride = 0
    if kind == PF_KIND_NEXT_LINE:
        stride = 1
    elif kind == PF_KIND_STRIDE:
        stride = _train(pf, pcfg, vcpu, line)
    if stride != 0:
        distance = pcfg[PF_DISTANCE]
        for j in range(pcfg[PF_DEGREE]):
            target = offset + stride * (distance + j)
            if target < 0 or target >= LINES_PER_PAGE:
                break  # never across the 4 KiB page
            _prefetch(cache, cdesc, vcpu, base + target, heads, 1, stats)
    return found


@kernel
def access_lines(cache, cdesc, vcpu, addresses, heads, found):  # type: ignore[no-untyped-def]
    """:func:`access_line` for each of ``addresses`` in order (one call from Python for a
    whole sequence, as prime+probe makes); ``found[i]`` is the level that served it, or -1
    where ``addresses[i]`` is negative (no access)."""
    for i in range(addresses.shape[0]):
        if addresses[i] < 0:
            found[i] = -1
        else:
            found[i] = access_line(cache, cdesc, vcpu, addresses[i], heads)
