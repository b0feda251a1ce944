"""Native measurements of this host: a small C helper (``measure.c``) built at run time with the
system compiler and called through ctypes. Pointer chasing, random and GUPS accesses, sequential
scans and memcpy over populated memory on 4 KiB or 2 MiB pages, in core cycles.

Used by ``eptlab calibrate`` and the ``model-vs-machine`` experiment::

    from eptlab import native
    r = native.run_pattern("pointer-chase", 1 << 30, page="2m", accesses=200_000, seed=1)
    r.cycles_per_access, r.ns_per_access, r.huge_pages_obtained
"""

from .build import library_path, load
from .measure import (
    PAGE_KINDS,
    PATTERNS,
    Buffer,
    Clock,
    CopyResult,
    NativeResult,
    PageKind,
    Samples,
    StlbResult,
    clock,
    mem_available,
    pinned,
    prepare_chase,
    run_copy,
    run_cpuid,
    run_pattern,
    run_stlb,
)

__all__ = [
    "PAGE_KINDS",
    "PATTERNS",
    "Buffer",
    "Clock",
    "CopyResult",
    "NativeResult",
    "PageKind",
    "Samples",
    "StlbResult",
    "clock",
    "library_path",
    "load",
    "mem_available",
    "pinned",
    "prepare_chase",
    "run_copy",
    "run_cpuid",
    "run_pattern",
    "run_stlb",
]
