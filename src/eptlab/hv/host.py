"""Host-physical memory as the hypervisor manages it: every 4 KiB frame carries a reference
count (how many EPT leaves map it), so several EPTs (snapshots, forks) can share frames, large
and small mappings of the same memory can coexist, and only the last unmap frees a frame.

A block handed out by the allocator (4 KiB, 2 MiB or 1 GiB) returns to it once all its frames
are unreferenced; :attr:`live_bytes` counts referenced frames, the memory really in use.
"""

from __future__ import annotations

from collections import Counter

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..errors import AddressError
from ..memory import FrameAllocator, PhysicalMemory
from ..memory.allocator import Policy
from ..memory.buddy import AgingConfig


class HostMemory:
    """The host's physical memory, its allocator and per-frame reference counts."""

    def __init__(self, size: int = 1 << 40, *, policy: Policy = "sequential",
                 seed: int = 0, aging: AgingConfig | None = None) -> None:
        self.memory = PhysicalMemory(size)
        self.frames = FrameAllocator(size, policy=policy, seed=seed, aging=aging, salt="host")
        self._refs: Counter[int] = Counter()  # frame number -> mappings
        self._block_of: dict[int, int] = {}  # frame number -> start of its allocator block
        self._live_in_block: Counter[int] = Counter()  # block start -> referenced frames

    def alloc(self, size: PageSize = PageSize.SIZE_4K, *, at: int | None = None) -> int:
        """A fresh block, each of its frames referenced once; ``at`` places it at that host
        address (which must be free and aligned), otherwise the allocator's policy decides."""
        size = PageSize(size)
        hpa = self.frames.alloc(size) if at is None else self.frames.alloc_at(at, size)
        first = hpa >> PAGE_SHIFT
        for pfn in range(first, first + size // PAGE_SIZE):
            self._refs[pfn] = 1
            self._block_of[pfn] = hpa
        self._live_in_block[hpa] = size // PAGE_SIZE
        return hpa

    def _frames(self, hpa: int, size: int) -> range:
        if hpa % PAGE_SIZE or size % PAGE_SIZE:
            raise AddressError(f"{hpa:#x}+{size:#x} is not frame aligned")
        return range(hpa >> PAGE_SHIFT, (hpa + size) >> PAGE_SHIFT)

    def share(self, hpa: int, size: int = PAGE_SIZE) -> None:
        """One more mapping of the frames in ``[hpa, hpa + size)``."""
        for pfn in self._frames(hpa, size):
            if self._refs[pfn] <= 0:
                raise AddressError(f"host frame {pfn << PAGE_SHIFT:#x} is not allocated")
            self._refs[pfn] += 1

    def refs(self, hpa: int) -> int:
        """Mappings of the 4 KiB frame holding ``hpa``."""
        return self._refs.get(hpa >> PAGE_SHIFT, 0)

    def release(self, hpa: int, size: int = PAGE_SIZE) -> int:
        """Drop one mapping of each frame; frames at zero lose their contents and, when their
        whole block is unreferenced, the block returns to the allocator. Returns frames freed."""
        freed = 0
        for pfn in self._frames(hpa, size):
            if self._refs[pfn] <= 0:
                raise AddressError(f"host frame {pfn << PAGE_SHIFT:#x} is not allocated")
            self._refs[pfn] -= 1
            if self._refs[pfn]:
                continue
            del self._refs[pfn]
            freed += 1
            self.memory.discard(pfn)
            block = self._block_of.pop(pfn)
            self._live_in_block[block] -= 1
            if not self._live_in_block[block]:
                del self._live_in_block[block]
                self.frames.free(block)
        return freed

    @property
    def live_bytes(self) -> int:
        """Bytes of host frames referenced by at least one mapping."""
        return len(self._refs) * PAGE_SIZE

    @property
    def used_bytes(self) -> int:
        """Bytes of allocator blocks not yet returned (>= live_bytes)."""
        return self.frames.used_bytes
