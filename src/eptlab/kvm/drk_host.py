"""Real RTM timing on this machine, in this process (no KVM): the costs the tsx-aborts model
prices (an empty transaction, an explicit abort, an uncontended lock) and the DrK probe (Jang,
Lee, Kim, CCS 2016): the time from XBEGIN to the abort path when the transaction touches a
page that is mapped but not accessible (a store to a read-only page) against one that is not
mapped at all. Uses the C probe of :mod:`eptlab.kvm.rtm_host` (``eptlab_rtm_time``).

On a virtual machine (these hosts are) the page walks are two-dimensional and the suppressed
page faults never leave the guest; the figures are this machine's, not a bare-metal CPU's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from dataclasses import dataclass

import numpy as np

from . import rtm_host

MODES = {"timer": 0, "empty": 1, "xabort": 2, "read": 3, "write": 4, "lock": 5}
COMMITTED = 0xFFFFFFFF  # _XBEGIN_STARTED: the transaction committed


@dataclass(frozen=True)
class Timing:
    """Cycles (TSC ticks) of one probe kind, the timer's own overhead subtracted: median and
    quartiles over the repetitions, and the share of repetitions that aborted."""

    probe: str
    median: float
    q1: float
    q3: float
    aborted: float
    reps: int


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _time(addr: int, mode: str, reps: int) -> tuple[np.ndarray, np.ndarray]:
    lib = rtm_host._lib()
    fn = lib.eptlab_rtm_time
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int64
    cycles = np.zeros(reps, np.int64)
    status = np.zeros(reps, np.int64)
    fn(addr, MODES[mode], reps, cycles.ctypes.data, status.ctypes.data)
    return cycles, status


def measure(reps: int = 2000) -> list[Timing]:
    """Time every probe kind ``reps`` times (RtmUnavailable where RTM cannot run). Three pages
    of one fresh mapping: a touched read-write page, a touched page made read-only, and a page
    unmapped again (its page-table entry is not present, the upper levels are)."""
    rtm_host.require()
    libc = _libc()
    page = mmap.PAGESIZE
    prot_rw = mmap.PROT_READ | mmap.PROT_WRITE
    base = libc.mmap(None, 3 * page, prot_rw, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        ctypes.memset(base, 1, 3 * page)  # all three present
        rw, ro, gone = base, base + page, base + 2 * page
        libc.mprotect(ro, page, mmap.PROT_READ)
        libc.munmap(gone, page)
        overhead = float(np.median(_time(0, "timer", reps)[0]))
        plan = [
            ("empty transaction", 0, "empty"),
            ("explicit abort (XABORT)", 0, "xabort"),
            ("uncontended lock acquire + release", 0, "lock"),
            ("read, mapped page (commits)", rw, "read"),
            ("write, mapped read-only page (aborts)", ro, "write"),
            ("write, unmapped page (aborts)", gone, "write"),
            ("read, unmapped page (aborts)", gone, "read"),
        ]
        out = []
        for name, addr, mode in plan:
            _time(addr, mode, 64)  # warm: code, TLB, paging-structure caches
            cycles, status = _time(addr, mode, reps)
            c = cycles.astype(float) - overhead
            aborted = float(np.mean(status != COMMITTED)) if mode != "lock" else 0.0
            q1, med, q3 = np.percentile(c, [25, 50, 75])
            out.append(Timing(name, float(med), float(q1), float(q3), aborted, reps))
        return out
    finally:
        libc.munmap(base, 2 * page)


__all__ = ["MODES", "Timing", "measure"]
