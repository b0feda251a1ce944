"""Throughput of the fast engine, measured against the reference walker in the same process.

Workloads (all guest 4 KiB pages over 4 KiB EPT pages unless told otherwise):

* ``seq64``  - 64-byte strides over 1 GiB: TLB hits dominate.
* ``seq4k``  - 4 KiB strides over 1 GiB: a TLB miss on every access, cache-friendly walks.
* ``random`` - uniform over 64 GiB: a TLB miss and a DRAM-bound walk on nearly every access.
* ``zipf``   - Zipf(1.2) over the pages of 64 GiB, hot pages scattered.
* ``trace``  - a real program trace (valgrind lackey), its pages mapped before it runs.

Streams are generated and run in chunks, so 10^8 accesses need no more memory than one chunk.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from . import bench_limit
from .arch.access import Access
from .arch.bits import PageSize
from .errors import ConfigError
from .memory.layout import check_layout
from .mmu.config import MmuConfig
from .mmu.engine import Accesses, Engine, InveptType
from .mmu.scenario import NestedSpace
from .traces import read_lackey

WORKLOADS = ("seq64", "seq4k", "random", "zipf")
BASE = 0x0000_1000_0000_0000
GiB = 1 << 30
Stream = Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]]


@dataclass(frozen=True)
class BenchResult:
    workload: str
    accesses: int
    seconds: float
    accesses_per_s: float
    walker_accesses_per_s: float
    ratio: float
    walks_per_access: float
    cycles_per_access: float
    walker_sample: int
    peak_rss_mib: float
    # the C loop of benchmarks/c_limit (uncached walk, same TLBs): None where it does not apply
    c_accesses_per_s: float | None = None
    c_fraction: float | None = None  # engine throughput / C loop throughput, same run

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def footprint(workload: str) -> int:
    return 1 * GiB if workload.startswith("seq") else 64 * GiB


def synthetic_stream(workload: str, accesses: int, chunk: int, seed: int = 0) -> Stream:
    """Chunks of (guest-virtual addresses, kinds) for a synthetic workload (reads; every 4th
    access of the random ones is a write)."""
    size = footprint(workload)
    rng = np.random.default_rng(seed)
    pages = size >> 12
    done = 0
    while done < accesses:
        n = min(chunk, accesses - done)
        index = np.arange(done, done + n, dtype=np.int64)
        if workload == "seq64":
            offsets = (index * 64) % size
        elif workload == "seq4k":
            offsets = (index * 4096) % size
        elif workload == "random":
            offsets = rng.integers(0, size >> 3, n, dtype=np.int64) << 3
        elif workload == "zipf":
            rank = (rng.zipf(1.2, n).astype(np.int64) - 1) % pages
            page = (rank * 0x9E3779B1) % pages  # odd multiplier: a bijection on 2^k pages
            offsets = (page << 12) | (rng.integers(0, 512, n, dtype=np.int64) << 3)
        else:
            raise ConfigError("workload", f"{workload!r} is not one of {WORKLOADS}")
        kinds = np.zeros(n, np.int8)
        if workload in ("random", "zipf"):
            kinds[::4] = Access.WRITE
        yield BASE + offsets, kinds
        done += n


def _space(
    length: int, guest_page: PageSize, ept_page: PageSize, layout: str = "contiguous"
) -> NestedSpace:
    space = NestedSpace.create(host_memory=1 << 46, guest_memory=1 << 46, layout=layout)
    space.map_range(BASE, length, guest_page, ept_page)
    return space


def _walker_rate(
    space: NestedSpace, gva: npt.NDArray[np.int64], kind: npt.NDArray[np.int8], sample: int
) -> float:
    walker = space.walker()
    n = min(sample, len(gva))
    start = time.perf_counter()
    for g, k in zip(gva[:n].tolist(), kind[:n].tolist(), strict=True):
        walker.translate(g & 0xFFFF_FFFF_FFFF_FFFF, Access(k))
    return n / (time.perf_counter() - start)


def run(
    workload: str,
    accesses: int,
    *,
    chunk: int = 1 << 20,
    walker_sample: int = 3000,
    config: MmuConfig | None = None,
    guest_page: PageSize = PageSize.SIZE_4K,
    ept_page: PageSize = PageSize.SIZE_4K,
    trace: Path | None = None,
    seed: int = 0,
    layout: str = "contiguous",
) -> BenchResult:
    """Time the engine on ``accesses`` accesses of ``workload`` (after a JIT warm-up) and the
    reference walker on a sample of the same stream. ``layout``: ``contiguous`` (the default,
    so figures compare across versions) or ``aged`` (:mod:`eptlab.memory.layout`)."""
    check_layout(layout)
    if workload == "trace":
        if trace is None:
            raise ConfigError("trace", "the trace workload needs --trace FILE")
        return _run_trace(trace, accesses, chunk, walker_sample, config, layout)
    space = _space(footprint(workload), guest_page, ept_page, layout)
    engine = Engine(space.memory, config or MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    warm_gva, warm_kind = next(synthetic_stream(workload, 1000, 1000, seed + 1))
    _must_finish(engine.run(Accesses.build(warm_gva, warm_kind)))  # compile or load the kernels
    _cold(engine)

    elapsed, first = 0.0, None
    for gva, kind in synthetic_stream(workload, accesses, chunk, seed):
        if first is None:
            first = (gva, kind)
        batch = Accesses.build(gva, kind)
        start = time.perf_counter()
        _must_finish(engine.run(batch))
        elapsed += time.perf_counter() - start
    assert first is not None
    result = _result(
        workload, engine, elapsed, _walker_rate(space, *first, walker_sample), walker_sample
    )
    if guest_page == ept_page == PageSize.SIZE_4K and bench_limit.available():
        c_rate = _c_rate(space, engine, workload, accesses, chunk, seed)
        result = dataclasses.replace(
            result,
            c_accesses_per_s=round(c_rate),
            c_fraction=round(result.accesses_per_s / c_rate, 3) if c_rate else None,
        )
    return result


def _c_rate(
    space: NestedSpace, engine: Engine, workload: str, accesses: int, chunk: int, seed: int
) -> float:
    """Accesses per second of the C limit on the same stream (its TLBs start cold)."""
    assert space.vmcs is not None
    limit = bench_limit.CLimit(
        space.memory, space.guest, space.vmcs, space.features.maxphyaddr, engine.config.tlb
    )
    warm_gva, warm_kind = next(synthetic_stream(workload, 1000, 1000, seed + 1))
    limit.run(warm_gva, warm_kind)
    limit.reset()
    elapsed, done = 0.0, 0
    for gva, kind in synthetic_stream(workload, accesses, chunk, seed):
        start = time.perf_counter()
        done += limit.run(gva, kind)
        elapsed += time.perf_counter() - start
    return done / elapsed if elapsed else 0.0


def _cold(engine: Engine) -> None:
    """Forget what the warm-up cached, so the measured run starts cold."""
    engine.invept(InveptType.ALL_CONTEXT)
    engine.flush_caches()
    engine.reset_stats()


def _must_finish(result: object) -> None:
    from .mmu.engine import ChunkResult

    assert isinstance(result, ChunkResult)
    if not result.done:
        raise RuntimeError(
            f"benchmark stream stopped at {result.stopped_at}: {result.exit or result.fault}"
        )


def _result(
    workload: str, engine: Engine, elapsed: float, walker_rate: float, sample: int
) -> BenchResult:
    stats = engine.stats()
    rate = stats.accesses / elapsed if elapsed else 0.0
    return BenchResult(
        workload=workload,
        accesses=stats.accesses,
        seconds=round(elapsed, 4),
        accesses_per_s=round(rate),
        walker_accesses_per_s=round(walker_rate),
        ratio=round(rate / walker_rate, 1) if walker_rate else 0.0,
        walks_per_access=round(stats.walks / max(1, stats.accesses), 4),
        cycles_per_access=round(stats.cycles / max(1, stats.accesses), 1),
        walker_sample=sample,
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )


def _run_trace(
    path: Path,
    accesses: int,
    chunk: int,
    sample: int,
    config: MmuConfig | None,
    layout: str = "contiguous",
) -> BenchResult:
    """Map every page the trace touches (4 KiB guest pages), then run it."""
    space = NestedSpace.create(host_memory=1 << 46, guest_memory=1 << 46, layout=layout)
    engine = Engine(space.memory, config or MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    mapped: set[int] = set()
    elapsed, seen, first = 0.0, 0, None
    for part in read_lackey(path, chunk):
        gva, kind = part.address, part.kind
        if accesses and seen + len(gva) > accesses:
            gva, kind = gva[: accesses - seen], kind[: accesses - seen]
        for page in np.unique(gva >> 12).tolist():
            if page not in mapped:
                space.map((page << 12) & 0xFFFF_FFFF_FFFF_FFFF)
                mapped.add(page)
        if first is None:
            first = (gva, kind)
            _must_finish(engine.run(Accesses.build(gva[:100], kind[:100])))
            _cold(engine)
        start = time.perf_counter()
        _must_finish(engine.run(Accesses.build(gva, kind)))
        elapsed += time.perf_counter() - start
        seen += len(gva)
        if accesses and seen >= accesses:
            break
    if first is None:
        raise ConfigError("trace", f"{path} holds no accesses")
    return _result("trace", engine, elapsed, _walker_rate(space, *first, sample), sample)
