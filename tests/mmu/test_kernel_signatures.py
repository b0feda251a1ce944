"""The engine's kernel compiles once: every run passes arguments of the same types (numba
compiles a kernel per argument type, tens of seconds each; a read-only array is another type)."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.mmu.engine import Accesses
from eptlab.mmu.kernels import run as kernels_run
from eptlab.mmu.warm import BASE, warm_up


@pytest.mark.skipif(
    not hasattr(kernels_run.run_chunk, "signatures"), reason="numba JIT disabled (plain Python)"
)
def test_read_only_and_broadcast_inputs_reuse_the_one_compiled_kernel() -> None:
    from eptlab.mmu.config import MmuConfig
    from eptlab.mmu.engine import Engine
    from eptlab.mmu.scenario import NestedSpace

    warm_up()
    space = NestedSpace.create(layout="contiguous")
    space.map_range(BASE, 2 << 20)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    frozen = np.arange(4, dtype=np.int64) * 4096 + BASE
    frozen.setflags(write=False)
    kind = np.zeros(4, np.int8)
    kind.setflags(write=False)
    for accesses in (
        Accesses.build([BASE]),  # one access: the broadcast scalars stay read-only views
        Accesses.build(frozen, kind),
        Accesses(frozen, kind, np.zeros(4, np.int8), np.zeros(4, np.int32)),
    ):
        assert engine.run(accesses).done
    assert len(getattr(kernels_run.run_chunk, "signatures")) == 1  # noqa: B009 (numba's)
