"""The host's page cache for disk images: blocks read through the host's buffered I/O are kept
in host frames, keyed by ``(image, block)``, least recently used evicted first once
``capacity`` blocks are held.

Its frames come from :class:`~eptlab.hv.host.HostMemory` like a VM's: each cached block holds
one reference to its frame, and evicting or dropping it releases that reference, so
``HostMemory.live_bytes`` counts the cache with everything else in host RAM.

Readahead (:meth:`HostPageCache.fill`): a miss reads the missing blocks and up to ``readahead``
blocks after them in the same disk request, as Linux's readahead does on a sequential miss (a
fixed window here; Linux's window starts small and grows). A frame that also backs a guest page
(a DAX window, :mod:`eptlab.apps.dax`) holds one more reference: evicting the block runs the
``on_evict`` hooks (the DAX window unmaps it from the EPT, as reclaim unmaps a mapped page-cache
page through the MMU notifier), and :meth:`HostPageCache.drop` skips blocks a hook says are
mapped (``drop_caches`` does not drop mapped pages).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE
from ..costs import CostProfile, active_profile
from ..errors import ConfigError
from ..hv.host import HostMemory
from .disk import Block, Disk

Key = tuple[int, int]  # (image, block)
EvictHook = Callable[[Key, int], None]
"""``hook(key, hpa)``: the block ``key`` in frame ``hpa`` is being evicted."""


@dataclass(frozen=True)
class HostCosts:
    """Host kernel prices of the file I/O paths, from the cost profile (cycles)."""

    page_cache_lookup: int  # find a block in the page cache and take a reference
    host_fault: int  # the host's fault path for one page of a VMM mapping (no frame, no zeroing)

    @classmethod
    def of(cls, profile: CostProfile | None = None) -> HostCosts:
        """The prices of ``profile``, or of the active profile."""
        p = active_profile() if profile is None else profile
        return cls(p.cycles("page_cache_lookup_cycles"), p.cycles("host_fault_cycles"))


@dataclass(frozen=True)
class Fill:
    """One disk request made by :meth:`HostPageCache.fill`."""

    blocks: int  # blocks read from the disk (asked for + read ahead)
    ahead: int  # of which read ahead
    took_us: float  # modelled disk time of the request


class HostPageCache:
    """An LRU cache of disk blocks living in host memory."""

    def __init__(self, host: HostMemory, capacity: int, *, readahead: int = 0) -> None:
        if capacity < 1:
            raise ConfigError("host_cache", f"must hold at least one block, got {capacity}")
        if readahead < 0:
            raise ConfigError("host_readahead", f"{readahead} blocks is negative")
        self.host, self.capacity, self.readahead = host, capacity, readahead
        self._frames: OrderedDict[Key, int] = OrderedDict()  # key -> HPA, oldest first
        self.hits = self.misses = self.inserts = self.evictions = 0
        self.on_evict: list[EvictHook] = []
        self.mapped: Callable[[Key], bool] = lambda key: False  # kept by drop()

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
            old_key, old = self._frames.popitem(last=False)
            for hook in self.on_evict:
                hook(old_key, old)
            self.host.release(old)
            self.evictions += 1
        hpa = self.host.alloc()
        self.host.memory.frame(hpa >> PAGE_SHIFT)[:] = contents
        self._frames[key] = hpa
        self.inserts += 1
        return hpa

    def fill(
        self, disk: Disk, first: int, count: int, deliver: Callable[[int, int], None]
    ) -> Fill:
        """Read ``count`` blocks from ``first`` (missing from the cache) in one disk request,
        with up to :attr:`readahead` following blocks the cache does not hold (stopping at the
        first it holds and at the disk's end). Every block goes into a new cache frame; the
        read-ahead ones first, then each asked-for block, handed to ``deliver(block, hpa)``
        as soon as it is cached (so a small cache cannot evict it before it is used)."""
        ahead = 0
        end = first + count
        while ahead < self.readahead and end + ahead < disk.blocks:
            if (disk.image, end + ahead) in self._frames:
                break
            ahead += 1
        contents, took = disk.read(first, count + ahead)
        for i in range(count, count + ahead):
            self.insert((disk.image, first + i), contents[i])
        for i in range(count):
            deliver(first + i, self.insert((disk.image, first + i), contents[i]))
        return Fill(count + ahead, ahead, took)

    def prewarm(self, disk: Disk, first: int, count: int) -> None:
        """The host reads blocks into its cache on its own (``vmtouch -t``, a copy of the image,
        another VM on the same base image): no readahead, counted as no guest's I/O."""
        contents, _ = disk.read(first, count)
        for i, words in enumerate(contents):
            self.insert((disk.image, first + i), words)

    def drop(self) -> int:
        """Release every block nobody maps (the host's ``echo 1 > /proc/sys/vm/drop_caches``,
        which leaves mapped pages alone). Returns how many were dropped."""
        dropped = 0
        for key in list(self._frames):
            if self.mapped(key):
                continue
            self.host.release(self._frames.pop(key))
            dropped += 1
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
