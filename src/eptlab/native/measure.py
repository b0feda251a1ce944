"""Typed Python layer over the native measurements (``measure.c``).

Cycles are **core cycles**: the C code reads the TSC (constant rate); :func:`clock` measures the
TSC rate against ``CLOCK_MONOTONIC_RAW`` and the core clock against the TSC (a chain of dependent
one-cycle ADDs), and ``cycles = ticks / tsc_ghz * core_ghz``. Under a hypervisor the core clock
is what the vCPU ran at during the measurement (turbo included), so cycles here are the cycles
the simulator's latencies are written in.

Every measurement runs pinned to one CPU (``sched_setaffinity``) and is repeated; results carry
every sample, their median and their spread (interquartile range), so noise from other work on the
machine shows instead of hiding.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from ..errors import ConfigError
from .build import load

PageKind = Literal["4k", "2m"]
PAGE_KINDS: tuple[PageKind, ...] = ("4k", "2m")
PATTERNS = ("pointer-chase", "dependent-random", "random", "gups", "sequential")
"""What :func:`run_pattern` runs, named as :mod:`eptlab.workloads` names them:

* ``pointer-chase``: one random cycle over ``footprint // 64`` nodes (one per 64-byte line),
  one dependent load per access (a shuffled order of the nodes, linked in a ring: every node
  once per lap; building it takes time in proportion to the footprint);
* ``dependent-random``: serial loads at random offsets, each address a hash of a counter and
  the previous load's value: a pointer chase without a chain to build (any footprint, no set-up
  time); the hash adds a constant number of cycles per access (compare page sizes, not levels);
* ``random``: independent 8-byte loads at uniform random offsets (addresses from a
  counter-based hash, so loads overlap: memory-level parallelism is in the measurement);
* ``gups``: HPCC RandomAccess, a read-modify-write of a random 8-byte word per update; counted
  as two accesses (a read and a write), as :class:`eptlab.workloads.Gups` counts them;
* ``sequential``: 8-byte loads at ``0, stride, 2*stride, ...`` wrapping at the footprint.
"""
NODE = 64
CHUNK = 2048  # accesses per timed chunk (a multiple of 16)
MIN_FOOTPRINT = 8 << 10


@dataclass(frozen=True)
class Clock:
    """The TSC rate and the core clock, both in GHz (cycles per nanosecond)."""

    tsc_ghz: float
    core_ghz: float
    core_samples: tuple[float, ...] = ()

    def ns(self, ticks: float) -> float:
        return ticks / self.tsc_ghz

    def cycles(self, ticks: float) -> float:
        return ticks / self.tsc_ghz * self.core_ghz


@dataclass(frozen=True)
class Samples:
    """Repeated measurements of one quantity: median and spread (the interquartile range,
    inclusive quartiles: robust to the odd run that another process on the CPU disturbed)."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def spread(self) -> float:
        if len(self.values) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.values, n=4, method="inclusive")
        return q3 - q1

    @property
    def relative_spread(self) -> float:
        """Interquartile range / |median|: 0 for identical samples."""
        return self.spread / abs(self.median) if self.median else 0.0

    @property
    def count(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class NativeResult:
    """One pattern measured natively: per-access cost, median over ``samples`` repeats."""

    pattern: str
    footprint_bytes: int
    page: PageKind
    accesses: int  # per repeat, counted as the simulator counts them
    cycles: Samples  # core cycles per access, one value per repeat
    ns: Samples  # nanoseconds per access, one value per repeat
    huge_pages_obtained: bool  # the whole footprint sits on 2 MiB pages (AnonHugePages)
    huge_bytes: int  # AnonHugePages of the buffer, from /proc/self/smaps
    cpu: int
    clock: Clock
    stride: int = 8

    @property
    def cycles_per_access(self) -> float:
        return self.cycles.median

    @property
    def ns_per_access(self) -> float:
        return self.ns.median

    def as_row(self) -> dict[str, object]:
        return {
            "pattern": self.pattern, "footprint_bytes": self.footprint_bytes, "page": self.page,
            "accesses": self.accesses, "cycles_per_access": round(self.cycles_per_access, 3),
            "cycles_spread": round(self.cycles.spread, 3), "ns_per_access":
            round(self.ns_per_access, 3), "samples": self.cycles.count,
            "huge_pages_obtained": self.huge_pages_obtained, "huge_bytes": self.huge_bytes,
            "core_ghz": round(self.clock.core_ghz, 4), "tsc_ghz": round(self.clock.tsc_ghz, 4),
        }


# -- the machine ---------------------------------------------------------------------------------


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("/proc/meminfo", "no MemAvailable line")


@contextlib.contextmanager
def pinned(cpu: int | None = None) -> Iterator[int]:
    """Run the calling thread on one CPU (the one it is on now unless given); restore after."""
    before = os.sched_getaffinity(0)
    if cpu is None:
        libc = ctypes.CDLL(None, use_errno=True)
        cpu = int(libc.sched_getcpu())
        if cpu not in before:
            cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


@cache
def clock() -> Clock:
    """Measured once per process: the TSC against CLOCK_MONOTONIC_RAW (50 ms), then the core
    clock against the TSC: the median over 300 chunks of 64 x 2,000 dependent ADDs (a chunk
    the thread was preempted in is an outlier the median drops)."""
    lib = load()
    with pinned():
        tsc = float(lib.ept_tsc_ghz(50_000_000))
        iters = 2_000
        _ticks(lambda t: lib.ept_add_chain(iters, 100, t), 100)  # warm-up: the clock ramps up
        ratios = tuple(64 * iters / t for t in _ticks(
            lambda t: lib.ept_add_chain(iters, 300, t), 300) if t > 0)
    return Clock(tsc, tsc * statistics.median(ratios), _deciles(tsc, ratios))


def _deciles(tsc: float, ratios: tuple[float, ...]) -> tuple[float, ...]:
    cuts = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else list(ratios)
    return tuple(tsc * r for r in cuts)


def _ticks(call: Callable[[Any], int], chunks: int) -> list[int]:
    """Run a chunked C function that fills a ticks array; its values."""
    array = (ctypes.c_uint64 * chunks)()
    if call(array) != 0:
        raise ConfigError("native", "the measurement refused its arguments")
    return list(array)


def run_cpuid(per_chunk: int = 200, chunks: int = 50, repeats: int = 5,
              cpu: int | None = None) -> Samples:
    """Core cycles per CPUID instruction (median over chunks), one value per repeat. On a
    virtual machine each CPUID is a VM exit and entry through the hypervisor below."""
    if min(per_chunk, chunks, repeats) < 1:
        raise ConfigError("repeats", "per_chunk, chunks and repeats must be at least 1")
    lib, clk = load(), clock()
    values = []
    with pinned(cpu):
        _ticks(lambda t: lib.ept_cpuid_run(per_chunk, 5, t), 5)
        for _ in range(repeats):
            ticks = _ticks(lambda t: lib.ept_cpuid_run(per_chunk, chunks, t), chunks)
            values.append(clk.cycles(float(statistics.median(ticks)) / per_chunk))
    return Samples(tuple(values))


# -- memory --------------------------------------------------------------------------------------


def _smaps_huge_bytes(start: int, length: int) -> int:
    """AnonHugePages (bytes) of the mappings overlapping [start, start + length)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < start + length and start < hi
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return min(total, length)


@dataclass
class Buffer:
    """Populated anonymous memory on 4 KiB pages (MADV_NOHUGEPAGE) or, where the kernel gives
    them, 2 MiB pages (MADV_HUGEPAGE). Release with :meth:`close` or ``with``."""

    bytes: int
    page: PageKind
    base: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.page not in PAGE_KINDS:
            raise ConfigError("page", f"{self.page!r} is not one of {PAGE_KINDS}")
        if self.bytes < MIN_FOOTPRINT or self.bytes % 4096:
            raise ConfigError("footprint_bytes", f"{self.bytes} is not a multiple of 4 KiB "
                              f"of at least {MIN_FOOTPRINT}")
        base = load().ept_map(self.bytes, int(self.page == "2m"))
        if not base:
            err = ctypes.get_errno()
            raise ConfigError("footprint_bytes", f"cannot map {self.bytes} bytes "
                              f"({os.strerror(err) if err else 'mmap failed'})")
        self.base = int(base)

    def huge_bytes(self) -> int:
        return _smaps_huge_bytes(self.base, self.bytes) if self.base else 0

    def close(self) -> None:
        if self.base:
            load().ept_unmap(self.base, self.bytes)
            self.base = 0

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- patterns ------------------------------------------------------------------------------------


def _check(pattern: str, footprint: int, accesses: int, repeats: int, stride: int) -> None:
    if pattern not in PATTERNS:
        raise ConfigError("pattern", f"{pattern!r} is not one of {', '.join(PATTERNS)}")
    if footprint < MIN_FOOTPRINT or footprint % NODE:
        raise ConfigError("footprint_bytes", f"{footprint} is not a multiple of {NODE} "
                          f"of at least {MIN_FOOTPRINT}")
    if accesses < 16:
        raise ConfigError("accesses", f"{accesses} is below 16")
    if repeats < 1:
        raise ConfigError("repeats", f"{repeats} is below 1")
    if stride < 8 or stride % 8 or stride > footprint:
        raise ConfigError("stride", f"{stride} is not a multiple of 8 within the footprint")


def _run_once(pattern: str, buf: Buffer, footprint: int, chunk: int, chunks: int, seed: int,
              stride: int) -> float:
    """Median TSC ticks per access over ``chunks`` timed chunks of ``chunk`` accesses."""
    lib, sink = load(), ctypes.c_uint64()
    out = ctypes.byref(sink)
    if pattern == "pointer-chase":
        ticks = _ticks(lambda t: lib.ept_chase_run(buf.base, chunk, chunks, t, out), chunks)
    elif pattern == "dependent-random":
        ticks = _ticks(lambda t: lib.ept_deprand_run(buf.base, footprint, seed, chunk, chunks, t,
                                                     out), chunks)
    elif pattern == "random":
        ticks = _ticks(lambda t: lib.ept_random_run(buf.base, footprint, seed, chunk, chunks, t,
                                                    out), chunks)
    elif pattern == "gups":  # chunk accesses = chunk / 2 updates
        ticks = _ticks(lambda t: lib.ept_gups_run(buf.base, footprint, seed, chunk // 2, chunks,
                                                  t), chunks)
    else:
        ticks = _ticks(lambda t: lib.ept_seq_run(buf.base, footprint, stride, chunk, chunks, t,
                                                 out), chunks)
    return float(statistics.median(ticks)) / chunk


def prepare_chase(buf: Buffer, footprint: int, seed: int, *, stride: int = NODE) -> None:
    """Write a random cycle over the first ``footprint`` bytes of ``buf``: one node per
    ``stride`` bytes (64: every line; 4096: one line per page, staggered over the lines)."""
    if footprint > buf.bytes:
        raise ConfigError("footprint_bytes", f"{footprint} exceeds the buffer ({buf.bytes})")
    if stride < NODE or stride % NODE or footprint // stride < 2:
        raise ConfigError("stride", f"{stride} is not a multiple of {NODE} giving 2+ nodes")
    status = load().ept_chase_build(buf.base, footprint // stride, stride, seed)
    if status != 0:
        why = "no memory for the index array" if status == -2 else "too many nodes"
        raise ConfigError("footprint_bytes", f"{footprint}: cannot build a chain ({why})")


def run_pattern(
    pattern: str,
    footprint_bytes: int,
    page: PageKind = "4k",
    accesses: int = 1_000_000,
    seed: int = 0,
    *,
    repeats: int = 5,
    stride: int = 8,
    buffer: Buffer | None = None,
    prepared: bool = False,
    cpu: int | None = None,
) -> NativeResult:
    """Run ``pattern`` natively over ``footprint_bytes`` on ``page`` pages: one untimed warm-up
    run, then ``repeats`` timed runs of ``accesses`` accesses each, pinned to one CPU.

    ``buffer`` reuses populated memory (at least the footprint, same page kind) instead of
    mapping and populating a new one; ``prepared=True`` says its pointer chain for this
    footprint is already built (:func:`prepare_chase`)."""
    _check(pattern, footprint_bytes, accesses, repeats, stride)
    chunk = min(CHUNK, -(-accesses // 16) * 16)
    chunks = -(-accesses // chunk)
    with contextlib.ExitStack() as stack:
        if buffer is None:
            buffer = stack.enter_context(Buffer(footprint_bytes, page))
        elif buffer.page != page or buffer.bytes < footprint_bytes:
            raise ConfigError("buffer", f"{buffer.bytes} bytes on {buffer.page} pages cannot "
                              f"hold {footprint_bytes} bytes on {page} pages")
        if pattern == "pointer-chase" and not prepared:
            prepare_chase(buffer, footprint_bytes, seed)
        clk = clock()
        with pinned(cpu) as on:
            warm = -(-min(accesses, max(footprint_bytes // NODE, chunk)) // chunk)
            _run_once(pattern, buffer, footprint_bytes, chunk, warm, seed + 1, stride)
            ticks = [_run_once(pattern, buffer, footprint_bytes, chunk, chunks, seed + 2 + i,
                               stride) for i in range(repeats)]
        huge = _smaps_huge_bytes(buffer.base, footprint_bytes)
    return NativeResult(
        pattern=pattern, footprint_bytes=footprint_bytes, page=page, accesses=chunk * chunks,
        cycles=Samples(tuple(clk.cycles(t) for t in ticks)),
        ns=Samples(tuple(clk.ns(t) for t in ticks)),
        huge_pages_obtained=huge >= footprint_bytes - (footprint_bytes % (2 << 20)) > 0,
        huge_bytes=huge, cpu=on, clock=clk, stride=stride,
    )


@dataclass(frozen=True)
class StlbResult:
    """Chase over ``lines`` lines packed in few pages against one line per 4 KiB page (as
    many pages as lines: more than the L1 DTLB holds, fewer than the STLB): core cycles per
    load of each, and their difference, the cost of an STLB hit."""

    lines: int
    packed: Samples
    spread_out: Samples

    @property
    def stlb_hit(self) -> Samples:
        return Samples(tuple(b - a for a, b in zip(sorted(self.packed.values),
                                                   sorted(self.spread_out.values), strict=False)))


def run_stlb(lines: int = 512, accesses: int = 65_536, repeats: int = 5, seed: int = 1,
             cpu: int | None = None) -> StlbResult:
    """The same number of lines, with the same spread over the L1 sets, chased on
    ``lines // 64`` pages and on ``lines`` pages (4 KiB each, MADV_NOHUGEPAGE): the second
    misses the L1 DTLB (64-96 entries on recent Intel cores) and hits the STLB (2,048) on
    every load; the cache hit mix is the same for both (512 lines: L1 hits, 8 per L1 set)."""
    if not 128 <= lines <= 2048 or lines % 64:
        raise ConfigError("lines", f"{lines} is not a multiple of 64 in 128..2048")
    with Buffer(lines * 4096, "4k") as buf:
        packed = run_pattern("pointer-chase", lines * NODE, "4k", accesses, seed,
                             repeats=repeats, buffer=buf, cpu=cpu)
        prepare_chase(buf, lines * 4096, seed, stride=4096)
        spread = run_pattern("pointer-chase", lines * 4096, "4k", accesses, seed,
                             repeats=repeats, buffer=buf, prepared=True, cpu=cpu)
    return StlbResult(lines, packed.cycles, spread.cycles)


@dataclass(frozen=True)
class CopyResult:
    bytes: int
    bytes_per_cycle: Samples
    gb_per_s: Samples
    clock: Clock


def run_copy(nbytes: int = 256 << 20, repeats: int = 5, page: PageKind = "2m",
             cpu: int | None = None, chunk: int = 4 << 20,
             buffer: Buffer | None = None) -> CopyResult:
    """memcpy from one ``nbytes`` region to another, in ``chunk``-byte pieces walking through
    them: bytes per core cycle (median over the pieces of one pass), one value per repeat.
    The regions are the two halves of ``buffer`` (at least ``2 * nbytes``) when given, else
    two new buffers on ``page`` pages."""
    if nbytes < MIN_FOOTPRINT or nbytes % chunk or chunk % 4096:
        raise ConfigError("bytes", f"{nbytes} is not a multiple of the {chunk}-byte chunk "
                          "(itself a multiple of 4 KiB)")
    if repeats < 1:
        raise ConfigError("repeats", f"{repeats} is below 1")
    if buffer is not None and buffer.bytes < 2 * nbytes:
        raise ConfigError("buffer", f"{buffer.bytes} bytes cannot hold two {nbytes}-byte halves")
    lib, clk = load(), clock()
    pieces = nbytes // chunk
    with contextlib.ExitStack() as stack:
        if buffer is None:
            src = stack.enter_context(Buffer(nbytes, page)).base
            dst = stack.enter_context(Buffer(nbytes, page)).base
        else:
            src, dst = buffer.base, buffer.base + nbytes
        stack.enter_context(pinned(cpu))
        _ticks(lambda t: lib.ept_copy_run(dst, src, nbytes, chunk, pieces, t), pieces)
        ticks = [float(statistics.median(_ticks(
            lambda t: lib.ept_copy_run(dst, src, nbytes, chunk, pieces, t), pieces)))
            for _ in range(repeats)]
    return CopyResult(nbytes, Samples(tuple(chunk / clk.cycles(t) for t in ticks)),
                      Samples(tuple(chunk / clk.ns(t) for t in ticks)), clk)
