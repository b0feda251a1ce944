"""Compile the engine's kernels once, before a batch of runs in several processes.

numba compiles a kernel the first time it runs and keeps it on disk (``cache=True``); a process
that finds it there loads it in well under a second. Two processes that start cold at once each
compile it, so a batch compiles first, in one process, and only then fans out.
"""

from __future__ import annotations

import numpy as np

from ..arch.bits import PageSize
from .config import MmuConfig
from .engine import Accesses, Engine
from .scenario import NestedSpace

BASE = 0x0000_1000_0000_0000
ACCESSES = 1000


def warm_up() -> int:
    """Run a few accesses through the engine with the full cache model, which compiles (or
    loads) the kernels every engine run uses; returns the number of accesses performed."""
    space = NestedSpace.create(layout="contiguous")
    space.map_range(BASE, 2 << 20, PageSize.SIZE_4K, PageSize.SIZE_4K)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    gva = BASE + np.arange(ACCESSES, dtype=np.int64) * 4096 % (2 << 20)  # every page of the range
    result = engine.run(Accesses.build(gva, np.zeros(ACCESSES, dtype=np.int8)))
    return result.stopped_at
