"""The kernels' state, in a few named bundles of numpy arrays (numba passes ``NamedTuple``s of
arrays by value, types each field, and caches the compiled kernels, unlike ``jitclass``).

The engine (:mod:`eptlab.mmu.engine`) builds them; every kernel takes the bundles it needs
rather than a long list of arrays, so two arrays of the same type cannot be swapped by position.
The layouts of the arrays are in :mod:`layout` (registers, features, costs, statistics, exits),
:mod:`assoc` (TLBs and paging-structure caches) and :mod:`cache` (data caches, prefetcher).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]


class Stream(NamedTuple):
    """A chunk of accesses: guest-virtual address, kind (0 read, 1 write, 2 fetch), user mode,
    vCPU, one entry per access."""

    gva: I64
    kind: npt.NDArray[np.int8]
    user: npt.NDArray[np.int8]
    vcpu: npt.NDArray[np.int32]


class Memory(NamedTuple):
    """Host-physical memory (:mod:`physmem`): the frames' words, the frame -> row hash table,
    and a direct-indexed frame table ``frames[pfn - frame_base[0]]`` (row or -1) over the
    frames the engine saw populated when the run started (frames outside it use the hash)."""

    rows: npt.NDArray[np.uint64]
    htable: I64
    frames: npt.NDArray[np.int32]
    frame_base: I64


class Caches(NamedTuple):
    """Every cache the model keeps: the translation structures (``tlb``/``desc``, :mod:`assoc`),
    the data caches (``cache``/``cdesc``/``heads``, :mod:`cache`) and the data prefetcher's
    stream table and configuration (``pf``/``pcfg``)."""

    tlb: I64
    desc: I64
    cache: I64
    cdesc: I64
    heads: npt.NDArray[np.int32]
    pf: I64
    pcfg: I64


class Machine(NamedTuple):
    """Per-vCPU registers ``regs[vcpu, REG_*]`` (updated by the kernels: PML index, structures
    occupied), machine features ``feat[FEAT_*]`` and the cost model ``cost[COST_*]``."""

    regs: I64
    feat: I64
    cost: I64


class Log(NamedTuple):
    """What a run reports: statistics ``stats[vcpu, ST_*]``, the reference log ``refs`` (with
    its count), the exit record ``exit_info[X_*]``, the HPA of each access and the cache level
    that served its data (``out_hpa``, ``out_where``: empty when not recorded) and the walks'
    scratch rows (:data:`walk.NSCRATCH` x 5)."""

    stats: I64
    refs: I64
    ref_count: I64
    exit_info: I64
    out_hpa: I64
    out_where: npt.NDArray[np.int8]
    scratch: I64
