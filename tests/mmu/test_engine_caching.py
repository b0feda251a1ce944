"""What the engine's caches keep, and what each invalidation drops (SDM Vol. 3A §4.10.4,
Vol. 3C §29.4.3): a translation cached before a change is used until it is invalidated."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.arch import Access, EptQual, EptViolation, PageSize
from eptlab.arch.ept import Ept
from eptlab.mmu.config import CacheConfig, MmuConfig, PrefetcherConfig
from eptlab.mmu.engine import Accesses, Engine, InveptType, InvvpidType
from eptlab.mmu.scenario import NestedSpace

GVA = 0x7F00_0000_0000


def setup(ept_ad: bool = False, pml: bool = False) -> tuple[NestedSpace, Engine]:
    space = NestedSpace.create(ept_ad=ept_ad)
    space.map(GVA)
    if pml:
        assert space.vmcs is not None
        space.vmcs.pml_enabled = True
        space.vmcs.pml_address = space.host_frames.alloc()
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    return space, engine


def hpa_of(engine: Engine, gva: int, access: Access = Access.READ) -> int:
    result = engine.translate(gva, access)
    assert result.done, (result.exit, result.fault)
    assert result.hpa is not None
    return int(result.hpa[0])


def remap_ept(space: NestedSpace, gva: int) -> int:
    """Point the EPT leaf of gva's page at a fresh host frame (no invalidation)."""
    assert space.ept is not None
    gpa = space.tables.guest_physical(gva)
    assert gpa is not None
    new = space.host_frames.alloc()
    space.ept.map(gpa & ~0xFFF, new, replace=True)
    return new + (gva & 0xFFF)


def test_ept_remap_is_invisible_until_invept() -> None:
    space, engine = setup()
    old = hpa_of(engine, GVA + 8)
    new = remap_ept(space, GVA + 8)
    assert space.walker().translate(GVA + 8, Access.READ).hpa == new  # memory says new
    assert hpa_of(engine, GVA + 8) == old  # the TLB still says old
    assert space.vmcs is not None
    other = space.vmcs.eptp.encode() ^ (1 << 12)
    engine.invept(InveptType.SINGLE_CONTEXT, other)  # another EPTP: nothing changes
    assert hpa_of(engine, GVA + 8) == old
    engine.invept(InveptType.SINGLE_CONTEXT, space.vmcs.eptp.encode())
    assert hpa_of(engine, GVA + 8) == new


def test_invept_all_context() -> None:
    space, engine = setup()
    old = hpa_of(engine, GVA)
    new = remap_ept(space, GVA)
    assert hpa_of(engine, GVA) == old
    engine.invept(InveptType.ALL_CONTEXT)
    assert hpa_of(engine, GVA) == new


def test_guest_remap_needs_invlpg() -> None:
    space, engine = setup()
    old = hpa_of(engine, GVA)
    gpa2 = space.guest_frames.alloc()
    space.map_ept(gpa2)
    space.tables.map(GVA, gpa2, replace=True)
    assert hpa_of(engine, GVA) == old
    engine.invlpg(0, GVA + 0x123)  # any address in the page
    assert space.ept is not None
    assert hpa_of(engine, GVA) == space.ept.host_address(gpa2)


def test_write_protect_takes_effect_only_after_invept() -> None:
    space, engine = setup()
    hpa_of(engine, GVA, Access.WRITE)  # cached with its dirty flag set
    assert space.ept is not None and space.vmcs is not None
    gpa = space.tables.guest_physical(GVA)
    assert gpa is not None
    space.ept.set_permissions(gpa, read=True, write=False, execute=True)
    assert engine.translate(GVA, Access.WRITE).done  # stale: the write goes through
    engine.invept(InveptType.SINGLE_CONTEXT, space.vmcs.eptp.encode())
    result = engine.translate(GVA, Access.WRITE)
    assert isinstance(result.exit, EptViolation)
    assert result.exit.gpa == gpa
    assert result.exit.qualification & EptQual.WRITE
    assert not result.exit.qualification & EptQual.WRITABLE


def test_write_after_read_walks_again_to_set_dirty() -> None:
    space, engine = setup()
    hpa_of(engine, GVA)
    hpa_of(engine, GVA, Access.WRITE)
    s = engine.stats()
    assert s.walks == 2 and s.rewalks == 1
    leaf = space.tables.lookup(GVA)
    assert leaf is not None and space.ept is not None
    hpa = space.ept.host_address(leaf.entry_address)
    assert hpa is not None and space.memory.read_u64(hpa) & 0x40  # guest D set
    hpa_of(engine, GVA, Access.WRITE)
    assert engine.stats().walks == 2  # third access: an L1 DTLB hit


def test_pml_rearm_needs_invept() -> None:
    """Clearing EPT D without INVEPT: the cached dirty translation logs nothing (DESIGN.md)."""
    space, engine = setup(ept_ad=True, pml=True)
    assert space.vmcs is not None and space.ept is not None
    gpa = space.tables.guest_physical(GVA)
    assert gpa is not None
    hpa_of(engine, GVA, Access.WRITE)
    log = space.vmcs.pml_address
    logged = {space.memory.read_u64(log + 8 * i) for i in range(space.vmcs.pml_index + 1, 512)}
    assert gpa & ~0xFFF in logged
    before = space.vmcs.pml_index
    leaf = space.ept.lookup(gpa)
    assert leaf is not None and leaf.value & Ept.D
    space.memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.D))  # re-arm
    hpa_of(engine, GVA, Access.WRITE)
    assert space.vmcs.pml_index == before  # not logged: the TLB still says dirty
    engine.invept(InveptType.SINGLE_CONTEXT, space.vmcs.eptp.encode())
    hpa_of(engine, GVA, Access.WRITE)
    assert space.vmcs.pml_index == before - 1
    assert space.memory.read_u64(log + 8 * before) == gpa & ~0xFFF


def test_mov_cr3_keeps_global_translations() -> None:
    space = NestedSpace.create()
    space.map(GVA)
    glob = GVA + (1 << 30)
    gpa = space.guest_frames.alloc()
    space.map_ept(gpa)
    space.tables.map(glob, gpa, global_=True)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    hpa_of(engine, GVA)
    hpa_of(engine, glob)
    walks = engine.stats().walks
    engine.mov_cr3(0, space.guest.cr3)
    hpa_of(engine, glob)
    assert engine.stats().walks == walks  # global: still cached
    hpa_of(engine, GVA)
    assert engine.stats().walks == walks + 1


def test_invvpid_keeps_guest_physical_mappings() -> None:
    space, engine = setup()
    hpa_of(engine, GVA)
    assert space.vmcs is not None
    engine.invvpid(InvvpidType.SINGLE_CONTEXT, space.vmcs.vpid)
    before = engine.stats()
    hpa_of(engine, GVA)
    after = engine.stats()
    assert after.walks == before.walks + 1
    assert after.nested_tlb_hits > before.nested_tlb_hits  # GPA->HPA survived INVVPID
    engine.invept(InveptType.ALL_CONTEXT)
    hpa_of(engine, GVA)
    assert engine.stats().ept_refs[0] > after.ept_refs[0]  # now EPT walks again


def test_invvpid_individual_address_needs_address() -> None:
    _, engine = setup()
    from eptlab.errors import ConfigError

    with pytest.raises(ConfigError):
        engine.invvpid(InvvpidType.INDIVIDUAL_ADDRESS, 1)


def test_statistics_of_a_sequential_stream() -> None:
    space = NestedSpace.create(layout="contiguous")  # the counts below follow from placement
    space.map(GVA)
    no_prefetcher = MmuConfig(cache=CacheConfig(prefetcher=PrefetcherConfig.off()))
    engine = Engine(space.memory, no_prefetcher, space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    result = engine.run(Accesses.build(GVA + np.arange(0, 4096, 64, dtype=np.int64)))
    assert result.done
    s = engine.stats()
    assert s.accesses == 64 and s.reads == 64
    assert s.walks == 1 and s.l1d_tlb_hits == 63
    # a cold 4/4 walk with caches on: the first guest entry costs a full EPT walk (4 + 1); the
    # next table pages lie in the same 2 MiB of guest-physical memory, so the EPT PDE cache
    # filled by the first one leaves 1 EPT reference each (3 x 2); the data GPA is in another
    # 1 GiB region of the same 512 GiB: the EPT PML4E cache hits (3). 5 + 6 + 3 = 14.
    assert s.walk_references == 14
    assert s.guest_refs[:4] == (1, 1, 1, 1) and s.ept_refs[:4] == (5, 2, 2, 1)
    assert s.ept_psc_hits == 4
    assert s.data_served == (0, 0, 0, 64)  # 64 distinct lines, all cold
    assert s.prefetches == s.useful_prefetches == 0
    assert s.cycles == s.translation_cycles + s.data_cycles > 0
    flat = s.as_dict()
    assert flat["walks"] == 1 and flat["guest_refs_l4"] == 1 and flat["tlb_miss_rate"] == 1 / 64
    engine.run(Accesses.build(GVA + np.arange(0, 4096, 64, dtype=np.int64)))
    again = engine.stats()
    assert again.walks == 1 and again.data_served == (64, 0, 0, 64)  # now all L1 hits


def test_uncached_walk_costs_the_full_24() -> None:
    space = NestedSpace.create()
    space.map(GVA)
    engine = Engine(space.memory, MmuConfig.uncached(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    engine.run(Accesses.build(GVA + np.arange(0, 4096, 64, dtype=np.int64)))
    s = engine.stats()
    assert s.walks == 64 and s.walk_references == 64 * 24
    assert s.guest_refs[:4] == (64, 64, 64, 64) and s.ept_refs[:4] == (320,) * 4


def test_second_page_walk_uses_paging_structure_caches() -> None:
    space = NestedSpace.create()
    space.map(GVA)
    space.map(GVA + 4096)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    engine.run(Accesses.build([GVA, GVA + 4096]))
    s = engine.stats()
    assert s.walks == 2
    assert s.psc_hits[0] == 1  # the PDE cache gave the page table of the second page
    # second walk: 1 guest PTE read, its EPT translation from the nested TLB / caches, and the
    # EPT walk of the data page partly from the EPT paging-structure caches
    assert s.walk_references < 24 + 10


def test_engine_input_errors_are_named() -> None:
    from eptlab.errors import ConfigError

    space = NestedSpace.create()
    engine = Engine(space.memory, MmuConfig(), space.features)
    with pytest.raises(ConfigError, match="add a vCPU"):
        engine.run(Accesses.build([GVA]))
    engine.add_vcpu(space.guest, space.vmcs)
    with pytest.raises(ConfigError, match="vcpu"):
        engine.run(Accesses.build([GVA], vcpu=3))
    with pytest.raises(ConfigError, match="kind"):
        Accesses.build([GVA], kind=7)


def test_accesses_accept_unsigned_high_half_addresses() -> None:
    high = 0xFFFF_8000_0000_1000
    a = Accesses.build(np.array([high], dtype=np.uint64))
    b = Accesses.build([high])
    assert a.gva.dtype == np.int64 and a.gva.tolist() == b.gva.tolist() == [high - (1 << 64)]


def test_two_vcpus_have_their_own_tlbs() -> None:
    space = NestedSpace.create()
    space.map(GVA)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    engine.add_vcpu(space.guest, space.vmcs)
    result = engine.run(Accesses.build([GVA, GVA, GVA, GVA], vcpu=[0, 0, 1, 1]))
    assert result.done
    assert engine.stats(0).walks == 1 and engine.stats(1).walks == 1
    assert engine.stats(0).l1d_tlb_hits == 1 and engine.stats(1).l1d_tlb_hits == 1


def test_invept_acts_on_the_executing_vcpu_only() -> None:
    """INVEPT invalidates on the logical processor that runs it: the other vCPU keeps its stale
    translation until it invalidates too (why a hypervisor needs a TLB shootdown)."""
    space = NestedSpace.create()
    space.map(GVA)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    engine.add_vcpu(space.guest, space.vmcs)
    old = hpa_of(engine, GVA)
    assert int(engine.translate(GVA, Access.READ, vcpu=1).hpa[0]) == old  # type: ignore[index]
    new = remap_ept(space, GVA)
    assert space.vmcs is not None
    engine.invept(InveptType.SINGLE_CONTEXT, space.vmcs.eptp.encode(), vcpus=[0])
    assert hpa_of(engine, GVA) == new
    assert int(engine.translate(GVA, Access.READ, vcpu=1).hpa[0]) == old  # type: ignore[index]
    engine.invept(InveptType.SINGLE_CONTEXT, space.vmcs.eptp.encode(), vcpus=[1])
    assert int(engine.translate(GVA, Access.READ, vcpu=1).hpa[0]) == new  # type: ignore[index]


@pytest.mark.parametrize("use_ept", [False, True])
def test_tlb_entry_covers_the_guest_large_page(use_ept: bool) -> None:
    """A 2 MiB guest page (over a 2 MiB EPT page, or natively) is one TLB entry."""
    space = NestedSpace.create(use_ept=use_ept)
    space.map(GVA, PageSize.SIZE_2M, PageSize.SIZE_2M)
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    assert engine.run(Accesses.build(GVA + np.arange(0, 1 << 21, 1 << 16))).done
    s = engine.stats()
    assert s.walks == 1 and s.l1d_tlb_hits == 31
