"""The batch loop: translate and perform a chunk of accesses until done or until something
needs software (a guest fault or a VM exit)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import kernel
from .cache import access_data
from .layout import (
    COST_CACHE,
    EXIT_NONE,
    ST_ACCESSES,
    ST_CYCLES,
    ST_DATA_CACHE,
    ST_DATA_CYCLES,
    ST_READS,
    ST_TRANSLATION_CYCLES,
    X_INDEX,
    X_KIND,
)
from .walk import tlb_translate, walk_translate


@kernel
def run_chunk(stream, start, mem, caches, machine, log):  # type: ignore[no-untyped-def]
    """Run accesses ``start..len(stream.gva)-1`` (:class:`state.Stream`). Returns the index of
    the first access not performed (``len(stream.gva)`` when all were); ``log.exit_info`` then
    describes why. A faulting access is not performed: after the handler, resume at the
    returned index to retry it."""
    stats, exit_info, out_hpa = log.stats, log.exit_info, log.out_hpa
    cost = machine.cost
    record = out_hpa.shape[0] > 0
    for k in range(exit_info.shape[0]):
        exit_info[k] = 0
    for i in range(start, stream.gva.shape[0]):
        v = stream.vcpu[i]
        access = stream.kind[i]
        va = stream.gva[i]
        is_user = stream.user[i] != 0
        hit, hpa, cycles = tlb_translate(va, access, is_user, v, caches, machine, log)
        if not hit:
            status, hpa, cycles = walk_translate(
                va, access, is_user, i, v, cycles, mem, caches, machine, log
            )
            if status != EXIT_NONE:
                exit_info[X_INDEX] = i
                return i
        where = access_data(
            caches.cache, caches.cdesc, v, hpa, caches.heads, caches.pf, caches.pcfg, stats
        )
        data_cycles = cost[COST_CACHE + where]
        stats[v, ST_DATA_CACHE + where] += 1
        stats[v, ST_READS + access] += 1
        stats[v, ST_TRANSLATION_CYCLES] += cycles
        stats[v, ST_DATA_CYCLES] += data_cycles
        if record:
            out_hpa[i] = hpa
            log.out_where[i] = where
    exit_info[X_KIND] = EXIT_NONE
    return stream.gva.shape[0]


def derive_totals(stats: npt.NDArray[np.int64]) -> None:
    """The two sums :func:`run_chunk` does not count per access (a cheaper loop), computed from
    their parts once a run has returned: accesses = reads + writes + fetches, cycles =
    translation cycles + data cycles (plain numpy, on every vCPU's row)."""
    stats[:, ST_ACCESSES] = stats[:, ST_READS : ST_READS + 3].sum(axis=1)
    stats[:, ST_CYCLES] = stats[:, ST_TRANSLATION_CYCLES] + stats[:, ST_DATA_CYCLES]
