"""The program the heap guest runs (:mod:`eptlab.apps.heap_guest`), and the bugs injected
into it.

**The program** alternates bursts of reads and writes to random live objects (about
``accesses_per_op`` accesses, ``write_share`` of them writes of data, each from one of the
program's code sites; every store's value is modelled, so memory holds what the guest wrote)
with one alloc or free, steering the live count towards ``live_objects``. Each burst and its
operation run on one of ``vcpus`` vCPUs, drawn at random (the kernel thread migrates). Before
it, a boot phase (:attr:`HeapProgram.boot_stores`, :attr:`HeapProgram.boot_events`) fills the
heap the same way without running accesses.

**Bugs** (ground truth kept aside, for scoring only): each of ``bugs`` defects is one store
instruction (a code site of the program: the instruction that writes live objects legitimately
also writes through the stale pointer) that writes ``k`` times (geometric, mean
``writes_per_bug``), spread over ``bug_span`` accesses and over the vCPUs, to memory that nobody
owns at each of those moments: a *use-after-free* (a dangling pointer into a chunk freed and not
yet reused; one field of it for the whole bug, word 0 with probability ``bug_field0``), an
*overflow* (past the end of a live large object into its guard page) or a *wild* pointer (into a
page never owned). Writes are placed only where the target is unowned for the whole time; a
chunk's reuse ends its bug.

**Bug values** (:data:`VALUE_CLASSES`, one class per bug drawn from the ``bug_values`` mix):
``null`` (0), ``live`` (a pointer to another object live at that moment), ``freed`` (a pointer
to a chunk free at that moment), ``small`` (an integer 1..1023: a count, a flag, a length),
``same`` (the value the word already holds: a silent store) and ``garbage`` (``0xBAD...``).
A ``live`` or ``freed`` write with no such object at that moment stores garbage instead.

**Read-after-free bugs** (``read_bugs``): loads through a dangling pointer, placed like the
use-after-free writes; only the debugger's read-after-free mode looks at them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ..hv import Vmcall
from .heap_bugs import (
    BUG_KINDS,
    DEFAULT_VALUES,
    VALUE_CLASSES,
    Bug,
    Segment,
    Touch,
    inject,
    merge,
    parse_mix,
)
from .heap_guest import (
    _DM,
    ALLOC_SITES,
    FLUSH_HYPERCALL,
    PROGRAM_SITES,
    RING_SLOTS,
    HeapAllocator,
    HeapGuest,
    program_site,
)

__all__ = [
    "BUG_KINDS", "DEFAULT_VALUES", "VALUE_CLASSES", "Bug", "HeapProgram", "HeapWorkload",
    "Segment", "TrapStream", "build_program", "parse_mix",
]


class _Boot:
    """The boot phase: stores go straight to memory, events to the registration list."""

    def __init__(self) -> None:
        self.stores: list[tuple[int, int]] = []
        self.events: list[int] = []

    def store(self, gpa: int, value: int, site: int) -> None:
        self.stores.append((gpa, value))

    def read(self, gpa: int, site: int) -> None:
        pass

    def event(self, word: int) -> None:
        self.events.append(word)

    def mark(self) -> int:
        return 0


class _Builder:
    """The measured program, segment by segment (``cpu``: the vCPU running it now)."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.touches: list[Touch] = []
        self.accesses = 0
        self.cpu = 0

    def touch(self, burst: Touch) -> None:
        self.segments.append(Segment("touch", len(self.touches), cpu=self.cpu))
        self.touches.append(burst)
        self.accesses += len(burst[0])

    def store(self, gpa: int, value: int, site: int) -> None:
        self.segments.append(Segment("store", gpa, value, 0, site, self.cpu))
        self.accesses += 1

    def read(self, gpa: int, site: int) -> None:
        self.segments.append(Segment("read", gpa, 0, 0, site, self.cpu))
        self.accesses += 1

    def event(self, word: int) -> None:
        self.segments.append(Segment("event", word, 0, 0, ALLOC_SITES["ring"], self.cpu))

    def mark(self) -> int:
        return len(self.segments)


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
    bug_values: tuple[str, ...] = DEFAULT_VALUES  # the value mix, CLASS:WEIGHT
    bug_field0: float = 0.25  # share of use-after-free bugs writing word 0 (list heads, next)
    read_bugs: int = 0  # read-after-free bugs
    vcpus: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("accesses", "live_objects", "accesses_per_op", "max_large_pages", "bug_span")
        for name in (*positive, "vcpus"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        for name in ("warmup", "init_writes", "bugs", "read_bugs"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must not be negative")
        if self.init_writes > 7:
            raise ConfigError("init_writes", "at most 7 (the smallest object has 8 words)")
        for name in ("write_share", "large_share", "bug_field0"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(name, "must be in [0, 1]")
        if self.writes_per_bug < 1.0:
            raise ConfigError("writes_per_bug", "must be at least 1")
        parse_mix(self.bug_values)

    def program(self, guest: HeapGuest) -> HeapProgram:
        """Generate the program for ``guest``'s heap layout (deterministic in ``seed``)."""
        if len(guest.vcpus) != self.vcpus:
            raise ConfigError(
                "vcpus", f"the guest has {len(guest.vcpus)}, the workload {self.vcpus}"
            )
        return build_program(self, guest.pages, guest.ring, guest.text)


@dataclass
class TrapStream:
    """A laid-out program: what the vCPUs run, plus the ground truth kept aside for scoring."""

    gva: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    values: dict[int, int]  # stores that carry a value: position -> value
    calls: dict[int, Vmcall]  # ring flushes: executed before the access at that position
    firings: dict[int, tuple[int, int]]  # ground truth: bug write position -> (bug, GPA)
    bug_positions: list[list[int]]  # per bug, its writes' positions (first = injection)
    ip: npt.NDArray[np.int64] = field(  # per access its instruction (signed, like gva)
        default_factory=lambda: np.zeros(0, np.int64)
    )
    cpu: npt.NDArray[np.int8] = field(default_factory=lambda: np.zeros(0, np.int8))
    bug_class: list[str] = field(default_factory=list)  # per bug, its value class
    bug_ip: list[int] = field(default_factory=list)  # per bug, its instruction's address
    read_firings: dict[int, tuple[int, int]] = field(default_factory=dict)  # bug reads
    read_positions: list[list[int]] = field(default_factory=list)  # per read bug

    def __len__(self) -> int:
        return int(self.gva.shape[0])


@dataclass
class HeapProgram:
    """A generated program: its boot phase, warm-up, segments, bursts and the bugs in it."""

    workload: HeapWorkload
    pages: list[int]
    ring: int
    boot_stores: list[tuple[int, int]]
    boot_events: list[int]  # the guest's registration: its heap as ownership events
    warmup_gva: npt.NDArray[np.int64]
    warmup_kind: npt.NDArray[np.int8]
    segments: list[Segment]
    touches: list[Touch]
    bugs: list[Bug]
    live: dict[int, int] = field(default_factory=dict)  # live objects at the end -> header tag
    events: int = 0  # ownership events in the measured program
    text: int = 0  # the kernel text's base (code sites are offsets from it)

    def layout(self, *, notify: bool, batch: int = 32) -> TrapStream:
        """The access stream. With ``notify`` the allocator reports to the ring (two stores per
        event) and flushes it with a VMCALL every ``batch`` events; without it (no debugger)
        the reports are left out."""
        if not 1 <= batch <= RING_SLOTS:
            raise ConfigError("batch", f"must be in 1..{RING_SLOTS} (the ring's slots)")
        writers = [b for b in self.bugs if not b.read]
        readers = [b for b in self.bugs if b.read]
        out = _Columns(len(writers), len(readers))
        count = flushed = 0
        ring = _DM + self.ring
        for seg in self.segments:
            if seg.op == "touch":
                out.burst(self.touches[seg.a], seg.cpu)
            elif seg.op != "event":
                out.single(seg)
            elif notify:
                count += 1
                slot = ring + 8 * (1 + (count - 1) % RING_SLOTS)
                out.store(slot, seg.a, ALLOC_SITES["ring"], seg.cpu)
                out.store(ring, count, ALLOC_SITES["head"], seg.cpu)
                if count - flushed >= batch:
                    out.calls[out.pos] = Vmcall(FLUSH_HYPERCALL, (count,))
                    flushed = count
        text = self.text - (1 << 64) if self.text >= 1 << 63 else self.text  # signed, as GVAs
        return out.stream(
            text, [b.value_class for b in writers], [self.text + b.site for b in writers]
        )


class _Columns:
    """The stream's columns as :meth:`HeapProgram.layout` builds them, segment by segment."""

    def __init__(self, writers: int, readers: int) -> None:
        self.parts: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int8],
                               npt.NDArray[np.int64], npt.NDArray[np.int8]]] = []
        self.one: list[tuple[int, int, int, int]] = []  # single accesses not yet in a part
        self.values: dict[int, int] = {}
        self.calls: dict[int, Vmcall] = {}
        self.firings: dict[int, tuple[int, int]] = {}
        self.peeks: dict[int, tuple[int, int]] = {}
        self.positions: list[list[int]] = [[] for _ in range(writers)]
        self.read_positions: list[list[int]] = [[] for _ in range(readers)]
        self.pos = 0

    def _flush(self) -> None:
        if self.one:
            gva, kind, site, cpu = zip(*self.one, strict=True)
            self.parts.append((np.array(gva, np.int64), np.array(kind, np.int8),
                               np.array(site, np.int64), np.array(cpu, np.int8)))
            self.one.clear()

    def burst(self, touch: Touch, cpu: int) -> None:
        self._flush()
        gva, kind, site, stored = touch
        for i in np.flatnonzero(kind == 1).tolist():
            self.values[self.pos + i] = int(stored[i])
        self.parts.append((gva, kind, site, np.full(len(gva), cpu, np.int8)))
        self.pos += len(gva)

    def store(self, gva: int, value: int, site: int, cpu: int) -> None:
        self.one.append((gva, 1, site, cpu))
        self.values[self.pos] = value
        self.pos += 1

    def single(self, seg: Segment) -> None:
        """A store, read, bug write (``fire``) or bug read (``peek``)."""
        if seg.op in ("store", "fire"):
            if seg.op == "fire":
                self.firings[self.pos] = (seg.c, seg.a)
                self.positions[seg.c].append(self.pos)
            self.store(_DM + seg.a, seg.b, seg.site, seg.cpu)
            return
        if seg.op == "peek":
            self.peeks[self.pos] = (seg.c, seg.a)
            self.read_positions[seg.c].append(self.pos)
        self.one.append((_DM + seg.a, 0, seg.site, seg.cpu))
        self.pos += 1

    def stream(self, text: int, bug_class: list[str], bug_ip: list[int]) -> TrapStream:
        self._flush()
        columns = list(zip(*self.parts, strict=True)) if self.parts else None
        if columns is None:
            empty = np.zeros(0, np.int64)
            gva, kind, ip, cpu = empty, empty.astype(np.int8), empty, empty.astype(np.int8)
        else:
            gva, kind = np.concatenate(columns[0]), np.concatenate(columns[1])
            ip, cpu = np.concatenate(columns[2]) + np.int64(text), np.concatenate(columns[3])
        return TrapStream(
            gva, kind, self.values, self.calls, self.firings, self.positions, ip, cpu,
            bug_class, bug_ip, self.peeks, self.read_positions,
        )


def _touches(
    rng: np.random.Generator,
    count: int,
    starts: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    write_share: float,
) -> Touch:
    """``count`` reads and writes (of data: :func:`data_value`) of random words of random objects
    among ``starts``, each from a random code site of the program; writes leave word 0, the
    owner's header, alone."""
    pick = rng.integers(0, starts.shape[0], count)
    words = (rng.random(count) * (sizes[pick] // 8)).astype(np.int64)
    kind = (rng.random(count) < write_share).astype(np.int8)
    words[(kind == 1) & (words == 0)] = 1
    gva = np.int64(_DM) + starts[pick] + 8 * words
    site = program_site(0) + 0x40 * rng.integers(0, PROGRAM_SITES, count)
    stored = np.where(kind == 1, rng.integers(1 << 20, 1 << 62, count), 0)
    return gva, kind, site.astype(np.int64), stored.astype(np.int64)


def build_program(
    workload: HeapWorkload, pages: list[int], ring: int, text: int = 0
) -> HeapProgram:
    """The program for a heap of ``pages`` with its ring at ``ring`` (deterministic in the
    workload's seed); ``text`` is the kernel text's base."""
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
    allocator.lived.clear()
    n = allocator.live
    warm = _touches(rng, w.warmup, allocator.live_start[:n], allocator.live_size[:n], 0.3)
    # (the warm-up's stores carry no value: memory stays as the boot phase left it)
    builder = _Builder()
    cpus = np.random.default_rng([w.seed, 13])  # its own stream: vcpus changes nothing else
    while builder.accesses < w.accesses:
        builder.cpu = int(cpus.integers(w.vcpus))
        n = allocator.live
        if n:
            count = int(rng.geometric(1.0 / w.accesses_per_op))
            builder.touch(
                _touches(
                    rng, count, allocator.live_start[:n], allocator.live_size[:n], w.write_share
                )
            )
        allocator.step(builder)
    events = sum(1 for s in builder.segments if s.op == "event")
    allocator.close(len(builder.segments))
    bugs = inject(
        w, np.random.default_rng([w.seed, 17]), allocator, builder.segments, builder.touches
    )
    segments = merge(builder.segments, builder.touches, bugs, boot.stores)
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
        text,
    )

