"""The guest side of the rotating-trap debugger: a kernel heap whose allocator tells the
hypervisor what it owns, a program that uses it, and wild-pointer bugs injected into it.

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
    event; then the new owner's header store (an 8-byte tag) and ``init_writes`` more writes.
``free``
    the ``free`` event, then the link store into word 0 of the freed chunk (the old list head).

**The program** alternates bursts of reads and writes to random live objects (about
``accesses_per_op`` accesses, ``write_share`` of them writes) with one alloc or free, steering
the live count towards ``live_objects``. Before it, a boot phase (:attr:`HeapProgram.boot_stores`,
:attr:`HeapProgram.boot_events`) fills the heap the same way without running accesses.

**Bugs** (ground truth kept aside, for scoring only): each of ``bugs`` defects writes a garbage
value (``0xBAD...``) ``k`` times (geometric, mean ``writes_per_bug``), spread over ``bug_span``
accesses, to memory that nobody owns at each of those moments: a *use-after-free* (a dangling
pointer into a chunk that was freed and is not yet reused), an *overflow* (past the end of a live
large object into its guard page) or a *wild* pointer (into a page never owned). Writes are
placed only where the target is unowned for the whole time; a chunk's reuse ends its bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SIZE, PageSize
from ..errors import ConfigError
from ..guest import DIRECT_MAP_BASE, GuestKernel, KernelImage
from ..hv import Hypervisor, Vmcall

SIZE_CLASSES = (64, 128, 256, 512, 1024, 2048)
CLASS_WEIGHTS = (0.30, 0.25, 0.20, 0.12, 0.08, 0.05)
_CLASS_P = np.array(CLASS_WEIGHTS) / sum(CLASS_WEIGHTS)
PAGES_PER_BLOCK = int(PageSize.SIZE_2M) // PAGE_SIZE

# ownership events: op in bits 63:60, size in 59:40, guest-physical address in 39:0
EVENT_SLAB, EVENT_ALLOC, EVENT_FREE = 1, 2, 3
EVENT_NAMES = {EVENT_SLAB: "slab", EVENT_ALLOC: "alloc", EVENT_FREE: "free"}
RING_SLOTS = 511  # word 0 of the ring page is the head (events written so far)
FLUSH_HYPERCALL = 0x7D01  # "drain the ownership ring": RBX = the head
BUG_KINDS = ("use-after-free", "overflow", "wild")
BUG_VALUE = 0xBAD << 52  # bug writes store 0xBADx_xxxx_xxxx_xxxx: never a heap pointer
TAG_VALUE = 0x7A6 << 52  # object headers: 0x7A6x_xxxx_xxxx_xxxx
_DM = DIRECT_MAP_BASE - (1 << 64)  # the direct map's base as a signed 64-bit GVA
U64 = (1 << 64) - 1


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
    guest kernel with one kernel thread on one vCPU, the heap's 2 MiB blocks and the ownership
    ring page, all backed and mapped in the kernel's direct map (so that the measured run has no
    lazy-backing exits and no demand faults)."""

    def __init__(self, *, heap_pages: int, seed: int = 0) -> None:
        if not 8 <= heap_pages <= 64 * PAGES_PER_BLOCK:
            raise ConfigError("heap_pages", f"{heap_pages} is not in 8..{64 * PAGES_PER_BLOCK}")
        blocks = -(-heap_pages // PAGES_PER_BLOCK)
        memory = (blocks + 16) * int(PageSize.SIZE_2M)
        self.hv = Hypervisor(seed=seed)
        self.vm = self.hv.create_vm("guest", memory, backing=PageSize.SIZE_2M)
        image = KernelImage(code=2 << 20, rodata=2 << 20, data=2 << 20)
        self.kernel = GuestKernel(self.vm, seed=seed, image=image)
        proc = self.kernel.spawn("kworker")
        self.vcpu = self.vm.add_vcpu(cr3=proc.cr3)
        self.kernel.switch_to(self.vcpu, proc)
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

    def store(self, gpa: int, value: int) -> None: ...  # a store whose value is modelled
    def write(self, gpa: int) -> None: ...  # a store whose value is not
    def read(self, gpa: int) -> None: ...
    def event(self, word: int) -> None: ...
    def mark(self) -> int: ...  # the current boundary (segments so far)


@dataclass
class Interval:
    """A span of program boundaries ``[lo, hi]`` during which ``target`` is unowned."""

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
                sink.store(obj, 0 if nxt is None else pointer(nxt))  # freelist init
            free.extend(reversed(objects))  # the head (end of the list) is the first object
        start = free.pop()
        self._reused(start, sink.mark())
        sink.read(start)  # the allocator follows the link
        self._allocated(sink, start, size)
        return True

    def _alloc_large(self, sink: Sink, pages: int) -> bool:
        size = pages * PAGE_SIZE
        runs = self.free_runs.setdefault(pages, [])
        if runs:
            start = runs.pop()
            self._reused(start, sink.mark())
            sink.read(start)
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
        sink.store(start, tag)  # the owner's header
        self.tags[start] = tag
        for off in self.rng.integers(1, size // 8, self.w.init_writes).tolist():
            sink.write(start + 8 * int(off))
        self._add_live(start, size)

    def free(self, sink: Sink) -> None:
        """Free one random live object."""
        i = int(self.rng.integers(self.live))
        start = int(self.live_start[i])
        size = self._remove_live(start)
        del self.tags[start]
        if start in self.guard_since:
            since, guard = self.guard_since.pop(start)
            self.overflow.append(Interval(since, sink.mark(), guard, PAGE_SIZE))
        sink.event(encode_event(EVENT_FREE, start, size))
        if size < PAGE_SIZE:
            free = self.free_objects[size]
        else:
            free = self.free_runs.setdefault(size // PAGE_SIZE, [])
        sink.store(start, pointer(free[-1]) if free else 0)  # link into the free list
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
        self.freed_since.clear()
        self.guard_since.clear()

    def step(self, sink: Sink) -> None:
        """One alloc or free, steering the live count towards the target."""
        target = self.w.live_objects
        p_alloc = min(0.9, max(0.1, 0.5 + 0.5 * (target - self.live) / target))
        wants_alloc = self.live == 0 or self.rng.random() < p_alloc
        if wants_alloc and (self.alloc(sink) or self.live == 0):
            return
        self.free(sink)  # (also when the heap is full)


# -- the workload and its program ------------------------------------------------------------------

Segment = tuple[str, int, int, int]
"""One step of the program: ``("touch", index, 0, 0)`` (a burst, in :attr:`HeapProgram.touches`),
``("store", gpa, value, 0)``, ``("write", gpa, 0, 0)``, ``("read", gpa, 0, 0)``,
``("event", word, 0, 0)`` (an ownership report) or ``("fire", gpa, value, bug)`` (a bug write).
Bugs are placed at boundaries between segments."""


class _Boot:
    """The boot phase: stores go straight to memory, events to the registration list."""

    def __init__(self) -> None:
        self.stores: list[tuple[int, int]] = []
        self.events: list[int] = []

    def store(self, gpa: int, value: int) -> None:
        self.stores.append((gpa, value))

    def write(self, gpa: int) -> None:
        pass

    def read(self, gpa: int) -> None:
        pass

    def event(self, word: int) -> None:
        self.events.append(word)

    def mark(self) -> int:
        return 0


class _Builder:
    """The measured program, segment by segment."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.touches: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]] = []
        self.accesses = 0

    def touch(self, gva: npt.NDArray[np.int64], kind: npt.NDArray[np.int8]) -> None:
        self.segments.append(("touch", len(self.touches), 0, 0))
        self.touches.append((gva, kind))
        self.accesses += len(gva)

    def store(self, gpa: int, value: int) -> None:
        self.segments.append(("store", gpa, value, 0))
        self.accesses += 1

    def write(self, gpa: int) -> None:
        self.segments.append(("write", gpa, 0, 0))
        self.accesses += 1

    def read(self, gpa: int) -> None:
        self.segments.append(("read", gpa, 0, 0))
        self.accesses += 1

    def event(self, word: int) -> None:
        self.segments.append(("event", word, 0, 0))

    def mark(self) -> int:
        return len(self.segments)


@dataclass(frozen=True)
class Bug:
    """An injected defect and its writes ``(boundary, gpa, value)``, first one = injection."""

    index: int
    kind: str
    writes: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class HeapWorkload:
    """The heap program and the bugs injected into it (see the module docstring)."""

    accesses: int = 200_000  # program accesses (ownership reports and bug writes come on top)
    warmup: int = 20_000  # reads and writes of the booted heap, run before measuring
    live_objects: int = 1_500
    accesses_per_op: int = 40
    write_share: float = 0.3
    large_share: float = 0.04
    max_large_pages: int = 4
    init_writes: int = 2
    bugs: int = 100
    writes_per_bug: float = 4.0
    bug_span: int = 40_000
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("accesses", "live_objects", "accesses_per_op", "max_large_pages", "bug_span")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        for name in ("warmup", "init_writes", "bugs"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must not be negative")
        if self.init_writes > 7:
            raise ConfigError("init_writes", "at most 7 (the smallest object has 8 words)")
        for name in ("write_share", "large_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(name, "must be in [0, 1]")
        if self.writes_per_bug < 1.0:
            raise ConfigError("writes_per_bug", "must be at least 1")

    def program(self, guest: HeapGuest) -> HeapProgram:
        """Generate the program for ``guest``'s heap layout (deterministic in ``seed``)."""
        return build_program(self, guest.pages, guest.ring)


@dataclass
class TrapStream:
    """A laid-out program: what the vCPU runs, plus the ground truth kept aside for scoring."""

    gva: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    values: dict[int, int]  # stores that carry a value: position -> value
    calls: dict[int, Vmcall]  # ring flushes: executed before the access at that position
    firings: dict[int, tuple[int, int]]  # ground truth: bug write position -> (bug, GPA)
    bug_positions: list[list[int]]  # per bug, its writes' positions (first = injection)

    def __len__(self) -> int:
        return int(self.gva.shape[0])


@dataclass
class HeapProgram:
    workload: HeapWorkload
    pages: list[int]
    ring: int
    boot_stores: list[tuple[int, int]]
    boot_events: list[int]  # the guest's registration: its heap as ownership events
    warmup_gva: npt.NDArray[np.int64]
    warmup_kind: npt.NDArray[np.int8]
    segments: list[Segment]
    touches: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]]
    bugs: list[Bug]
    live: dict[int, int] = field(default_factory=dict)  # live objects at the end -> header tag
    events: int = 0  # ownership events in the measured program

    def layout(self, *, notify: bool, batch: int = 32) -> TrapStream:
        """The access stream. With ``notify`` the allocator reports to the ring (two stores per
        event) and flushes it with a VMCALL every ``batch`` events; without it (no debugger)
        the reports are left out."""
        if not 1 <= batch <= RING_SLOTS:
            raise ConfigError("batch", f"must be in 1..{RING_SLOTS} (the ring's slots)")
        parts: list[npt.NDArray[np.int64]] = []
        kinds: list[npt.NDArray[np.int8]] = []
        gvas: list[int] = []
        wkind: list[int] = []
        values: dict[int, int] = {}
        calls: dict[int, Vmcall] = {}
        firings: dict[int, tuple[int, int]] = {}
        positions: list[list[int]] = [[] for _ in self.bugs]
        pos = 0
        count = flushed = 0
        ring = _DM + self.ring

        def flush() -> None:
            if gvas:
                parts.append(np.array(gvas, np.int64))
                kinds.append(np.array(wkind, np.int8))
                gvas.clear()
                wkind.clear()

        for op, a, b, c in self.segments:
            if op == "touch":
                flush()
                gva, kind = self.touches[a]
                parts.append(gva)
                kinds.append(kind)
                pos += len(gva)
                continue
            if op == "event":
                if not notify:
                    continue
                count += 1
                gvas += [ring + 8 * (1 + (count - 1) % RING_SLOTS), ring]
                wkind += [1, 1]
                values[pos], values[pos + 1] = a, count
                pos += 2
                if count - flushed >= batch:
                    calls[pos] = Vmcall(FLUSH_HYPERCALL, (count,))
                    flushed = count
                continue
            gvas.append(_DM + a)
            wkind.append(0 if op == "read" else 1)
            if op in ("store", "fire"):
                values[pos] = b
            if op == "fire":
                firings[pos] = (c, a)
                positions[c].append(pos)
            pos += 1
        flush()
        gva_all = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        kind_all = np.concatenate(kinds) if kinds else np.zeros(0, np.int8)
        return TrapStream(gva_all, kind_all, values, calls, firings, positions)


def _touches(
    rng: np.random.Generator,
    count: int,
    starts: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    write_share: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]:
    """``count`` reads and writes of random words of random objects among ``starts``."""
    pick = rng.integers(0, starts.shape[0], count)
    words = (rng.random(count) * (sizes[pick] // 8)).astype(np.int64)
    gva = np.int64(_DM) + starts[pick] + 8 * words
    kind = (rng.random(count) < write_share).astype(np.int8)
    return gva, kind


def build_program(workload: HeapWorkload, pages: list[int], ring: int) -> HeapProgram:
    w = workload
    rng = np.random.default_rng([w.seed, 7])
    allocator = HeapAllocator(pages, rng, w)
    boot = _Boot()
    for _ in range(3 * w.live_objects):  # fill the heap, then churn it
        allocator.step(boot)
    if allocator.live == 0:
        raise ConfigError("heap_pages", "the heap holds no object")
    allocator.uaf.clear()  # spans that opened and closed during boot are no bug targets
    allocator.overflow.clear()
    n = allocator.live
    warm = _touches(rng, w.warmup, allocator.live_start[:n], allocator.live_size[:n], 0.3)
    builder = _Builder()
    while builder.accesses < w.accesses:
        n = allocator.live
        if n:
            count = int(rng.geometric(1.0 / w.accesses_per_op))
            builder.touch(
                *_touches(
                    rng,
                    count,
                    allocator.live_start[:n],
                    allocator.live_size[:n],
                    w.write_share,
                )
            )
        allocator.step(builder)
    events = sum(1 for s in builder.segments if s[0] == "event")
    allocator.close(len(builder.segments))
    bugs = _inject(w, rng, allocator, builder)
    segments = _merge(builder.segments, bugs)
    return HeapProgram(
        w,
        list(pages),
        ring,
        boot.stores,
        boot.events,
        warm[0],
        warm[1],
        segments,
        builder.touches,
        bugs,
        dict(allocator.tags),
        events,
    )


def _inject(
    w: HeapWorkload, rng: np.random.Generator, allocator: HeapAllocator, builder: _Builder
) -> list[Bug]:
    """Place the bugs where their targets are unowned (see the module docstring)."""
    end = len(builder.segments)
    sizes = [
        len(builder.touches[a][0]) if op == "touch" else (0 if op == "event" else 1)
        for op, a, _, _ in builder.segments
    ]
    at = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # accesses before boundary
    wild = [Interval(0, end, page, PAGE_SIZE) for page in allocator.never_owned()]
    candidates = {
        "use-after-free": allocator.uaf,
        "overflow": allocator.overflow,
        "wild": wild,
    }
    weights = np.array(
        [0.5 * bool(candidates["use-after-free"]), 0.25 * bool(candidates["overflow"]), 0.25]
    )
    if not wild:
        weights[2] = 0.0
    if w.bugs and weights.sum() == 0:
        raise ConfigError("bugs", "no unowned memory to aim at (heap too small)")
    span = {
        kind: np.array([at[i.hi] - at[i.lo] + 1 for i in found], np.float64)
        for kind, found in candidates.items()
    }
    bugs = []
    for index in range(w.bugs):
        kind = BUG_KINDS[int(rng.choice(3, p=weights / weights.sum()))]
        found = candidates[kind]
        if kind == "wild":
            interval = found[int(rng.integers(len(found)))]
        else:  # a random moment at which a random such chunk is unowned
            interval = found[int(rng.choice(len(found), p=span[kind] / span[kind].sum()))]
        lo, hi = int(at[interval.lo]), int(at[interval.hi])
        first = int(rng.integers(lo, hi + 1))
        more = int(rng.geometric(1 / w.writes_per_bug)) - 1
        later = rng.integers(first, min(hi, first + w.bug_span) + 1, more)
        times = [first, *sorted(int(t) for t in later)]
        fixed = interval.target + 8 * int(rng.integers(PAGE_SIZE // 8))
        writes = []
        for t in times:
            boundary = int(np.searchsorted(at, t, side="left"))
            boundary = min(max(boundary, interval.lo), interval.hi)
            if kind == "use-after-free":
                gpa = interval.target + 8 * int(rng.integers(interval.size // 8))
            elif kind == "overflow":
                gpa = interval.target + 8 * int(rng.integers(64))
            else:
                gpa = fixed  # the same wild pointer each time
            writes.append((boundary, gpa, BUG_VALUE | int(rng.integers(1 << 52))))
        bugs.append(Bug(index, kind, tuple(writes)))
    return bugs


def _merge(segments: list[Segment], bugs: Iterable[Bug]) -> list[Segment]:
    """The program with each bug write inserted before the segment at its boundary."""
    at: dict[int, list[Segment]] = {}
    for bug in bugs:
        for boundary, gpa, value in bug.writes:
            at.setdefault(boundary, []).append(("fire", gpa, value, bug.index))
    out: list[Segment] = []
    for b, segment in enumerate(segments):
        out += at.get(b, [])
        out.append(segment)
    out += at.get(len(segments), [])
    return out


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
