"""The kernels' set-associative structures as the LRU tests drive them (test_lru_rings.py with
stamped models, test_lru_order.py with ordered-dict models): the numba dispatchers, called from
Python, and a small three-level cache geometry with ways that are not powers of two."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from eptlab.mmu.kernels import assoc
from eptlab.mmu.kernels import cache as data_cache

Kernel = Callable[..., Any]
access_line = cast(Kernel, data_cache.access_line)
lookup = cast(Kernel, assoc.lookup)
insert = cast(Kernel, assoc.insert)
entry_word = cast(Kernel, assoc.entry_word)
drop = cast(Kernel, assoc.drop)

# (sets, ways, per-vCPU) of L1, L2, LLC
LEVELS = ((2, 3, 1), (4, 2, 1), (4, 5, 0))
VCPUS = 2


def cache_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty cache rows, the level descriptors and the ring heads for ``LEVELS``."""
    cdesc = np.zeros((3, 4), np.int64)
    row = 0
    for i, (sets, ways, per_vcpu) in enumerate(LEVELS):
        cdesc[i] = (row, sets, ways, per_vcpu)
        row += sets * (VCPUS if per_vcpu else 1)
    width = max(ways for _, ways, _ in LEVELS)
    return np.full((row, width), -1, np.int64), cdesc, np.zeros(row, np.int32)
