"""pytest-benchmark view of the engine (run with ``pytest benchmarks/ --benchmark-only``)."""

from __future__ import annotations

from typing import Any

import pytest

from eptlab.arch.bits import PageSize
from eptlab.bench import _space, footprint, synthetic_stream
from eptlab.mmu.config import MmuConfig
from eptlab.mmu.engine import Accesses, Engine


@pytest.mark.parametrize("workload", ["seq64", "seq4k", "random", "zipf"])
def test_engine_throughput(benchmark: Any, workload: str) -> None:
    space = _space(footprint(workload), PageSize.SIZE_4K, PageSize.SIZE_4K)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    gva, kind = next(synthetic_stream(workload, 1_000_000, 1_000_000))
    batch = Accesses.build(gva, kind)
    engine.run(batch)  # warm-up: compile or load the kernels, fill the caches
    result = benchmark(engine.run, batch)
    assert result.done
    benchmark.extra_info["accesses"] = len(batch)
