"""Engine statistics against counts derived from the access stream: after INVLPG drops the
guest-linear translations (and paging-structure-cache entries) of a page, its next walk reads
every guest entry again, and every guest-physical address it needs (each table page and the
data page) was translated by the first walk: each is exactly one nested-TLB hit, and no EPT
entry is read (SDM Vol. 3C §29.4.2: INVLPG leaves guest-physical mappings cached)."""

from __future__ import annotations

import pytest

from eptlab.arch import Access
from eptlab.mmu.config import MmuConfig
from eptlab.mmu.engine import Engine
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
