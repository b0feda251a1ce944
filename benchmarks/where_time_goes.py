"""Where the engine's time goes: the same compiled engine under configurations that remove one
part of the model at a time, against the C limit (benchmarks/c_limit), in one process.

    PYTHONPATH=src .venv/bin/python benchmarks/where_time_goes.py seq4k 300000 3

Prints one Markdown row per configuration: engine/C throughput and walk references per access
(docs/speed.md, "Where the time goes"). Times are this thread's CPU time, best of the
repetitions, so a loaded machine's scheduling does not count (its shared caches still do).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from eptlab import bench, bench_limit
from eptlab.arch.bits import PageSize
from eptlab.mmu.config import (
    Assoc,
    CacheConfig,
    CacheLevel,
    MmuConfig,
    PrefetcherConfig,
    TlbConfig,
)
from eptlab.mmu.engine import Accesses, Engine, InveptType


def _off(*prefixes: str) -> dict[str, Assoc]:
    return {k: Assoc(0, 1) for k in TlbConfig.__dataclass_fields__ if k.startswith(prefixes)}


def configurations() -> dict[str, MmuConfig]:
    full, none, off = CacheConfig(), CacheLevel(0, 1, 0), PrefetcherConfig.off()
    bare = CacheConfig.disabled()
    return {
        "full model": MmuConfig(),
        "prefetcher off": MmuConfig(cache=dataclasses.replace(full, prefetcher=off)),
        "no LLC": MmuConfig(cache=dataclasses.replace(full, llc=none)),
        "L1 data cache only": MmuConfig(
            cache=dataclasses.replace(full, l2=none, llc=none, prefetcher=off)
        ),
        "no data caches": MmuConfig(cache=bare),
        "no data caches, no paging-structure caches": MmuConfig(
            tlb=dataclasses.replace(TlbConfig(), **_off("psc_", "epsc_")), cache=bare
        ),
        "the C loop's work": MmuConfig(
            tlb=dataclasses.replace(TlbConfig(), **_off("psc_", "epsc_", "ntlb_")), cache=bare
        ),
    }


def main(workload: str, n: int, reps: int) -> None:
    space = bench._space(bench.footprint(workload), PageSize.SIZE_4K, PageSize.SIZE_4K)
    assert space.vmcs is not None
    gva, kind = next(bench.synthetic_stream(workload, n, n, 0))
    batch = Accesses.build(gva, kind)
    engines = {}
    for name, config in configurations().items():
        engine = Engine(space.memory, config, space.features)
        engine.add_vcpu(space.guest, space.vmcs)
        engine.run(Accesses.build(gva[:1000], kind[:1000]))  # compile or load the kernels
        engines[name] = engine
    limit = bench_limit.CLimit(
        space.memory, space.guest, space.vmcs, space.features.maxphyaddr, TlbConfig()
    )
    best = {name: float("inf") for name in [*engines, "C"]}
    refs: dict[str, float] = {}
    for _ in range(reps):
        for name, engine in engines.items():
            engine.invept(InveptType.ALL_CONTEXT)
            engine.flush_caches()
            engine.reset_stats()
            start = time.thread_time()
            assert engine.run(batch).done
            best[name] = min(best[name], time.thread_time() - start)
            refs[name] = engine.stats().walk_references / n
        limit.reset()
        start = time.thread_time()
        limit.run(gva, kind)
        best["C"] = min(best["C"], time.thread_time() - start)
    refs["C"] = limit.references / n
    for name, seconds in best.items():
        print(f"| {workload} | {name} | {best['C'] / seconds:.2f} | {refs[name]:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
