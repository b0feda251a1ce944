"""The bugs injected into the heap program (:mod:`eptlab.apps.heap_program`): where they
aim, the values they store, and how they are merged into the program's segments (see the
program's module docstring for the model)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SIZE
from ..errors import ConfigError
from .heap_guest import (
    _DM,
    BUG_VALUE,
    PROGRAM_SITES,
    HeapAllocator,
    Interval,
    pointer,
    program_site,
)

if TYPE_CHECKING:
    from .heap_program import HeapWorkload

BUG_KINDS = ("use-after-free", "overflow", "wild")
VALUE_CLASSES = ("null", "live", "freed", "small", "same", "garbage")
DEFAULT_VALUES = ("null:0.2", "live:0.2", "freed:0.2", "small:0.2", "same:0.1", "garbage:0.1")


def parse_mix(spec: Iterable[str], name: str = "bug_values") -> dict[str, float]:
    """``("null:0.2", "same:1")`` -> the classes' probabilities (weights normalised)."""
    weights: dict[str, float] = {}
    for item in spec:
        cls, _, text = item.partition(":")
        if cls not in VALUE_CLASSES:
            raise ConfigError(name, f"{item!r}: the class is not one of {', '.join(VALUE_CLASSES)}")
        try:
            weight = float(text) if text else 1.0
        except ValueError:
            raise ConfigError(name, f"{item!r}: the weight is not a number") from None
        if not (np.isfinite(weight) and weight >= 0) or cls in weights:
            raise ConfigError(name, f"{item!r}: a class once, with a finite weight >= 0")
        weights[cls] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError(name, "the weights must not all be 0")
    return {cls: w / total for cls, w in weights.items()}


class Segment(NamedTuple):
    """One step of the program: ``touch`` (a burst, ``a`` indexes :attr:`HeapProgram.touches`),
    ``store`` (``a`` GPA, ``b`` value), ``read`` (``a`` GPA), ``event`` (``a`` the
    ownership report), ``fire`` (a bug write: ``a`` GPA, ``b`` value, ``c`` bug) or ``peek`` (a
    bug read: ``a`` GPA, ``c`` read bug); ``site`` the code site (text offset), ``cpu`` the vCPU.
    Bugs are placed at boundaries between segments."""

    op: str
    a: int
    b: int = 0
    c: int = 0
    site: int = 0
    cpu: int = 0


Touch = tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int8], npt.NDArray[np.int64], npt.NDArray[np.int64]
]
"""A burst: GVAs, kinds, code sites (text offsets) and the values its writes store."""


@dataclass(frozen=True)
class Bug:
    """An injected defect: its store (or load) instruction ``site``, its value class, and its
    accesses ``(boundary, gpa, value, cpu)``, the first one its injection."""

    index: int
    kind: str
    site: int
    value_class: str
    writes: tuple[tuple[int, int, int, int], ...]
    read: bool = False  # a read-after-free bug: loads, value 0
    target: int = 0  # the chunk, guard page or never-owned page it aims at


class _Spans:
    """Intervals searchable by boundary: which targets are in their span at a moment."""

    def __init__(self, spans: list[Interval]) -> None:
        self.target = np.array([i.target for i in spans], np.int64)
        self.lo = np.array([i.lo for i in spans], np.int64)
        self.hi = np.array([i.hi for i in spans], np.int64)

    def pick(self, rng: np.random.Generator, boundary: int, other_than: int) -> int | None:
        hits = self.target[(self.lo <= boundary) & (boundary <= self.hi)]
        hits = hits[hits != other_than]
        return int(hits[int(rng.integers(len(hits)))]) if len(hits) else None


def inject(
    w: HeapWorkload,
    rng: np.random.Generator,
    allocator: HeapAllocator,
    segments: list[Segment],
    touches: list[Touch],
) -> list[Bug]:
    """Place the bugs where their targets are unowned (see the program's module docstring)."""
    end = len(segments)
    sizes = [
        len(touches[s.a][0]) if s.op == "touch" else (0 if s.op == "event" else 1)
        for s in segments
    ]
    at = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # accesses before boundary
    wild = [Interval(0, end, page, PAGE_SIZE) for page in allocator.never_owned()]
    candidates = {"use-after-free": allocator.uaf, "overflow": allocator.overflow, "wild": wild}
    weights = np.array([0.5 * bool(allocator.uaf), 0.25 * bool(allocator.overflow), 0.25])
    if not wild:
        weights[2] = 0.0
    if w.bugs and weights.sum() == 0:
        raise ConfigError("bugs", "no unowned memory to aim at (heap too small)")
    if w.read_bugs and not allocator.uaf:
        raise ConfigError("read_bugs", "no freed chunk to read (heap too small)")
    span = {
        kind: np.array([at[i.hi] - at[i.lo] + 1 for i in found], np.float64)
        for kind, found in candidates.items()
    }
    mix = parse_mix(w.bug_values)
    classes, p_class = list(mix), np.array(list(mix.values()))
    live, freed = _Spans(allocator.lived), _Spans(allocator.uaf)
    bugs = []
    for index in range(w.bugs + w.read_bugs):
        read = index >= w.bugs
        pick = int(rng.choice(3, p=weights / weights.sum())) if w.bugs else 0
        kind = "use-after-free" if read else BUG_KINDS[pick]
        found = candidates[kind]
        if kind == "wild":
            interval = found[int(rng.integers(len(found)))]
        else:  # a random moment at which a random such chunk is unowned
            interval = found[int(rng.choice(len(found), p=span[kind] / span[kind].sum()))]
        value_class = "null" if read else classes[int(rng.choice(len(classes), p=p_class))]
        site = program_site(int(rng.integers(PROGRAM_SITES)))
        lo, hi = int(at[interval.lo]), int(at[interval.hi])
        first = int(rng.integers(lo, hi + 1))
        more = int(rng.geometric(1 / w.writes_per_bug)) - 1
        later = rng.integers(first, min(hi, first + w.bug_span) + 1, more)
        times = [first, *sorted(int(t) for t in later)]
        if kind == "use-after-free":  # one field of the object, for the whole bug
            word = 0 if rng.random() < w.bug_field0 else int(rng.integers(interval.size // 8))
        else:
            word = int(rng.integers(PAGE_SIZE // 8 if kind == "wild" else 64))
        writes = []
        for t in times:
            boundary = int(np.searchsorted(at, t, side="left"))
            boundary = min(max(boundary, interval.lo), interval.hi)
            gpa = interval.target + 8 * word
            if kind == "overflow":  # a run of stores past the end
                gpa = interval.target + 8 * int(rng.integers(64))
            cpu = int(rng.integers(w.vcpus))
            value = 0 if read else _value(rng, value_class, boundary, interval.target, live, freed)
            writes.append((boundary, gpa, value, cpu))
        offset = w.bugs if read else 0
        bugs.append(
            Bug(index - offset, kind, site, value_class, tuple(writes), read, interval.target)
        )
    return bugs


def _value(
    rng: np.random.Generator,
    value_class: str,
    boundary: int,
    target: int,
    live: _Spans,
    freed: _Spans,
) -> int:
    """A bug value of ``value_class`` at ``boundary`` (``same`` is filled in by :func:`_merge`,
    when the word's content is known)."""
    if value_class in ("null", "same"):
        return 0
    if value_class == "small":
        return int(rng.integers(1, 1024))
    if value_class in ("live", "freed"):
        to = (live if value_class == "live" else freed).pick(rng, boundary, target)
        if to is not None:
            return pointer(to)
    return BUG_VALUE | int(rng.integers(1 << 52))


def merge(
    segments: list[Segment],
    touches: list[Touch],
    bugs: Iterable[Bug],
    boot: list[tuple[int, int]],
) -> list[Segment]:
    """The program with each bug access inserted before the segment at its boundary; a
    ``same`` bug stores what the word holds then (the boot stores, then every store in program
    order)."""
    at: dict[int, list[tuple[Segment, str]]] = {}
    for bug in bugs:
        op = "peek" if bug.read else "fire"
        for boundary, gpa, value, cpu in bug.writes:
            fired = Segment(op, gpa, value, bug.index, bug.site, cpu)
            at.setdefault(boundary, []).append((fired, bug.value_class))
    memory = dict(boot)
    out: list[Segment] = []

    def emit(seg: Segment, value_class: str = "") -> None:
        if seg.op == "fire" and value_class == "same":
            seg = seg._replace(b=memory.get(seg.a, 0))
        if seg.op in ("store", "fire"):
            memory[seg.a] = seg.b
        elif seg.op == "touch":
            gva, kind, _, stored = touches[seg.a]
            writes = kind == 1
            memory.update(zip((gva[writes] - _DM).tolist(), stored[writes].tolist(), strict=True))
        out.append(seg)

    for b, segment in enumerate(segments):
        for fired, value_class in at.get(b, []):
            emit(fired, value_class)
        emit(segment)
    for fired, value_class in at.get(len(segments), []):
        emit(fired, value_class)
    return out
