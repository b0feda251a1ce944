"""A binary buddy allocator that can be aged, so its placements look like a long-running system's.

The allocator follows Linux's zoned buddy allocator (Documentation/mm/physical_memory.rst and
page_allocator.rst; M. Gorman, *Understanding the Linux Virtual Memory Manager*, 2004, ch. 6
"Physical Page Allocation"): one free list per order (order k = 2^k contiguous, naturally aligned
4 KiB frames), an allocation takes the head of the smallest non-empty list of sufficient order
and splits it, putting the upper halves on the lower lists (``expand()``), and a free merges a
block with its buddy (the block at ``address ^ size``) for as long as the buddy is free. Free
lists are LIFO, as the kernel's are (a freed page goes to the head and is the next one handed
out). Orders run 0..18 (4 KiB .. 1 GiB); Linux's page allocator stops at order 10 (MAX_ORDER) and
gets 1 GiB pages from boot-time reservations (hugetlbfs ``hugepagesz=1G``), which is what a
request larger than an aged section gets here (see below).

**Aging.** Memory is aged in sections (``AgingConfig.section_mib``, 256 MiB by default), lazily,
from the bottom of the range, when the sections aged so far cannot serve a request. A section is
aged on its own buddy allocator, deterministically from ``(seed, section)``:

1. *boot* (the first section only): the kernel takes ``boot_mib`` (at most a 16th of the
   section) of unmovable memory at the bottom (image, memmap, early allocations), never freed;
2. *fill*: "other processes" allocate blocks of mixed orders (``orders``: weights by bytes:
   mostly single pages, some 8-32 KiB kernel allocations, some 2 MiB transparent huge pages)
   until ``in_use`` of the section is allocated;
3. *churn*: ``rounds`` times, a random ``churn`` fraction of the others' blocks is freed (in
   random order) and the section is filled up to ``in_use`` again;
4. *settle*: random blocks are freed until the others hold ``resident`` of the section; what
   stays is movable memory (anonymous pages, page cache) spread over the whole section.

Afterwards the free lists hold the freed blocks in the random order they were freed, so
consecutive 4 KiB allocations land on scattered frames, and free 2 MiB blocks are scarce: a
2 MiB block is free only if none of its 512 frames is still held. Only ``patterns`` distinct
section patterns are aged per seed; further sections reuse them (shifted), which keeps aging a
multi-GiB range affordable. A process-wide cache keeps aged patterns, so building many spaces
with the same seed ages once.

**Large blocks** (2 MiB, 1 GiB). With no free block of the requested order, the allocator
*compacts* (Linux's direct compaction, Gorman ch. 6 and ``mm/compaction.c``): it picks the
aligned region holding the fewest frames of other processes and nothing of its owner, migrates
those movable blocks elsewhere (free them, allocate them anew outside the region) and hands the
region out; ``stats["compactions"]`` and ``stats["pages_migrated"]`` count it. A request larger
than a section (1 GiB with the default 256 MiB sections) is served from memory above the aged
sections that nothing has touched since boot (a boot-time reservation, as hugetlbfs gigantic
pages are on Linux): ``stats["gigantic_reserved"]``. No request falls back to smaller pages.

Bookkeeping: a dict per order (the free list) and three int8 arrays over the 4 KiB frames of the
aged sections only (state, order of the owner's block starting there, order of another
process's block starting there): a 1 TiB range that ages 1 GiB keeps under 1 MiB.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE
from ..errors import AddressError, ConfigError, OutOfMemory

MAX_ORDER = 18
"""Largest order: 2^18 frames of 4 KiB = 1 GiB."""
HUGE_ORDER = 9  # 2 MiB

FREE, OTHER, PINNED, OWNED = 0, 1, 2, 3
"""Frame states: free, held by another (movable), held since boot (unmovable), handed out."""

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class AgingConfig:
    """How a section of memory is aged before the allocator's owner uses it (module docstring).

    ``orders``: (order, weight) pairs; the weight is the share of the others' *bytes* allocated
    in blocks of that order."""

    section_mib: int = 256
    boot_mib: int = 4
    in_use: float = 0.97
    rounds: int = 3
    churn: float = 0.5
    resident: float = 0.25
    orders: tuple[tuple[int, float], ...] = ((0, 0.83), (1, 0.05), (2, 0.05), (3, 0.05), (9, 0.02))
    patterns: int = 2

    def __post_init__(self) -> None:
        mib = self.section_mib
        if mib < 4 or mib & (mib - 1) or mib > 1024:
            raise ConfigError("section_mib", f"{mib} is not a power of two in 4..1024")
        if not 0 <= self.boot_mib < mib:
            raise ConfigError("boot_mib", f"{self.boot_mib} is not in 0..section_mib")
        for name in ("in_use", "churn", "resident"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(name, f"{value} is not a fraction in [0, 1)")
        if self.resident > self.in_use:
            raise ConfigError("resident", f"{self.resident} exceeds in_use {self.in_use}")
        if self.rounds < 0 or self.patterns < 1:
            raise ConfigError("rounds/patterns", "rounds must be >= 0 and patterns >= 1")
        if not self.orders or any(
            not 0 <= o <= HUGE_ORDER or w < 0 for o, w in self.orders
        ) or sum(w for _, w in self.orders) <= 0:
            raise ConfigError("orders", f"{self.orders}: orders in 0..9, weights >= 0, some > 0")

    @property
    def section_order(self) -> int:
        return (self.section_mib << 20 >> PAGE_SHIFT).bit_length() - 1


class _Free:
    """Free lists, one LIFO ordered set per order, with buddy merging and splitting. Addresses
    are frame numbers (not bytes) here."""

    def __init__(self) -> None:
        self.lists: list[dict[int, None]] = [{} for _ in range(MAX_ORDER + 1)]
        self.pages = 0

    def add_range(self, first: int, end: int) -> None:
        """Put the maximal aligned blocks of frames ``[first, end)`` on the lists."""
        pfn = first
        while pfn < end:
            order = min(MAX_ORDER, (pfn & -pfn).bit_length() - 1 if pfn else MAX_ORDER)
            while pfn + (1 << order) > end:
                order -= 1
            self.lists[order][pfn] = None
            self.pages += 1 << order
            pfn += 1 << order

    def take(self, order: int) -> int | None:
        """Allocate a block of ``order`` (smallest sufficient list, split); None if none."""
        lists = self.lists
        for j in range(order, MAX_ORDER + 1):
            if lists[j]:
                pfn = lists[j].popitem()[0]
                while j > order:  # expand(): the upper halves go back on the lists
                    j -= 1
                    lists[j][pfn + (1 << j)] = None
                self.pages -= 1 << order
                return pfn
        return None

    def put(self, pfn: int, order: int) -> None:
        """Free a block, merging it with its buddy while the buddy is free."""
        lists = self.lists
        self.pages += 1 << order
        while order < MAX_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy not in lists[order]:
                break
            del lists[order][buddy]
            pfn &= ~(1 << order)
            order += 1
        lists[order][pfn] = None

    def take_exact(self, pfn: int, order: int) -> bool:
        """Remove the block ``(pfn, order)`` from the free memory if it is wholly free."""
        lists = self.lists
        for j in range(order, MAX_ORDER + 1):
            head = pfn & ~((1 << j) - 1)
            if head in lists[j]:
                del lists[j][head]
                while j > order:  # split down to the block, freeing the other halves
                    j -= 1
                    half = head + (1 << j)
                    if pfn >= half:
                        lists[j][head] = None
                        head = half
                    else:
                        lists[j][half] = None
                self.pages -= 1 << order
                return True
        return False

    def blocks(self) -> tuple[I64, I64]:
        """All free blocks as (frame numbers, orders), list by list, in LIFO order."""
        pfns, orders = [], []
        for order, lst in enumerate(self.lists):
            pfns.append(np.fromiter(lst, np.int64, len(lst)))
            orders.append(np.full(len(lst), order, np.int64))
        return np.concatenate(pfns), np.concatenate(orders)


@dataclass(frozen=True)
class _Pattern:
    """An aged section, in frame numbers relative to its aligned window."""

    free_pfns: I64
    free_orders: I64
    other_pfns: I64
    other_orders: I64
    pinned_pfns: I64


def _byte_weights(config: AgingConfig) -> tuple[I64, npt.NDArray[np.float64]]:
    orders = np.array([o for o, _ in config.orders], np.int64)
    weights = np.array([w for _, w in config.orders], np.float64) / (1 << orders)
    return orders, weights / weights.sum()


@lru_cache(maxsize=64)
def _age(
    config: AgingConfig, seed: int, salt: int, pattern: int, first: int, end: int, boot: bool
) -> _Pattern:
    """Age frames ``[first, end)`` of one section window (steps in the module docstring)."""
    rng = np.random.default_rng([seed, salt, pattern, first, end, 0xA6ED])
    free = _Free()
    free.add_range(first, end)
    pages = end - first
    pinned: list[int] = []
    if boot:  # the kernel's early allocations (contiguous where the range allows)
        for _ in range(min(pages // 16, (config.boot_mib << 20) >> PAGE_SHIFT)):
            pfn = free.take(0)
            assert pfn is not None
            pinned.append(pfn)
    others: dict[int, int] = {}
    orders, probs = _byte_weights(config)
    held = [0]

    def fill(target: int) -> None:
        while held[0] < target:
            batch = rng.choice(orders, size=max(64, (target - held[0]) // 2), p=probs)
            before = held[0]
            for order in batch.tolist():
                pfn = free.take(order)
                if pfn is None:
                    continue  # no block of that order left: others take what there is
                others[pfn] = order
                held[0] += 1 << order
                if held[0] >= target:
                    return
            if held[0] == before:
                return  # no block of any order drawn is left

    def release(count: int) -> None:
        keys = list(others)
        for index in rng.permutation(len(keys))[:count].tolist():
            pfn = keys[index]
            order = others.pop(pfn)
            free.put(pfn, order)
            held[0] -= 1 << order

    fill(int(config.in_use * pages))
    for _ in range(config.rounds):
        release(int(config.churn * len(others)))
        fill(int(config.in_use * pages))
    target = int(config.resident * pages)
    while held[0] > target and others:
        share = (held[0] - target) / held[0]
        release(max(1, int(share * len(others))))
    free_pfns, free_orders = free.blocks()
    other_pfns = np.fromiter(others, np.int64, len(others))
    other_orders = np.fromiter(others.values(), np.int64, len(others))
    return _Pattern(free_pfns, free_orders, other_pfns, other_orders, np.array(pinned, np.int64))


class BuddyAllocator:
    """An aged buddy allocator over ``[base, base + size)``, with :class:`FrameAllocator`'s
    interface in bytes (``alloc(size)``, ``alloc_at``, ``free``) plus :meth:`alloc_pages`."""

    def __init__(
        self,
        size: int,
        *,
        base: int = 0,
        seed: int = 0,
        aging: AgingConfig | None = None,
        salt: str = "",
    ) -> None:
        """``salt`` tells apart allocators built from the same seed (a guest's and its host's
        must not age alike)."""
        if size <= 0 or size % PAGE_SIZE or base % PAGE_SIZE:
            raise ConfigError("size/base", "must be positive multiples of 4 KiB")
        self.aging = aging or AgingConfig()
        self.seed = seed
        self._salt = zlib.crc32(salt.encode())
        self._first = base >> PAGE_SHIFT
        self._end = (base + size) >> PAGE_SHIFT
        self._section = 1 << self.aging.section_order  # frames per section
        self._aged_end = self._first  # frames below this are aged (or reserved)
        self._sections = 0
        self._free = _Free()
        self._state = np.zeros(0, np.int8)  # per frame of [first, aged_end)
        self._head = np.zeros(0, np.int8)  # order of the other process's block starting there
        self._order = np.zeros(0, np.int8)  # order of the owner's block starting there, or -1
        self._candidates: dict[int, list[tuple[int, int]]] = {}  # order -> (cost, offset) heap
        self._covered: dict[int, int] = {}  # order -> frames offered to the heap so far
        self.stats: dict[str, int] = dict.fromkeys(
            ("sections_aged", "compactions", "pages_migrated", "gigantic_reserved"), 0
        )
        self.used_pages = 0

    # -- sections -----------------------------------------------------------------------------

    def _grow_state(self, end: int) -> None:
        grown = np.zeros(end - self._first, np.int8)
        grown[: len(self._state)] = self._state
        self._state = grown
        head = np.full(end - self._first, -1, np.int8)
        head[: len(self._head)] = self._head
        self._head = head
        owned = np.full(end - self._first, -1, np.int8)
        owned[: len(self._order)] = self._order
        self._order = owned

    def _age_next(self) -> bool:
        """Age the next section and add its free memory; False when the range is used up."""
        start = self._aged_end
        if start >= self._end:
            return False
        window = start - start % self._section
        end = min(self._end, window + self._section)
        index = self._sections
        self._sections += 1
        self.stats["sections_aged"] += 1
        p = _age(
            self.aging,
            self.seed,
            self._salt,
            index % self.aging.patterns,
            start - window,
            end - window,
            index == 0,
        )
        self._grow_state(end)
        state = self._state
        state[p.pinned_pfns + window - self._first] = PINNED
        offsets = p.other_pfns + window - self._first
        self._head[offsets] = p.other_orders
        if len(offsets):
            span = np.repeat(offsets, 1 << p.other_orders) + _ramp(p.other_orders)
            state[span] = OTHER
        lists = self._free.lists
        for pfn, order in zip((p.free_pfns + window).tolist(), p.free_orders.tolist(),
                              strict=True):
            lists[order][pfn] = None
        self._free.pages += int((1 << p.free_orders).sum())
        self._aged_end = end
        return True

    def _reserve_gigantic(self, order: int) -> int | None:
        """A block above the aged sections, untouched since boot (module docstring)."""
        size = 1 << order
        pfn = -(-self._aged_end // size) * size
        if pfn + size > self._end:
            return None
        if pfn > self._aged_end:  # the gap below it joins the free memory as it is
            self._grow_state(pfn)
            self._free.add_range(self._aged_end, pfn)
        self._grow_state(pfn + size)
        self._aged_end = pfn + size
        self._sections = -(-(self._aged_end - self._first) // self._section)
        self.stats["gigantic_reserved"] += 1
        return pfn

    # -- allocation ---------------------------------------------------------------------------

    def _mark(self, pfn: int, order: int, value: int) -> None:
        lo = pfn - self._first
        self._state[lo : lo + (1 << order)] = value

    def _own(self, pfn: int, order: int) -> int:
        self._order[pfn - self._first] = order
        self._mark(pfn, order, OWNED)
        self.used_pages += 1 << order
        return pfn << PAGE_SHIFT

    def alloc_order(self, order: int) -> int:
        """Allocate a block of 2^``order`` frames; returns its address."""
        if not 0 <= order <= MAX_ORDER:
            raise ConfigError("order", f"{order} is not in 0..{MAX_ORDER}")
        while True:
            pfn = self._free.take(order)
            if pfn is not None:
                return self._own(pfn, order)
            if order > self.aging.section_order:
                pfn = self._reserve_gigantic(order)
                if pfn is None:
                    break
                return self._own(pfn, order)
            if order >= HUGE_ORDER and self._compact(order):
                pfn = self._free.take(order)
                assert pfn is not None
                return self._own(pfn, order)
            if not self._age_next():
                break
        raise OutOfMemory(
            f"no free order-{order} block in {(self._end - self._first) << PAGE_SHIFT:#x} bytes"
        )

    def alloc(self, size: int = PAGE_SIZE) -> int:
        return self.alloc_order(_order_of(size))

    def alloc_pages(self, count: int) -> I64:
        """``count`` 4 KiB frames (addresses), in the order single allocations would give them:
        the order-0 list first, then the blocks of the smallest non-empty list, each taken
        whole and its frames in ascending order (what repeated ``expand()`` splitting hands
        out), the last one split as ``expand()`` would leave it."""
        parts: list[I64] = []
        lists, free, need = self._free.lists, self._free, count
        while need:
            j = next((j for j in range(MAX_ORDER + 1) if lists[j]), None)
            if j is None:
                pfn = self.alloc_order(0) >> PAGE_SHIFT  # ages more memory (or runs out)
                self.free(pfn << PAGE_SHIFT)
                continue
            lst, size = lists[j], 1 << j
            whole = min(len(lst), need >> j)
            if whole:
                heads = np.fromiter((lst.popitem()[0] for _ in range(whole)), np.int64, whole)
                parts.append((heads[:, None] + np.arange(size, dtype=np.int64)).ravel())
                free.pages -= whole * size
                need -= whole * size
                continue
            block = lst.popitem()[0]  # need < size: split it
            parts.append(np.arange(block, block + need, dtype=np.int64))
            rest, at = size - need, block + need  # the tail, as expand() leaves it
            for i in range(j):
                if rest >> i & 1:
                    lists[i][at] = None
                    at += 1 << i
            free.pages -= need
            need = 0
        out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self._state[out - self._first] = OWNED
        self._order[out - self._first] = 0
        self.used_pages += count
        return out << PAGE_SHIFT

    def alloc_at(self, address: int, size: int = PAGE_SIZE) -> int:
        """Allocate the block at ``address`` (aligned, not the owner's already); blocks of
        other processes in it are migrated away."""
        order = _order_of(size)
        pfn = address >> PAGE_SHIFT
        if address % size or pfn < self._first or pfn + (1 << order) > self._end:
            raise AddressError(f"{address:#x} is not an aligned {size:#x}-byte block in range")
        if pfn >= self._aged_end + 8 * self._section:  # far above: untouched since boot
            self._grow_state(pfn + (1 << order))
            self._free.add_range(self._aged_end, pfn + (1 << order))
            self._aged_end = pfn + (1 << order)
        while self._aged_end < pfn + (1 << order) and self._age_next():
            pass
        lo = pfn - self._first
        if (self._state[lo : lo + (1 << order)] >= PINNED).any():
            raise OutOfMemory(f"block at {address:#x} is already in use")
        self._claim(pfn, order)
        return self._own(pfn, order)

    def free(self, address: int) -> int:
        """Release the block that starts at ``address``; returns its size in bytes."""
        pfn = address >> PAGE_SHIFT
        lo = pfn - self._first
        order = int(self._order[lo]) if 0 <= lo < len(self._order) else -1
        if order < 0 or address % PAGE_SIZE:
            raise AddressError(f"no allocated block starts at {address:#x}")
        self._order[lo] = -1
        self._mark(pfn, order, FREE)
        self._free.put(pfn, order)
        self.used_pages -= 1 << order
        return PAGE_SIZE << order

    def owns(self, address: int) -> bool:
        """Whether ``address`` lies in a block this allocator handed out."""
        lo = (address >> PAGE_SHIFT) - self._first
        return 0 <= lo < len(self._state) and self._state[lo] == OWNED

    @property
    def blocks(self) -> dict[int, int]:
        """Blocks handed out: address -> size in bytes."""
        starts = np.flatnonzero(self._order >= 0)
        return {
            (int(lo) + self._first) << PAGE_SHIFT: PAGE_SIZE << int(self._order[lo])
            for lo in starts.tolist()
        }

    # -- compaction -----------------------------------------------------------------------------

    def _compact(self, order: int) -> bool:
        """Free an aligned 2^order region by migrating other processes' blocks out of it: the
        region with the fewest such frames and none of the owner's (a heap of candidates per
        order, each re-checked when it comes up, since costs change as memory is used)."""
        size = 1 << order
        heap = self._candidates.setdefault(order, [])
        lo = -(-self._first // size) * size - self._first  # first aligned region (offset)
        covered = self._covered.get(order, lo)
        hi = (self._aged_end - self._first) // size * size
        if hi > covered:  # regions of newly aged memory join the heap
            regions = self._state[covered:hi].reshape(-1, size)
            costs = (regions == OTHER).sum(axis=1)
            ok = ~(regions >= PINNED).any(axis=1)
            for k in np.flatnonzero(ok).tolist():
                heapq.heappush(heap, (int(costs[k]), covered + k * size))
            self._covered[order] = hi
        while heap:
            cost, offset = heapq.heappop(heap)
            region = self._state[offset : offset + size]
            if (region >= PINNED).any():
                continue  # the owner took part of it since
            now = int((region == OTHER).sum())
            if now > cost and heap and now > heap[0][0]:
                heapq.heappush(heap, (now, offset))  # dearer than it was: look again later
                continue
            if self._free.pages - (size - now) < now:
                heapq.heappush(heap, (now, offset))
                return False  # nowhere to move its pages: age more memory first
            pfn = self._first + offset
            self._claim(pfn, order)
            self._free.put(pfn, order)
            self.stats["compactions"] += 1
            return True
        return False

    def _claim(self, pfn: int, order: int) -> None:
        """Take the region ``(pfn, order)`` out of the free memory, migrating the blocks of
        other processes in it (or around it) to frames outside it."""
        lo, size = pfn - self._first, 1 << order
        starts = np.flatnonzero(self._head[lo : lo + size] >= 0) + lo
        if self._state[lo] == OTHER and self._head[lo] < 0:  # inside a larger block
            for j in range(order + 1, HUGE_ORDER + 1):
                head = lo & ~((1 << j) - 1)
                if self._head[head] >= 0:
                    starts = np.append(starts, head)
                    break
        movers = [(int(h) + self._first, int(self._head[h])) for h in starts.tolist()]
        for head, got in movers:
            self._head[head - self._first] = -1
            self._mark(head, got, FREE)
            self._free.put(head, got)
        if not self._free.take_exact(pfn, order):
            raise AssertionError(f"region {pfn:#x}/{order} is not free after migration")
        self._mark(pfn, order, OWNED)  # provisional: keeps migrated blocks out
        take = self._free.take
        for _, got in movers:
            new = take(got)
            while new is None and self._age_next():
                new = take(got)
            if new is not None:  # (aging may have grown the arrays: no stale references)
                self._head[new - self._first] = got
                self._mark(new, got, OTHER)
            else:  # no free block that large: the block moves as single pages (a THP split)
                for _ in range(1 << got):
                    page = take(0)
                    if page is None:
                        raise OutOfMemory("no memory left to migrate other processes' pages to")
                    self._head[page - self._first] = 0
                    self._mark(page, 0, OTHER)
            self.stats["pages_migrated"] += 1 << got
        self._mark(pfn, order, FREE)

    # -- reports --------------------------------------------------------------------------------

    def fragmentation(self, order: int = HUGE_ORDER) -> dict[str, float]:
        """Free memory of the aged sections and how usable it is for blocks of ``order``:
        ``free_in_order_fraction`` (share of free memory in free blocks of at least ``order``)
        and Gorman and Whitcroft's unusable free space index, its complement (``F_u`` in
        "The What, The Why and The Where To of Anti-Fragmentation", OLS 2006)."""
        pfns, orders = self._free.blocks()
        total = int((1 << orders).sum())
        usable = int((1 << orders[orders >= order]).sum())
        share = usable / total if total else 0.0
        return {
            "aged_bytes": float(len(self._state) << PAGE_SHIFT),
            "free_bytes": float(total << PAGE_SHIFT),
            "free_blocks": float(len(pfns)),
            "free_in_order_fraction": round(share, 4),
            "unusable_free_index": round(1.0 - share, 4) if total else 0.0,
        }


def _ramp(orders: I64) -> I64:
    """For blocks of ``orders``: 0..2^order-1 for each, concatenated."""
    counts = 1 << orders
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    ramp: I64 = np.arange(int(counts.sum()), dtype=np.int64) - starts
    return ramp


def _order_of(size: int) -> int:
    if size < PAGE_SIZE or size & (size - 1):
        raise ConfigError("size", f"{size} is not a power-of-two multiple of 4 KiB")
    return (size >> PAGE_SHIFT).bit_length() - 1


def consecutive_fraction(addresses: Iterable[int], step: int = PAGE_SIZE) -> float:
    """Share of neighbours in ``addresses`` that are ``step`` apart (1.0: one contiguous run)."""
    a = np.fromiter(addresses, np.int64)
    if len(a) < 2:
        return 1.0
    return float(np.mean(np.diff(a) == step))


__all__ = [
    "AgingConfig",
    "BuddyAllocator",
    "MAX_ORDER",
    "consecutive_fraction",
]
