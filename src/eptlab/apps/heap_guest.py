"""The guest side of the rotating-trap debugger: a kernel heap whose allocator tells the
hypervisor what it owns (this module), and the program that uses it with injected bugs
(:mod:`eptlab.apps.heap_program`).

**The heap.** ``heap_pages`` guest-physical 4 KiB pages (2 MiB blocks from the guest kernel's
allocator, used through the direct map). Small objects (64 B to 2 KiB size classes) live in
slab pages of one class each, handed out from a per-class LIFO free list as SLUB does; the free
list is linked through the free objects themselves (word 0 of a free object holds the address of
the next one, or 0). Large objects (1 to ``max_large_pages`` pages) are page runs followed by a
*guard page* that is never owned (KFENCE-style), reused LIFO from per-size lists of free runs
linked the same way. Pages no allocation ever reached stay *never owned*.

**Ownership reports (our choice: the KFENCE-metadata way, not a GWP-ASan pool).** Rotating traps
sample *all* heap pages, so the hypervisor must know who owns every byte of them; only the guest
allocator knows that. It appends one 64-bit event per change to a ring page in guest memory
(``slab`` when a page becomes a slab of a class, ``alloc``, ``free``) and updates the ring's head
word; every ``batch`` events it executes a VMCALL so the hypervisor drains the ring. Batching
keeps notification exits rare, and it makes the hypervisor's view lag: the realistic source of
false alarms that the debugger's filter must remove (:mod:`eptlab.apps.trap_debugger`). A
GWP-ASan-style pool (the debugger owning a few guarded allocations) would need no reports but
could only watch the objects it hands out, not rotate over the whole heap.

The order inside each operation is the allocator's:

``alloc``
    take the free-list head (a *read* of its link word) or new pages; if the class had no free
    object, first turn a fresh page into a slab (``slab`` event, then one link *store* into every
    object of the page: allocator metadata written into memory nobody owns); then the ``alloc``
    event; then the new owner's header store (an 8-byte tag) and ``init_writes`` more stores of
    data (:func:`data_value`).
``free``
    the ``free`` event, then the link store into word 0 of the freed chunk (the old list head).

**Code sites.** Every access comes from an instruction: the allocator's few sites
(:data:`ALLOC_SITES`) and the program's :data:`PROGRAM_SITES` sites, offsets into the guest
kernel's text (the stream's ``ip`` adds the text base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..arch.bits import PAGE_SIZE, PageSize
from ..errors import ConfigError
from ..guest import DIRECT_MAP_BASE, GuestKernel, KernelImage
from ..hv import VCPU, Hypervisor

if TYPE_CHECKING:
    from .heap_program import HeapProgram, HeapWorkload

SIZE_CLASSES = (64, 128, 256, 512, 1024, 2048)
CLASS_WEIGHTS = (0.30, 0.25, 0.20, 0.12, 0.08, 0.05)
_CLASS_P = np.array(CLASS_WEIGHTS) / sum(CLASS_WEIGHTS)
PAGES_PER_BLOCK = int(PageSize.SIZE_2M) // PAGE_SIZE

# ownership events: op in bits 63:60, size in 59:40, guest-physical address in 39:0
EVENT_SLAB, EVENT_ALLOC, EVENT_FREE = 1, 2, 3
EVENT_NAMES = {EVENT_SLAB: "slab", EVENT_ALLOC: "alloc", EVENT_FREE: "free"}
RING_SLOTS = 511  # word 0 of the ring page is the head (events written so far)
FLUSH_HYPERCALL = 0x7D01  # "drain the ownership ring": RBX = the head
BUG_VALUE = 0xBAD << 52  # garbage bug values: 0xBADx_xxxx_xxxx_xxxx, never a heap pointer
TAG_VALUE = 0x7A6 << 52  # object headers: 0x7A6x_xxxx_xxxx_xxxx
_DM = DIRECT_MAP_BASE - (1 << 64)  # the direct map's base as a signed 64-bit GVA
U64 = (1 << 64) - 1
# code sites (offsets into the kernel text) of the allocator's accesses
ALLOC_SITES = {"pop": 0x1000, "slab": 0x1040, "free": 0x1100, "ring": 0x1180, "head": 0x11C0}
HEADER_SITE, INIT_SITE = 0x3_0000, 0x3_0040  # the new owner's header and init stores
PROGRAM_SITES = 64  # the program's load/store instructions: 0x4_0000 + 0x40 * k
PROGRAM_SITE_BASE = 0x4_0000


def data_value(rng: np.random.Generator) -> int:
    """What the program stores in its objects: data, neither 0, a small integer nor a heap
    pointer (the bugs' value classes are what a store into memory nobody owns looks like)."""
    return int(rng.integers(1 << 20, 1 << 62))


def program_site(k: int) -> int:
    """The text offset of the program's ``k``-th load/store instruction."""
    return PROGRAM_SITE_BASE + 0x40 * k


def encode_event(op: int, gpa: int, size: int) -> int:
    if op not in EVENT_NAMES or not 0 <= gpa < 1 << 40 or not 0 < size < 1 << 20:
        raise ConfigError("event", f"cannot encode op {op} at {gpa:#x} size {size}")
    return op << 60 | size << 40 | gpa


def decode_event(word: int) -> tuple[int, int, int]:
    """``(op, gpa, size)``."""
    return word >> 60, word & ((1 << 40) - 1), (word >> 40) & ((1 << 20) - 1)


def pointer(gpa: int) -> int:
    """The value of a guest pointer to ``gpa`` (its direct-map address)."""
    return (DIRECT_MAP_BASE + gpa) & U64


# -- the guest machine -----------------------------------------------------------------------------


class HeapGuest:
    """A booted guest: a hypervisor, a VM backed with 2 MiB EPT pages (no EPT A/D flags), a
    guest kernel whose kernel thread runs on ``vcpus`` vCPUs (one address space), the heap's
    2 MiB blocks and the ownership ring page, all backed and mapped in the kernel's direct map
    (so that the measured run has no lazy-backing exits and no demand faults)."""

    def __init__(self, *, heap_pages: int, seed: int = 0, vcpus: int = 1) -> None:
        if not 8 <= heap_pages <= 64 * PAGES_PER_BLOCK:
            raise ConfigError("heap_pages", f"{heap_pages} is not in 8..{64 * PAGES_PER_BLOCK}")
        if not 1 <= vcpus <= 8:
            raise ConfigError("vcpus", f"{vcpus} is not in 1..8")
        blocks = -(-heap_pages // PAGES_PER_BLOCK)
        memory = (blocks + 16) * int(PageSize.SIZE_2M)
        self.hv = Hypervisor(seed=seed)
        self.vm = self.hv.create_vm("guest", memory, backing=PageSize.SIZE_2M)
        image = KernelImage(code=2 << 20, rodata=2 << 20, data=2 << 20)
        self.kernel = GuestKernel(self.vm, seed=seed, image=image)
        proc = self.kernel.spawn("kworker")
        self.vcpus: list[VCPU] = []
        for _ in range(vcpus):
            self.vcpus.append(self.vm.add_vcpu(cr3=proc.cr3))
            self.kernel.switch_to(self.vcpus[-1], proc)
        self.vcpu = self.vcpus[0]
        self.text = self.kernel.kernel_base  # the kernel text's base: code sites are offsets
        self.blocks = [self.kernel.frames.alloc(PageSize.SIZE_2M) for _ in range(blocks)]
        self.pages = [b + i * PAGE_SIZE for b in self.blocks for i in range(PAGES_PER_BLOCK)]
        self.pages = self.pages[:heap_pages]
        self.ring = self.kernel.frames.alloc()
        for gpa in [*self.blocks, self.ring]:
            if self.vm.ept.lookup(gpa) is None:
                self.vm.back(gpa)
            self.vcpu.read_u64(DIRECT_MAP_BASE + gpa)  # the kernel maps its direct map

    def apply_boot(self, program: HeapProgram) -> None:
        """What the boot phase left in memory: the allocator's links and the objects' headers."""
        if program.pages != self.pages or program.ring != self.ring:
            raise ConfigError("program", "was built for a guest with another heap layout")
        for gpa, value in program.boot_stores:
            self.vm.write_u64(gpa, value)
        self.vm.write_u64(self.ring, 0)  # the ring starts empty: the boot events are registered

    def read(self, gpa: int) -> int:
        return self.vm.read_u64(gpa & ~7)


# -- the allocator ---------------------------------------------------------------------------------


class Sink(Protocol):
    """Where the allocator's memory effects go: the program being built, or boot memory."""

    def store(self, gpa: int, value: int, site: int) -> None: ...
    def read(self, gpa: int, site: int) -> None: ...
    def event(self, word: int) -> None: ...
    def mark(self) -> int: ...  # the current boundary (segments so far)


@dataclass
class Interval:
    """A span of program boundaries ``[lo, hi]`` during which ``target`` is unowned (or, in
    :attr:`HeapAllocator.lived`, owned)."""

    lo: int
    hi: int
    target: int  # chunk start, guard page or never-owned page (GPA)
    size: int


class HeapAllocator:
    """The guest allocator (see the module docstring). Its state is the ground truth."""

    def __init__(self, pages: list[int], rng: np.random.Generator, workload: HeapWorkload) -> None:
        self.pages, self.rng, self.w = pages, rng, workload
        self.fresh = 0  # next never-used page index (bump)
        self.free_objects: dict[int, list[int]] = {c: [] for c in SIZE_CLASSES}  # LIFO: end
        self.free_runs: dict[int, list[int]] = {}  # pages -> LIFO of run starts
        self.live_start = np.zeros(1024, np.int64)  # live objects, for random picks
        self.live_size = np.zeros(1024, np.int64)
        self.live_index: dict[int, int] = {}
        self.tags: dict[int, int] = {}  # live object -> its header tag
        self.allocations = 0
        # ground-truth history, in program boundaries
        self.freed_since: dict[int, tuple[int, int]] = {}  # chunk -> (free end, size)
        self.uaf: list[Interval] = []
        self.guard_since: dict[int, tuple[int, int]] = {}  # large object -> (alloc end, guard)
        self.overflow: list[Interval] = []
        self.guards: set[int] = set()
        self.live_since: dict[int, int] = {}  # live object -> alloc boundary
        self.lived: list[Interval] = []  # closed lifetimes (pointers to live objects)
        self.skipped: list[int] = []

    @property
    def live(self) -> int:
        return len(self.live_index)

    # -- live-object bookkeeping ----------------------------------------------------------------

    def _add_live(self, start: int, size: int) -> None:
        n = self.live
        if n == self.live_start.shape[0]:
            self.live_start = np.resize(self.live_start, 2 * n)
            self.live_size = np.resize(self.live_size, 2 * n)
        self.live_start[n], self.live_size[n] = start, size
        self.live_index[start] = n

    def _remove_live(self, start: int) -> int:
        i = self.live_index.pop(start)
        last = self.live
        size = int(self.live_size[i])
        if i != last:
            moved = int(self.live_start[last])
            self.live_start[i], self.live_size[i] = moved, self.live_size[last]
            self.live_index[moved] = i
        return size

    # -- pages -------------------------------------------------------------------------------------

    def _take_fresh(self, count: int) -> int | None:
        """``count`` never-used pages, contiguous (inside one 2 MiB block); None when full."""
        i = self.fresh
        if i // PAGES_PER_BLOCK != (i + count - 1) // PAGES_PER_BLOCK:
            block_end = (i // PAGES_PER_BLOCK + 1) * PAGES_PER_BLOCK
            if block_end + count > len(self.pages):
                return None
            self.skipped += self.pages[i:block_end]  # they stay never owned
            i = block_end
        if i + count > len(self.pages):
            return None
        self.fresh = i + count
        return self.pages[i]

    def never_owned(self) -> list[int]:
        """Pages no allocation has reached (the bump pointer's tail, skipped block ends)."""
        return [*self.skipped, *self.pages[self.fresh :]]

    # -- operations --------------------------------------------------------------------------------

    def alloc(self, sink: Sink) -> bool:
        """Allocate one object of a random size; False when the heap is full."""
        rng = self.rng
        if rng.random() < self.w.large_share:
            return self._alloc_large(sink, int(rng.integers(1, self.w.max_large_pages + 1)))
        size = SIZE_CLASSES[int(rng.choice(len(SIZE_CLASSES), p=_CLASS_P))]
        return self._alloc_small(sink, size)

    def _alloc_small(self, sink: Sink, size: int) -> bool:
        free = self.free_objects[size]
        if not free:
            page = self._take_fresh(1)
            if page is None:
                return False
            sink.event(encode_event(EVENT_SLAB, page, size))
            objects = list(range(page, page + PAGE_SIZE, size))
            for obj, nxt in zip(objects, [*objects[1:], None], strict=True):
                link = 0 if nxt is None else pointer(nxt)
                sink.store(obj, link, ALLOC_SITES["slab"])  # freelist init
            free.extend(reversed(objects))  # the head (end of the list) is the first object
        start = free.pop()
        self._reused(start, sink.mark())
        sink.read(start, ALLOC_SITES["pop"])  # the allocator follows the link
        self._allocated(sink, start, size)
        return True

    def _alloc_large(self, sink: Sink, pages: int) -> bool:
        size = pages * PAGE_SIZE
        runs = self.free_runs.setdefault(pages, [])
        if runs:
            start = runs.pop()
            self._reused(start, sink.mark())
            sink.read(start, ALLOC_SITES["pop"])
        else:
            got = self._take_fresh(pages + 1)
            if got is None:
                return False
            start = got
            self.guards.add(start + size)
        self._allocated(sink, start, size)
        self.guard_since[start] = (sink.mark(), start + size)
        return True

    def _allocated(self, sink: Sink, start: int, size: int) -> None:
        sink.event(encode_event(EVENT_ALLOC, start, size))
        self.allocations += 1
        tag = TAG_VALUE | (self.allocations * 0x9E3779B1) & ((1 << 52) - 1)
        sink.store(start, tag, HEADER_SITE)  # the owner's header
        self.tags[start] = tag
        for off in self.rng.integers(1, size // 8, self.w.init_writes).tolist():
            sink.store(start + 8 * int(off), data_value(self.rng), INIT_SITE)
        self._add_live(start, size)
        self.live_since[start] = sink.mark()

    def free(self, sink: Sink) -> None:
        """Free one random live object."""
        i = int(self.rng.integers(self.live))
        start = int(self.live_start[i])
        size = self._remove_live(start)
        del self.tags[start]
        self.lived.append(Interval(self.live_since.pop(start), sink.mark(), start, size))
        if start in self.guard_since:
            since, guard = self.guard_since.pop(start)
            self.overflow.append(Interval(since, sink.mark(), guard, PAGE_SIZE))
        sink.event(encode_event(EVENT_FREE, start, size))
        if size < PAGE_SIZE:
            free = self.free_objects[size]
        else:
            free = self.free_runs.setdefault(size // PAGE_SIZE, [])
        link = pointer(free[-1]) if free else 0
        sink.store(start, link, ALLOC_SITES["free"])  # link into the free list
        free.append(start)
        self.freed_since[start] = (sink.mark(), size)

    def _reused(self, start: int, boundary: int) -> None:
        if start in self.freed_since:
            since, size = self.freed_since.pop(start)
            self.uaf.append(Interval(since, boundary, start, size))

    def close(self, end: int) -> None:
        """End of the program: intervals still open end there."""
        for start, (since, size) in self.freed_since.items():
            self.uaf.append(Interval(since, end, start, size))
        for since, guard in self.guard_since.values():
            self.overflow.append(Interval(since, end, guard, PAGE_SIZE))
        for start, since in self.live_since.items():
            size = int(self.live_size[self.live_index[start]])
            self.lived.append(Interval(since, end, start, size))
        self.freed_since.clear()
        self.guard_since.clear()
        self.live_since.clear()

    def step(self, sink: Sink) -> None:
        """One alloc or free, steering the live count towards the target."""
        target = self.w.live_objects
        p_alloc = min(0.9, max(0.1, 0.5 + 0.5 * (target - self.live) / target))
        wants_alloc = self.live == 0 or self.rng.random() < p_alloc
        if wants_alloc and (self.alloc(sink) or self.live == 0):
            return
        self.free(sink)  # (also when the heap is full)


def expected_detection(
    bug_positions: list[list[int]],
    bug_pages: list[list[int]],
    *,
    pages: int,
    sampled: int,
    period: int,
) -> float:
    """The sampling-theory detection rate (the KFENCE/GWP-ASan argument): each period traps a
    uniform random ``sampled`` of ``pages`` pages, so a bug whose writes hit ``m_t`` distinct
    pages in period ``t`` escapes with probability prod_t C(pages - m_t, sampled) / C(pages,
    sampled). Returns the mean over bugs of 1 - that."""
    if not bug_positions:
        return 0.0
    total = 0.0
    for positions, hit in zip(bug_positions, bug_pages, strict=True):
        per_period: dict[int, set[int]] = {}
        for pos, page in zip(positions, hit, strict=True):
            per_period.setdefault(pos // period, set()).add(page)
        miss = 1.0
        for distinct in per_period.values():
            for i in range(len(distinct)):
                miss *= max(0.0, (pages - sampled - i) / (pages - i))
        total += 1.0 - miss
    return total / len(bug_positions)
