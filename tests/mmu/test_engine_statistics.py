"""Engine statistics against counts derived from the access stream: after INVLPG drops the
guest-linear translations (and paging-structure-cache entries) of a page, its next walk reads
every guest entry again, and every guest-physical address it needs (each table page and the
data page) was translated by the first walk: each is exactly one nested-TLB hit, and no EPT
entry is read (SDM Vol. 3C §29.4.2: INVLPG leaves guest-physical mappings cached)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from eptlab.arch import Access
from eptlab.mmu.config import Assoc, MmuConfig, TlbConfig
from eptlab.mmu.engine import Accesses, Engine
from eptlab.mmu.scenario import NestedSpace

GVA = 0x7F00_0000_0000


@pytest.mark.parametrize("levels", [4, 5])
def test_nested_tlb_hits_equal_the_guest_physical_translations_they_serve(levels: int) -> None:
    space = NestedSpace.create(guest_levels=levels)
    pages = 1  # more pages: later walks start from paging-structure-cache entries (HPAs)
    for i in range(pages):
        space.map(GVA + i * 4096)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    for i in range(pages):
        assert engine.translate(GVA + i * 4096, Access.READ).done
    before = engine.stats(0)
    for i in range(pages):
        engine.invlpg(0, GVA + i * 4096)
    for i in range(pages):
        assert engine.translate(GVA + i * 4096, Access.READ).done
    after = engine.stats(0)
    guest_refs = sum(after.guest_refs) - sum(before.guest_refs)
    assert after.walks - before.walks == pages
    assert guest_refs >= pages  # at least each leaf PTE
    # one nested-TLB hit per guest entry read plus one per data page, and no EPT reference
    assert after.nested_tlb_hits - before.nested_tlb_hits == guest_refs + pages
    assert after.ept_refs == before.ept_refs
    assert after.accesses - before.accesses == pages


def engine_over(pages: int, config: MmuConfig) -> tuple[NestedSpace, Engine]:
    space = NestedSpace.create()
    for i in range(pages):
        space.map(GVA + i * 4096)
    engine = Engine(space.memory, config, space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    return space, engine


def test_reads_writes_and_fetches_are_counted_by_kind() -> None:
    _, engine = engine_over(2, MmuConfig())
    kinds = [Access.READ, Access.WRITE, Access.WRITE, Access.FETCH, Access.READ, Access.WRITE]
    gvas = [GVA + (i % 2) * 4096 + 8 * i for i in range(len(kinds))]
    result = engine.run(Accesses.build(gvas, [int(k) for k in kinds]), 0)
    assert result.done
    stats = engine.stats(0)
    assert (stats.reads, stats.writes, stats.fetches) == (
        kinds.count(Access.READ), kinds.count(Access.WRITE), kinds.count(Access.FETCH)
    )
    assert stats.accesses == len(kinds)


def test_an_stlb_hit_refills_the_l1_tlb() -> None:
    """L1 DTLB of one entry, STLB of many: A, B, A, A. The second A misses the L1 TLB (B
    replaced it) and hits the STLB, which puts A back in the L1 TLB: the last A hits there."""
    tiny = replace(TlbConfig(), l1d_4k=Assoc(1, 1))
    _, engine = engine_over(2, MmuConfig(tlb=tiny))
    a, b = GVA, GVA + 4096
    assert engine.run(Accesses.build([a, b, a, a]), 0).done
    stats = engine.stats(0)
    assert stats.walks == 2 and stats.stlb_hits == 1 and stats.l1d_tlb_hits == 1


def test_paging_structure_cache_hits_are_reported_by_level() -> None:
    """A second page under the same page table: its walk starts from the cached PDE (level 2),
    reported in ``psc_hits[0]`` (levels 2..5)."""
    _, engine = engine_over(2, MmuConfig())
    assert engine.translate(GVA, Access.READ).done
    assert engine.stats(0).psc_hits == (0, 0, 0, 0)
    assert engine.translate(GVA + 4096, Access.READ).done
    assert engine.stats(0).psc_hits == (1, 0, 0, 0)
