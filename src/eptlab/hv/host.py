"""Host-physical memory as the hypervisor manages it: frames with reference counts, so that
several EPTs (snapshots, forks) can map one frame and only the last unmap frees it."""

from __future__ import annotations

from collections import Counter

from ..arch.bits import PAGE_SHIFT, PageSize
from ..errors import AddressError
from ..memory import FrameAllocator, PhysicalMemory
from ..memory.allocator import Policy


class HostMemory:
    """The host's physical memory, its allocator and the reference counts of blocks."""

    def __init__(
        self, size: int = 1 << 40, *, policy: Policy = "sequential", seed: int = 0
    ) -> None:
        self.memory = PhysicalMemory(size)
        self.frames = FrameAllocator(size, policy=policy, seed=seed)
        self._refs: Counter[int] = Counter()

    def alloc(self, size: PageSize = PageSize.SIZE_4K) -> int:
        hpa = self.frames.alloc(size)
        self._refs[hpa] = 1
        return hpa

    def share(self, hpa: int) -> int:
        """One more mapping of the block at ``hpa``; returns its new count."""
        if self._refs[hpa] <= 0:
            raise AddressError(f"host block {hpa:#x} is not allocated")
        self._refs[hpa] += 1
        return self._refs[hpa]

    def refs(self, hpa: int) -> int:
        return self._refs[hpa]

    def release(self, hpa: int) -> bool:
        """Drop one reference; frees the block (and its contents) at zero. Returns True then."""
        if self._refs[hpa] <= 0:
            raise AddressError(f"host block {hpa:#x} is not allocated")
        self._refs[hpa] -= 1
        if self._refs[hpa]:
            return False
        del self._refs[hpa]
        size = self.frames.free(hpa)
        for pfn in range(hpa >> PAGE_SHIFT, (hpa + size) >> PAGE_SHIFT):
            if self.memory.is_backed(pfn):
                self.memory.discard(pfn)
        return True

    @property
    def used_bytes(self) -> int:
        return self.frames.used_bytes
