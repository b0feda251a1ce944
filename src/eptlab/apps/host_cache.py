"""The host's page cache for disk images: blocks read through the host's buffered I/O are kept
in host frames, keyed by ``(image, block)``, least recently used evicted first once
``capacity`` blocks are held.

Its frames come from :class:`~eptlab.hv.host.HostMemory` like a VM's: each cached block holds
one reference to its frame, and evicting or dropping it releases that reference, so
``HostMemory.live_bytes`` counts the cache with everything else in host RAM.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE
from ..errors import ConfigError
from ..hv.host import HostMemory
from .disk import Block

Key = tuple[int, int]  # (image, block)


class HostPageCache:
    """An LRU cache of disk blocks living in host memory."""

    def __init__(self, host: HostMemory, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError("host_cache", f"must hold at least one block, got {capacity}")
        self.host, self.capacity = host, capacity
        self._frames: OrderedDict[Key, int] = OrderedDict()  # key -> HPA, oldest first
        self.hits = self.misses = self.inserts = self.evictions = 0

    def __len__(self) -> int:
        return len(self._frames)

    def __contains__(self, key: Key) -> bool:
        return key in self._frames

    def keys(self) -> list[Key]:
        """Cached keys, least recently used first."""
        return list(self._frames)

    def lookup(self, key: Key) -> int | None:
        """HPA of the cached block (it becomes the most recently used), or None (a miss)."""
        hpa = self._frames.get(key)
        if hpa is None:
            self.misses += 1
            return None
        self._frames.move_to_end(key)
        self.hits += 1
        return hpa

    def peek(self, key: Key) -> int | None:
        """HPA of the cached block without touching the LRU order or the counters."""
        return self._frames.get(key)

    def insert(self, key: Key, contents: Block) -> int:
        """Cache ``contents`` under ``key`` in a fresh host frame (evicting the least recently
        used block when full). Returns the frame's HPA."""
        if key in self._frames:
            self.host.memory.frame(self._frames[key] >> PAGE_SHIFT)[:] = contents
            self._frames.move_to_end(key)
            return self._frames[key]
        while len(self._frames) >= self.capacity:
            _, old = self._frames.popitem(last=False)
            self.host.release(old)
            self.evictions += 1
        hpa = self.host.alloc()
        self.host.memory.frame(hpa >> PAGE_SHIFT)[:] = contents
        self._frames[key] = hpa
        self.inserts += 1
        return hpa

    def drop(self) -> int:
        """Release every block (the host's ``echo 1 > /proc/sys/vm/drop_caches``). Returns how
        many were dropped."""
        dropped = len(self._frames)
        for hpa in self._frames.values():
            self.host.release(hpa)
        self._frames.clear()
        return dropped

    def same_as(self, key: Key, hpa: int) -> bool:
        """Whether the cached block ``key`` and host frame ``hpa`` hold the same 4 KiB."""
        cached = self._frames.get(key)
        if cached is None:
            return False
        memory = self.host.memory
        a, b = memory.peek_frame(cached >> PAGE_SHIFT), memory.peek_frame(hpa >> PAGE_SHIFT)
        if a is None or b is None:
            return a is None and b is None
        return bool(np.array_equal(a, b))

    @property
    def bytes(self) -> int:
        return len(self._frames) * PAGE_SIZE
