"""The memory side of a calibration: the pointer-chase curve, the 4 KiB page-walk penalty and
the copy bandwidth, on one buffer per page size (2 MiB pages first, then 4 KiB)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from .. import native
from ..native import Buffer, CopyResult, NativeResult, PageKind, Samples
from .plan import GIB, MIB, Plan

WALK_PATTERNS = ("dependent-random", "gups")


def _size(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB" if n >= MIB else f"{n >> 10} KiB"


@dataclass
class MemoryResults:
    curve: dict[str, list[NativeResult]] = field(default_factory=dict)  # by page kind
    walk: list[NativeResult] = field(default_factory=list)
    copy: CopyResult | None = None
    cpuid: Samples | None = None
    stlb: native.StlbResult | None = None
    huge_pages: dict[str, bool] = field(default_factory=dict)  # did the 2m buffer get them
    buffer_bytes: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def walk_penalty(self, pattern: str = "dependent-random") -> list[tuple[int, Samples]]:
        """Per footprint: 4 KiB minus 2 MiB cycles per access, sample by sample (the k-th
        repeat of one minus the k-th of the other, both sorted: a spread, not a pairing)."""
        by = {(r.footprint_bytes, r.page): r for r in self.walk if r.pattern == pattern}
        out = []
        for size in sorted({f for f, _ in by}):
            small, big = by.get((size, "4k")), by.get((size, "2m"))
            if small is None or big is None:
                continue
            diffs = tuple(a - b for a, b in zip(sorted(small.cycles.values),
                                                sorted(big.cycles.values), strict=False))
            out.append((size, Samples(diffs)))
        return out


class MemoryCalibration:
    """Runs a :class:`Plan`'s memory measurements step by step: :meth:`run` yields a label
    after each step (for a progress bar); :attr:`results` holds what was measured."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.results = MemoryResults()

    def steps(self) -> int:
        p = self.plan
        return 2 + 2 * (1 + len(p.curve) + len(WALK_PATTERNS) * len(p.walk_sizes)) + 1

    def _buffer_size(self, page: PageKind) -> int:
        """The largest needed size within the memory cap; what does not fit is noted."""
        p = self.plan
        cap = int(p.memory_fraction * native.mem_available())
        needed = sorted({*p.curve, *p.walk_sizes, 2 * p.copy_bytes})
        size = max((n for n in needed if n <= cap), default=0)
        for n in needed:
            if n > size:
                self.results.skipped.append(
                    f"{_size(n)} on {page} pages: more than {p.memory_fraction:.0%} of "
                    f"MemAvailable ({_size(cap)} allowed)")
        return size

    def run(self) -> Iterator[str]:
        p = self.plan
        self.results.cpuid = native.run_cpuid(repeats=p.repeats)
        yield "CPUID round trip"
        self.results.stlb = native.run_stlb(accesses=p.curve_accesses, repeats=p.repeats,
                                            seed=p.seed)
        yield f"STLB hit: {self.results.stlb.stlb_hit.median:.1f} cycles"
        for page in ("2m", "4k"):
            size = self._buffer_size(page)
            if size == 0:
                yield from self._skip_page(page)
                continue
            with Buffer(size, page) as buf:
                self.results.buffer_bytes[page] = size
                if page == "2m":
                    self.results.huge_pages[page] = buf.huge_bytes() >= size
                yield f"mapped {_size(size)} on {page} pages"
                yield from self._curve(buf, page)
                yield from self._walk(buf, page)
                if page == "2m":
                    if buf.bytes >= 2 * p.copy_bytes:
                        self.results.copy = native.run_copy(p.copy_bytes, p.repeats,
                                                            buffer=buf)
                    yield "copy bandwidth"

    def _skip_page(self, page: str) -> Iterator[str]:
        p = self.plan
        for _ in range(1 + len(p.curve) + len(WALK_PATTERNS) * len(p.walk_sizes)):
            yield f"skipped {page}"
        if page == "2m":
            yield "copy bandwidth skipped"

    def _curve(self, buf: Buffer, page: PageKind) -> Iterator[str]:
        p = self.plan
        points = self.results.curve.setdefault(page, [])
        for footprint in p.curve:
            if footprint > buf.bytes:
                yield f"chase {_size(footprint)} {page}: skipped"
                continue
            native.prepare_chase(buf, footprint, p.seed)
            points.append(native.run_pattern(
                "pointer-chase", footprint, page, p.curve_accesses, p.seed, repeats=p.repeats,
                buffer=buf, prepared=True))
            yield f"chase {_size(footprint)} {page}: {points[-1].cycles_per_access:.1f} cycles"

    def _walk(self, buf: Buffer, page: PageKind) -> Iterator[str]:
        p = self.plan
        for size in p.walk_sizes:
            for pattern in WALK_PATTERNS:
                if size > buf.bytes:
                    yield f"{pattern} {_size(size)} {page}: skipped"
                    continue
                r = native.run_pattern(pattern, size, page, p.walk_accesses, p.seed,
                                       repeats=p.repeats, buffer=buf)
                self.results.walk.append(r)
                yield f"{pattern} {_size(size)} {page}: {r.cycles_per_access:.1f} cycles"
