"""Physical memory as the kernels see it (:class:`state.Memory`): rows of 512 words found
through a direct-indexed frame table over the populated range, else through the open-addressing
hash of :class:`eptlab.memory.PhysicalMemory` (same hash function)."""

from __future__ import annotations

import numpy as np

from ...memory.physical import EMPTY, HASH_MULTIPLIER
from . import inline_kernel

_MULT = np.uint64(HASH_MULTIPLIER)
_SHIFT = np.uint64(32)


@inline_kernel
def hashed_row(htable, pfn):  # type: ignore[no-untyped-def]
    """Row of frame ``pfn`` by the hash table, or -1 if it has no storage."""
    mask = htable.shape[0] - 1
    slot = np.int64((np.uint64(pfn) * _MULT) >> _SHIFT) & mask
    while True:
        key = htable[slot, 0]
        if key == pfn:
            return htable[slot, 1]
        if key == EMPTY:
            return -1
        slot = (slot + 1) & mask


@inline_kernel
def frame_row(mem, pfn):  # type: ignore[no-untyped-def]
    """Row of frame ``pfn``, or -1 if it has no storage (reads as zeros)."""
    index = pfn - mem.frame_base[0]
    if 0 <= index < mem.frames.shape[0]:
        return np.int64(mem.frames[index])
    return hashed_row(mem.htable, pfn)


@inline_kernel
def read_word(mem, address):  # type: ignore[no-untyped-def]
    row = frame_row(mem, address >> 12)
    if row < 0:
        return np.int64(0)
    return np.int64(mem.rows[row, (address & 4095) >> 3])


@inline_kernel
def write_word(mem, address, value):  # type: ignore[no-untyped-def]
    """Write an entry; the frame must have storage (the engine ensures it). Returns success."""
    row = frame_row(mem, address >> 12)
    if row < 0:
        return False
    mem.rows[row, (address & 4095) >> 3] = np.uint64(value)
    return True
