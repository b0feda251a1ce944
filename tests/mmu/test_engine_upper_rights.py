"""Fixed engine-vs-walker cases that random scenarios reach only by luck: rights taken away
above the leaf (SDM Vol. 3A §4.6.1: R/W and U/S are the AND over every level, so a
paging-structure-cache entry must carry the AND of the entries above it), EPT bit 10 set with
MBEC off (ignored: qualification bit 6 is reported only with MBEC, SDM Vol. 3C §28.2.1 Table
28-7), and page-modification logging with the index near 0 (SDM Vol. 3C §29.3.6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from eptlab.arch import Access, EptQual, EptViolation, PageSize
from eptlab.arch.exits import EptMisconfig, PmlFull
from eptlab.mmu.config import MmuConfig
from eptlab.mmu.engine import Engine
from eptlab.mmu.scenario import NestedSpace

from .engine_scenarios import MappingSpec, ScenarioSpec
from .test_engine_vs_walker import compare

K4 = PageSize.SIZE_4K


def mapping(slot: int, offset: int = 0, **kw: object) -> MappingSpec:
    base: dict[str, object] = dict(
        slot=slot, offset=offset, guest_page=K4, ept_page=K4, ept_perms="rwx", writable=True,
        user=True, xd=False, pkey=0, reserved_bit=0,
    )
    base.update(kw)
    return MappingSpec(**base)  # type: ignore[arg-type]


def spec(*maps: MappingSpec, **kw: object) -> ScenarioSpec:
    base: dict[str, object] = dict(
        guest_levels=4, ept_levels=4, ept_ad=False, mbec=False, table_perms="rwx", cr0_wp=True,
        smep=False, smap=False, pke=False, nxe=True, ac=False, pkru=0, mappings=maps,
    )
    base.update(kw)
    return ScenarioSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("level", "clear"), [(4, 2), (3, 2), (4, 4), (3, 4), (4, 6)])
@pytest.mark.parametrize("cached", [True, False])
def test_rights_cleared_above_the_leaf(level: int, clear: int, cached: bool) -> None:
    """Two pages under one page table, R/W or U/S cleared in the PML4E or PDPTE: the first
    access fills the paging-structure caches, the second (another page: a TLB miss) starts
    from them and must still see the cleared right."""
    s = spec(
        mapping(3, 0, upper_level=level, upper_clear=clear),
        mapping(3, 0x1000, upper_level=level, upper_clear=clear),
    )
    g0, g1 = s.gva(s.mappings[0]), s.gva(s.mappings[1])
    stream = [(g0, Access.READ, False), (g1, Access.WRITE, False), (g1, Access.WRITE, True),
              (g0, Access.READ, True), (g1 + 8, Access.READ, True)]
    compare(s, stream, MmuConfig() if cached else MmuConfig.uncached(), exact=not cached)


@pytest.mark.parametrize("perms", ["r--", "r-x", "---"])
def test_qualification_bit_6_needs_mbec(perms: str) -> None:
    s = spec(mapping(5, ept_perms=perms, ept_xu=True))
    gva = s.gva(s.mappings[0])
    space = s.build()
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    for _ in range(2):  # cold, then through the EPT paging-structure caches
        result = engine.translate(gva, Access.WRITE)
        assert isinstance(result.exit, EptViolation)
        assert not result.exit.qualification & EptQual.USER_EXECUTABLE
    compare(s, [(gva, Access.WRITE, True), (gva, Access.WRITE, True)], MmuConfig(), exact=False)


@pytest.mark.parametrize("index", [0, 1, 2, 511])
def test_pml_near_full(index: int) -> None:
    """Writes to fresh pages log their GPAs downwards from ``index``; at index 0 the next
    logging write takes a PML-full exit (the differential test compares the index and the log
    in memory with the walker's)."""
    maps = [mapping(7, i * 0x1000) for i in range(4)]
    s = spec(*maps, ept_ad=True, pml_index=index)
    assert s.pml
    stream = [(s.gva(m), Access.WRITE, False) for m in maps] + [
        (s.gva(maps[0]) + 8, Access.WRITE, False)
    ]
    compare(s, stream, MmuConfig.uncached(), exact=True)
    compare(s, stream, MmuConfig(), exact=False)
    # the log really moved: the engine's index is not the initial one (or a PML-full exit)
    space = s.build()
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    assert space.vmcs is not None
    outcomes = [engine.translate(g, a) for g, a, _ in stream]
    full = [r for r in outcomes if r.exit is not None]
    assert space.vmcs.pml_index != index or full
    if index < 3:
        assert full and isinstance(full[0].exit, PmlFull)


@dataclass(frozen=True)
class Custom:
    """A machine built by a function (``compare`` builds it twice: walker and engine)."""

    make: Callable[[], NestedSpace]

    def build(self) -> NestedSpace:
        return self.make()


GVA = 0x7F00_0000_0000


def with_ept_memtype(memtype: int) -> NestedSpace:
    space = NestedSpace.create()
    gpa = space.map(GVA)
    assert space.ept is not None
    leaf = space.ept.lookup(gpa)
    assert leaf is not None
    space.memory.write_u64(leaf.entry_address, (leaf.value & ~(7 << 3)) | (memtype << 3))
    return space


@pytest.mark.parametrize("memtype", [0, 1, 2, 3, 4, 5, 6, 7])
def test_ept_leaf_memory_types(memtype: int) -> None:
    """Types 2, 3 and 7 are reserved: an EPT misconfiguration (SDM Vol. 3C §29.3.3.1)."""
    custom = Custom(lambda: with_ept_memtype(memtype))
    stream = [(GVA, Access.READ, False), (GVA + 8, Access.WRITE, False)]
    compare(custom, stream, MmuConfig.uncached(), exact=True)  # type: ignore[arg-type]
    space = custom.build()
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    bad = isinstance(engine.translate(GVA, Access.READ).exit, EptMisconfig)
    assert bad == (memtype in (2, 3, 7))


def with_guest_large_page_bit_12() -> NestedSpace:
    """A 2 MiB guest page whose PDE has bit 12 (PAT) set: legal, not reserved (SDM Vol. 3A
    Table 4-18)."""
    space = NestedSpace.create()
    space.map(GVA, PageSize.SIZE_2M)
    leaf = space.tables.lookup(GVA)
    assert leaf is not None and leaf.level == 2
    space.tables.store.write_u64(leaf.entry_address, leaf.value | (1 << 12))
    return space


def test_guest_pat_bit_of_a_large_page_is_not_reserved() -> None:
    custom = Custom(with_guest_large_page_bit_12)
    stream = [(GVA, Access.READ, False), (GVA + 0x1000, Access.WRITE, False)]
    compare(custom, stream, MmuConfig.uncached(), exact=True)  # type: ignore[arg-type]
    space = custom.build()
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    assert engine.translate(GVA, Access.READ).done


@pytest.mark.parametrize("guest_ad_first", [False, True])
def test_write_after_read_sets_the_ept_dirty_flag_through_cached_entries(
    guest_ad_first: bool,
) -> None:
    """EPT A/D on: a read caches the page clean (TLB and nested TLB); the write that follows
    must not use either as cached but walk and set the EPT dirty flag (SDM Vol. 3C §29.3.5)
    and the guest's, leaving memory as the walker leaves it."""
    s = spec(mapping(9), mapping(10), ept_ad=True)
    g = s.gva(s.mappings[0])
    stream = [(g, Access.READ, False), (g + 8, Access.WRITE, False)]
    if guest_ad_first:  # the guest's own dirty flag already set: only the EPT's is missing
        stream = [(g, Access.WRITE, False), (g + 16, Access.READ, False)] + stream
    compare(s, stream, MmuConfig(), exact=False)
    compare(s, stream, MmuConfig.uncached(), exact=True)


@pytest.mark.parametrize(
    ("perms", "access"),
    [("r--", Access.WRITE), ("rw-", Access.FETCH), ("r-x", Access.WRITE), ("---", Access.READ)],
)
def test_violation_qualification_bits_3_to_5_are_the_entry_rights(
    perms: str, access: Access
) -> None:
    """Bits 3, 4, 5 of the qualification: readable, writable, executable, from the EPT entries
    walked (SDM Vol. 3C §28.2.1 Table 28-7), cold and through the EPT paging-structure caches."""
    s = spec(mapping(11, ept_perms=perms))
    gva = s.gva(s.mappings[0])
    space = s.build()
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    expected = sum(bit << (3 + i) for i, bit in enumerate(c != "-" for c in perms))
    for _ in range(2):
        exit_ = engine.translate(gva, access).exit
        assert isinstance(exit_, EptViolation)
        assert exit_.qualification & 0x38 == expected
    compare(s, [(gva, access, False)], MmuConfig.uncached(), exact=True)
