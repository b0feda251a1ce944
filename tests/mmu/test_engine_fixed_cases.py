"""Fixed cases for the fast engine that the mutation lists showed the fast (kernel-mutant)
selection could not see (docs/mutation.md): each compares the engine with the reference
walker, or with counts derived from the accesses, on one small machine."""

from __future__ import annotations

import numpy as np

from eptlab.arch import Access, PageSize
from eptlab.mmu.config import MmuConfig
from eptlab.mmu.engine import Accesses, Engine, InvvpidType
from eptlab.mmu.scenario import NestedSpace

GVA = 0x7F00_0000_0000


def _engine(space: NestedSpace) -> Engine:
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    return engine


def test_a_guest_2m_page_over_4k_ept_pages_caches_4k_translations() -> None:
    """SDM Vol. 3C §29.4.2: a combined TLB entry maps min(guest page, EPT page). The two EPT
    pages below get host frames that are not 0x5000 apart, so a 2 MiB TLB entry would send the
    second access to the wrong frame."""
    space = NestedSpace.create()
    base = space.map(GVA, PageSize.SIZE_2M, PageSize.SIZE_4K)  # backs the first 4 KiB only
    space.host_frames.alloc()  # a gap in host memory
    space.map_ept(base + 0x5000)
    walker = space.walker()
    engine = _engine(space)
    for gva in (GVA + 0x18, GVA + 0x5018, GVA + 0x20, GVA + 0x5020):
        expected = walker.translate(gva, Access.READ).hpa
        result = engine.translate(gva, Access.READ)
        assert result.done and result.hpa is not None
        assert int(result.hpa[0]) == expected
    stats = engine.stats()
    assert stats.walks == 2  # one per 4 KiB EPT page; the repeats hit the TLB
    assert stats.l1d_tlb_hits == 2


def test_invvpid_retaining_globals_keeps_global_translations_only() -> None:
    """INVVPID type 3 (single context, retaining globals, SDM Vol. 3C §29.4.3.3)."""
    space = NestedSpace.create()
    space.map(GVA)
    glob = GVA + (1 << 30)
    gpa = space.guest_frames.alloc()
    space.map_ept(gpa)
    space.tables.map(glob, gpa, global_=True)
    engine = _engine(space)
    assert engine.run(Accesses.build(np.array([GVA, glob], np.int64))).done
    walks = engine.stats().walks
    assert space.vmcs is not None
    engine.invvpid(InvvpidType.SINGLE_CONTEXT_RETAINING_GLOBALS, space.vmcs.vpid)
    assert engine.translate(glob, Access.READ).done
    assert engine.stats().walks == walks  # global: kept
    assert engine.translate(GVA, Access.READ).done
    assert engine.stats().walks == walks + 1  # not global: dropped
    engine.invvpid(InvvpidType.SINGLE_CONTEXT, space.vmcs.vpid)
    assert engine.translate(glob, Access.READ).done
    assert engine.stats().walks == walks + 2  # type 1 drops globals too
