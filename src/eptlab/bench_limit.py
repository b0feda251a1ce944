"""The software limit of the bench streams: ``benchmarks/c_limit/walk_limit.c``, a plain C loop
over the same accesses, page tables and TLB geometry (L1 and L2 4 KiB TLBs) with every walk
uncached and no data-cache model (the file's header lists what it leaves out).

It is compiled at run time with the system C compiler, through the compiler and cache directory
of :mod:`eptlab.native.build`, and runs on the engine's own memory arrays, so
:func:`eptlab.bench.run` can time it on the same stream in the same process.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .arch.paging import Cr4
from .errors import ConfigError, ToolchainError
from .memory.physical import PhysicalMemory
from .mmu.config import TlbConfig
from .mmu.context import GuestState, Vmcs
from .mmu.engine import frame_table
from .native.build import build_library, compiler

SOURCE = Path(__file__).resolve().parents[2] / "benchmarks" / "c_limit" / "walk_limit.c"
FLAGS = ("-O2", "-std=gnu11", "-fPIC", "-shared", "-Wall", "-Werror")
LIBRARY = "libwalklimit.so"
_I64P = ctypes.POINTER(ctypes.c_int64)
_LIBS: dict[Path, ctypes.CDLL] = {}


def available() -> bool:
    """Whether the C source is at hand (a source checkout) and a compiler exists."""
    try:
        compiler()
    except ToolchainError:
        return False
    return SOURCE.exists()


def _library() -> ctypes.CDLL:
    target = build_library(SOURCE, FLAGS, LIBRARY)
    if target not in _LIBS:
        lib = ctypes.CDLL(str(target))
        fn = lib.walk_limit_run
        fn.restype = ctypes.c_int64
        fn.argtypes = [_I64P, _I64P, ctypes.c_void_p, ctypes.c_int64, _I64P, _I64P]
        _LIBS[target] = lib
    return _LIBS[target]


def _ptr(array: npt.NDArray[np.int64]) -> ctypes._Pointer[ctypes.c_int64]:
    return array.ctypes.data_as(_I64P)


@dataclass
class CLimit:
    """The C loop bound to one address space: call :meth:`run` on chunks of a stream (its TLBs
    persist between chunks, as the engine's do)."""

    memory: PhysicalMemory
    guest: GuestState
    vmcs: Vmcs
    maxphyaddr: int
    tlb: TlbConfig
    walks: int = 0
    references: int = 0
    hpa_sum: int = 0

    def __post_init__(self) -> None:
        if self.vmcs.eptp.ad_enabled or self.guest.cr4 & Cr4.LA57:
            raise ConfigError("CLimit", "the C loop models 4-level paging without EPT A/D")
        self._lib = _library()
        l1, l2 = self.tlb.l1d_4k, self.tlb.stlb_4k
        self._shape = (l1.sets, l1.ways, l2.sets, l2.ways)
        self._tlbs = np.full(2 * (l1.sets * l1.ways + l2.sets * l2.ways), -1, np.int64)
        self._frames_at = -1

    def reset(self) -> None:
        """Empty the TLBs and zero the counts."""
        self._tlbs[:] = -1
        self.walks = self.references = self.hpa_sum = 0

    def run(self, gva: npt.NDArray[np.int64], kind: npt.NDArray[np.int8]) -> int:
        """Translate every access (reads and writes); returns how many were done before the
        first one that found a non-present entry (all of them on the bench streams)."""
        rows, htable = self.memory.kernel_arrays()
        if self._frames_at != self.memory.generation:  # the engine's frame table, rebuilt alike
            self._frames, self._base = frame_table(htable)
            self._frames_at = self.memory.generation
        gva = np.ascontiguousarray(gva, np.int64)
        kind = np.ascontiguousarray(kind, np.int8)
        params = np.array(
            [
                rows.ctypes.data,
                htable.ctypes.data,
                htable.shape[0] - 1,
                self._frames.ctypes.data,
                len(self._frames),
                int(self._base[0]),
                self.guest.cr3,
                self.vmcs.eptp.root,
                self.vmcs.eptp.levels,
                self.maxphyaddr,
                *self._shape,
            ],
            np.int64,
        )
        counts = np.zeros(3, np.int64)
        done = int(
            self._lib.walk_limit_run(
                _ptr(params), _ptr(gva), kind.ctypes.data, len(gva), _ptr(self._tlbs),
                _ptr(counts),
            )
        )
        self.walks += int(counts[0])
        self.references += int(counts[1])
        self.hpa_sum = (self.hpa_sum + int(counts[2].view(np.uint64))) % (1 << 64)
        return done
