"""Real RTM in this process (no KVM): the C probe ``native/rtm_probe.c``, built at run time with the
system compiler (``$CC`` or ``cc``, ``-O2 -mrtm -shared``) into the cache of
:mod:`eptlab.native.build` and called through ctypes. The host kernel's demand paging is the lazy
backing: a transaction's first store to a page never touched faults, the fault is suppressed and the
transaction aborts (SDM Vol. 1 §16.3.8.2), so only the fallback path (plain stores) gets the page
mapped.

:func:`support` says whether RTM can run here: CPUID.(EAX=7, ECX=0):EBX bit 11 (SDM Vol. 2,
CPUID) and a trivial transaction that commits (TSX can be disabled by microcode while CPUID
still reports it). ``EPTLAB_NO_RTM=1`` in the environment pretends the CPUID bit is clear (to
test the unavailable path on machines that have RTM). Where RTM is missing, :func:`require`
raises :class:`~eptlab.errors.RtmUnavailable` (the CLI: exit status 3), before any XBEGIN runs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import RtmUnavailable, ToolchainError
from ..native.build import build_library
from .memory import MADV_POPULATE_WRITE
from .txplan import AttemptLog, TxPlan

SOURCE = "rtm_probe.c"
CFLAGS = ("-O2", "-mrtm", "-shared", "-fPIC")
FORCE_ENV = "EPTLAB_NO_RTM"
TRIVIAL = 64  # empty transactions tried by the support check


@dataclass(frozen=True)
class Support:
    """Whether this CPU offers RTM/HLE and, if RTM cannot be used, why."""
    rtm: bool  # CPUID.7.0:EBX bit 11
    hle: bool  # CPUID.7.0:EBX bit 4
    trivial_commits: int  # of TRIVIAL empty transactions (0 when rtm is False: never tried)
    reason: str  # why RTM is unusable ("" when it is usable)

    @property
    def usable(self) -> bool:
        """Whether RTM can be used here."""
        return not self.reason


def _source() -> Path:
    return Path(str(resources.files("eptlab.kvm") / "native" / SOURCE))


def build() -> Path:
    """The shared object, compiled once per source version (:func:`eptlab.native.build.
    build_library`); raises RtmUnavailable when no C compiler is there or it fails."""
    try:
        return build_library(_source(), CFLAGS, "librtm_probe.so")
    except ToolchainError as exc:
        raise RtmUnavailable(f"building the RTM probe failed: {exc}") from None


@cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    lib.eptlab_rtm_cpuid.restype = ctypes.c_int
    lib.eptlab_rtm_trivial.argtypes = [ctypes.c_int]
    lib.eptlab_rtm_trivial.restype = ctypes.c_int
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.eptlab_rtm_run.argtypes = [p, p, i64, p, i64, i64, i64, i64, p, i64]
    lib.eptlab_rtm_run.restype = i64
    return lib


def support() -> Support:
    """What this processor offers (the trivial transactions run only where CPUID has RTM)."""
    lib = _lib()
    bits = lib.eptlab_rtm_cpuid()
    rtm, hle = bool(bits & 1), bool(bits & 2)
    if os.environ.get(FORCE_ENV, "") not in ("", "0"):
        rtm = hle = False
        return Support(rtm, hle, 0, f"CPUID.7.0:EBX bit 11 (RTM) is clear ({FORCE_ENV} is set)")
    if not rtm:
        return Support(rtm, hle, 0, "CPUID.7.0:EBX bit 11 (RTM) is clear: this processor "
                       "has no RTM, or TSX is disabled")
    commits = lib.eptlab_rtm_trivial(TRIVIAL)
    if commits == 0:
        return Support(rtm, hle, 0, f"CPUID reports RTM but none of {TRIVIAL} empty "
                       "transactions committed (TSX disabled, e.g. tsx=off or TSX_CTRL)")
    return Support(rtm, hle, commits, "")


def require() -> Support:
    """The RTM support of this CPU; RtmUnavailable with the reason where it cannot be used."""
    s = support()
    if not s.usable:
        raise RtmUnavailable(s.reason)
    return s


def log_capacity(plan: TxPlan, rounds: int, max_retries: int) -> int:
    """Entries the log needs at most: per transaction and round, every attempt plus a fallback."""
    return plan.transactions * rounds * (max_retries + 2)


def run(plan: TxPlan, *, rounds: int = 1, max_retries: int = 3,
        policy: str = "lazy") -> AttemptLog:
    """Run ``plan`` over a fresh anonymous private mapping: ``lazy`` (pages fault in on first
    touch) or ``prefaulted`` (``MADV_POPULATE_WRITE`` on the whole region first)."""
    if policy not in ("lazy", "prefaulted"):
        raise ValueError(policy)
    require()
    lib = _lib()
    size = max(plan.span, mmap.PAGESIZE)
    size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if policy == "prefaulted":
            region.madvise(MADV_POPULATE_WRITE, 0, size)
        view = ctypes.c_char.from_buffer(region)
        base = ctypes.addressof(view)
        runs = np.ascontiguousarray(plan.runs, np.uint64)
        warm = np.ascontiguousarray(plan.warm, np.uint64)
        cap = log_capacity(plan, rounds, max_retries)
        log = np.zeros(2 * cap, np.uint64)
        n = lib.eptlab_rtm_run(base, warm.ctypes.data, len(warm), runs.ctypes.data,
                               plan.transactions, plan.per_tx, max_retries, rounds,
                               log.ctypes.data, cap)
        del view
    finally:
        region.close()
    if n < 0:  # pragma: no cover - the capacity above is exact
        raise RuntimeError("the RTM probe's log overflowed")
    return AttemptLog.decode(log[: 2 * n])
