"""The batch loop: translate and perform a chunk of accesses until done or until something
needs software (a guest fault or a VM exit)."""

from __future__ import annotations

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
def run_chunk(
    gva,
    kind,
    user,
    vcpu,
    start,
    regs,
    feat,
    rows,
    htable,
    tlb,
    desc,
    cache,
    cdesc,
    cost,
    stats,
    refs,
    ref_count,
    heads,
    exit_info,
    out_hpa,
    res,
    scratch,
    pf,
    pcfg,
):  # type: ignore[no-untyped-def]
    """Run accesses ``start..len(gva)-1``. Returns the index of the first access not performed
    (``len(gva)`` when all were); exit_info then describes why. A faulting access is not
    performed: after the handler, resume at the returned index to retry it."""
    record = out_hpa.shape[0] > 0
    for k in range(exit_info.shape[0]):
        exit_info[k] = 0
    for i in range(start, gva.shape[0]):
        v = vcpu[i]
        access = kind[i]
        va = gva[i]
        is_user = user[i] != 0
        if not tlb_translate(va, access, is_user, v, regs, tlb, desc, cost, stats, res):
            status = walk_translate(
                va,
                access,
                is_user,
                i,
                v,
                regs,
                feat,
                rows,
                htable,
                tlb,
                desc,
                cache,
                cdesc,
                cost,
                stats,
                refs,
                ref_count,
                heads,
                exit_info,
                res,
                scratch,
            )
            if status != EXIT_NONE:
                exit_info[X_INDEX] = i
                return i
        hpa = res[0]
        where = access_data(cache, cdesc, v, hpa, heads, pf, pcfg, stats)
        data_cycles = cost[COST_CACHE + where]
        stats[v, ST_DATA_CACHE + where] += 1
        stats[v, ST_ACCESSES] += 1
        stats[v, ST_READS + access] += 1
        stats[v, ST_TRANSLATION_CYCLES] += res[4]
        stats[v, ST_DATA_CYCLES] += data_cycles
        stats[v, ST_CYCLES] += res[4] + data_cycles
        if record:
            out_hpa[i] = hpa
    exit_info[X_KIND] = EXIT_NONE
    return gva.shape[0]
