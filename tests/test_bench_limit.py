"""The C limit of ``eptlab bench`` (benchmarks/c_limit/walk_limit.c) does the engine's work: on
the same stream it makes as many walks and walk references and reaches the same host-physical
addresses as the engine with the same TLBs and no paging-structure caches (no timing here)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from eptlab import bench, bench_limit
from eptlab.arch.bits import PageSize
from eptlab.mmu.config import Assoc, CacheConfig, MmuConfig, TlbConfig
from eptlab.mmu.engine import Accesses, Engine

pytestmark = pytest.mark.skipif(not bench_limit.available(), reason="no C compiler or source")

UNCACHED_WALKS = {
    name: Assoc(0, 1)
    for name in TlbConfig.__dataclass_fields__
    if name.startswith(("psc_", "ntlb_", "epsc_"))
}


@pytest.mark.parametrize("workload", ["seq4k", "random", "zipf"])
def test_c_loop_walks_like_the_engine(workload: str) -> None:
    # two identical spaces: both loops set the guest's A/D flags, which decides re-walks
    space = bench._space(bench.GiB, PageSize.SIZE_4K, PageSize.SIZE_4K)
    tlb = dataclasses.replace(TlbConfig(), **UNCACHED_WALKS)
    engine = Engine(space.memory, MmuConfig(tlb=tlb, cache=CacheConfig.disabled()), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    twin = bench._space(bench.GiB, PageSize.SIZE_4K, PageSize.SIZE_4K)
    assert twin.vmcs is not None
    limit = bench_limit.CLimit(twin.memory, twin.guest, twin.vmcs, 46, tlb)
    rng = np.random.default_rng(7)
    n = 4000
    if workload == "seq4k":
        gva = bench.BASE + np.arange(n, dtype=np.int64) * 4096
    elif workload == "random":
        gva = bench.BASE + (rng.integers(0, bench.GiB >> 3, n, dtype=np.int64) << 3)
    else:  # a few hot pages: TLB hits, L2 hits and evictions all happen
        gva = bench.BASE + (rng.zipf(1.3, n).astype(np.int64) % 3000 << 12)
    kind = np.zeros(n, np.int8)
    kind[::3] = 1  # writes: some hit clean entries and must walk again
    result = engine.run(Accesses.build(gva, kind), record_hpa=True)
    assert result.done and result.hpa is not None
    assert limit.run(gva, kind) == n
    stats = engine.stats()
    assert limit.walks == stats.walks > 0
    assert limit.references == stats.walk_references == 24 * stats.walks
    assert limit.hpa_sum == int(result.hpa.view(np.uint64).sum(dtype=np.uint64))
    if workload == "zipf":
        assert stats.stlb_hits > 0 and stats.l1d_tlb_hits > 0 and stats.rewalks > 0
