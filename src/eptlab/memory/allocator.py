"""A frame allocator over a physical address range (host-physical or guest-physical).

Hands out naturally aligned blocks of 4 KiB, 2 MiB or 1 GiB, in address order (``sequential``),
at seeded random positions (``random``, for randomized GPA->HPA placement), or in address order
with freed 4 KiB blocks handed out again first, most recently freed first (``recycle``: what an
OS's per-CPU free lists do with hot pages). Bookkeeping is proportional to the blocks handed out,
not to the size of the range. ``aged``: an aged binary buddy allocator
(:class:`eptlab.memory.buddy.BuddyAllocator`) decides, as on a long-running system: consecutive
allocations are scattered and large blocks come from compaction.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SIZE, PageSize
from ..errors import AddressError, ConfigError, OutOfMemory
from .buddy import AgingConfig, BuddyAllocator

Policy = Literal["sequential", "random", "recycle", "aged"]
POLICIES = ("sequential", "random", "recycle", "aged")

_2M = PageSize.SIZE_2M.value
_1G = PageSize.SIZE_1G.value


class FrameAllocator:
    """Allocates aligned blocks in ``[base, base + size)``."""

    def __init__(
        self,
        size: int,
        *,
        base: int = 0,
        policy: Policy = "sequential",
        seed: int = 0,
        aging: AgingConfig | None = None,
        salt: str = "",
    ) -> None:
        """``aging`` and ``salt`` are for the ``aged`` policy (:class:`BuddyAllocator`)."""
        if size <= 0 or size % PAGE_SIZE or base % PAGE_SIZE:
            raise ConfigError("size/base", "must be positive multiples of 4 KiB")
        if policy not in POLICIES:
            raise ConfigError("policy", f"{policy!r} is not one of {', '.join(POLICIES)}")
        self.base, self.size, self.policy = base, size, policy
        self.buddy = (
            BuddyAllocator(size, base=base, seed=seed, aging=aging, salt=salt)
            if policy == "aged"
            else None
        )
        self._rng = np.random.default_rng(seed)
        self._blocks: dict[int, PageSize] = {}  # start address -> block size
        self._in_2m: Counter[int] = Counter()  # 2 MiB region -> bytes in use inside it
        self._in_1g: Counter[int] = Counter()  # 1 GiB region -> bytes in use inside it
        self._cursor: dict[PageSize, int] = {}
        self._recycled: list[int] = []  # freed 4 KiB blocks, most recent last (``recycle``)
        self.used_bytes = 0

    def __contains__(self, address: int) -> bool:
        """Whether ``address`` lies inside an allocated block."""
        if self.buddy is not None:
            return self.buddy.owns(address)
        return not self._free(address & ~(PAGE_SIZE - 1), PageSize.SIZE_4K)

    @property
    def blocks(self) -> dict[int, PageSize]:
        """Allocated blocks (start address -> size); a copy."""
        if self.buddy is not None:
            return {a: PageSize(s) for a, s in self.buddy.blocks.items()}
        return dict(self._blocks)

    def _free(self, address: int, size: PageSize) -> bool:
        if size == PageSize.SIZE_1G:
            return self._in_1g[address // _1G] == 0
        if self._blocks.get(address & ~(_1G - 1)) == PageSize.SIZE_1G:
            return False
        if size == PageSize.SIZE_2M:
            return self._in_2m[address // _2M] == 0
        return address not in self._blocks and self._blocks.get(address & ~(_2M - 1)) != (
            PageSize.SIZE_2M
        )

    def _first_slot(self, size: PageSize) -> int:
        return -(-self.base // size) * size  # first aligned address >= base

    def _slots(self, size: PageSize) -> int:
        first = self._first_slot(size)
        return max(0, (self.base + self.size - first) // size)

    def alloc(self, size: PageSize = PageSize.SIZE_4K) -> int:
        """Allocate one block; returns its start address."""
        size = PageSize(size)
        if self.buddy is not None:
            return self._aged(self.buddy.alloc(size))
        slots = self._slots(size)
        if slots == 0:
            raise OutOfMemory(f"range of {self.size:#x} bytes holds no {size.label} block")
        first = self._first_slot(size)
        while size == PageSize.SIZE_4K and self._recycled:
            address = self._recycled.pop()
            if self._free(address, size):  # not taken since by alloc_at or a larger block
                return self._take(address, size)
        if self.policy == "random":
            for _ in range(64):
                address = first + int(self._rng.integers(slots)) * size
                if self._free(address, size):
                    return self._take(address, size)
            start = int(self._rng.integers(slots))
        else:
            start = self._cursor.get(size, 0)
        for i in range(slots):
            slot = (start + i) % slots
            address = first + slot * size
            if self._free(address, size):
                self._cursor[size] = slot + 1
                return self._take(address, size)
        raise OutOfMemory(f"no free {size.label} block in {self.size:#x} bytes")

    def alloc_at(self, address: int, size: PageSize = PageSize.SIZE_4K) -> int:
        """Allocate the block at ``address`` (which must be free and aligned)."""
        size = PageSize(size)
        if self.buddy is not None:
            return self._aged(self.buddy.alloc_at(address, size))
        if address % size or address < self.base or address + size > self.base + self.size:
            raise AddressError(f"{address:#x} is not an aligned {size.label} block in range")
        if not self._free(address, size):
            raise OutOfMemory(f"{size.label} block at {address:#x} is already in use")
        return self._take(address, size)

    def _take(self, address: int, size: PageSize) -> int:
        self._blocks[address] = size
        self._account(address, size, +1)
        return address

    def _account(self, address: int, size: PageSize, sign: int) -> None:
        if size != PageSize.SIZE_1G:
            self._in_2m[address // _2M] += sign * size
        self._in_1g[address // _1G] += sign * size
        self.used_bytes += sign * size

    def free(self, address: int) -> PageSize:
        """Release the block that starts at ``address``; returns its size."""
        if self.buddy is not None:
            freed = PageSize(self.buddy.free(address))
            self.used_bytes -= freed
            return freed
        size = self._blocks.pop(address, None)
        if size is None:
            raise AddressError(f"no allocated block starts at {address:#x}")
        self._account(address, size, -1)
        if self.policy == "recycle" and size == PageSize.SIZE_4K:
            self._recycled.append(address)
        return size

    def _aged(self, address: int) -> int:
        assert self.buddy is not None
        self.used_bytes = self.buddy.used_pages * PAGE_SIZE
        return address

    def alloc_pages(self, count: int) -> npt.NDArray[np.int64]:
        """``count`` 4 KiB blocks, in the order ``count`` calls of :meth:`alloc` would give
        them (in bulk for the ``aged`` policy)."""
        if self.buddy is not None:
            return self._aged_array(self.buddy.alloc_pages(count))
        return np.array([self.alloc() for _ in range(count)], np.int64)

    def _aged_array(self, addresses: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        assert self.buddy is not None
        self.used_bytes = self.buddy.used_pages * PAGE_SIZE
        return addresses

    def alloc_run(self, length: int) -> int:
        """One guest-physical run of at least ``length`` bytes, 2 MiB-aligned (what a
        contiguous allocation such as CMA gives): ``aged``, the smallest buddy block that holds
        it (by compaction if need be); otherwise consecutive 2 MiB blocks, which must come out
        adjacent (:class:`OutOfMemory` if not)."""
        blocks = max(1, -(-length // _2M))
        if self.buddy is not None:
            return self._aged(self.buddy.alloc(_2M << (blocks - 1).bit_length()))
        got = [self.alloc(PageSize.SIZE_2M) for _ in range(blocks)]
        if got != [got[0] + i * _2M for i in range(blocks)]:
            raise OutOfMemory(f"no contiguous run of {blocks} 2 MiB blocks")
        return got[0]

    @property
    def stats(self) -> dict[str, int]:
        """The aged allocator's counters (sections aged, compactions, pages migrated, ...);
        empty for the other policies."""
        return dict(self.buddy.stats) if self.buddy is not None else {}
