"""Random scenarios shared by the engine tests: a description (plain data, drawn by
hypothesis) that builds the same machine every time it is built."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from eptlab.arch import Access, PageSize
from eptlab.arch.paging import Cr0, Cr4, Efer
from eptlab.errors import MappingError
from eptlab.memory import PhysicalMemory
from eptlab.mmu.scenario import NestedSpace

GiB = 1 << 30
EPT_PERMS = ["rwx"] * 8 + ["r-x", "r--", "rw-", "--x", "---", "-w-", "-wx"]
TABLE_PERMS = ["rwx"] * 8 + ["r-x", "r--"]


@dataclass(frozen=True)
class MappingSpec:
    slot: int  # which 1 GiB slot of the address space (negative: canonical high half)
    offset: int  # offset of the page inside the slot, aligned to the guest page
    guest_page: PageSize
    ept_page: PageSize
    ept_perms: str
    writable: bool
    user: bool
    xd: bool
    pkey: int
    reserved_bit: int  # 0: none; else a bit set raw in the guest leaf
    upper_level: int = 0  # 0: none; else a guest level above the leaf whose entry loses...
    upper_clear: int = 0  # ...these of its P (1), R/W (2), U/S (4) bits
    ept_xu: bool = False  # set bit 10 in every EPT entry mapping the data page (ignored w/o MBEC)


@dataclass(frozen=True)
class ScenarioSpec:
    guest_levels: int
    ept_levels: int
    ept_ad: bool
    mbec: bool
    table_perms: str
    cr0_wp: bool
    smep: bool
    smap: bool
    pke: bool
    nxe: bool
    ac: bool
    pkru: int
    mappings: tuple[MappingSpec, ...]
    pml_index: int = -1  # -1: PML off; else on (needs ept_ad) with this index

    @property
    def pml(self) -> bool:
        return self.pml_index >= 0 and self.ept_ad

    def gva(self, m: MappingSpec) -> int:
        width = 57 if self.guest_levels == 5 else 48
        base = m.slot * GiB if m.slot >= 0 else (1 << 64) - (1 << (width - 1)) + (-m.slot) * GiB
        return base + m.offset

    def build(self) -> NestedSpace:
        cr0 = int(Cr0.PE | Cr0.PG | (Cr0.WP if self.cr0_wp else 0))
        extra = (
            (Cr4.SMEP if self.smep else 0)
            | (Cr4.SMAP if self.smap else 0)
            | (Cr4.PKE if self.pke else 0)
        )
        efer = int(Efer.LME | Efer.LMA | (Efer.NXE if self.nxe else 0))
        space = NestedSpace.create(
            guest_levels=self.guest_levels,
            ept_levels=self.ept_levels,
            ept_ad=self.ept_ad,
            mbec=self.mbec,
            cr0=cr0,
            cr4_extra=int(extra),
            efer=efer,
        )
        space.guest.pkru = self.pkru
        space.guest.rflags = 0x2 | ((1 << 18) if self.ac else 0)
        for m in self.mappings:
            gva = self.gva(m)
            space.map(
                gva,
                m.guest_page,
                m.ept_page,
                ept_perms=m.ept_perms,
                writable=m.writable,
                user=m.user,
                xd=m.xd,
                pkey=m.pkey,
            )
            if m.reserved_bit:
                leaf = space.tables.lookup(gva)
                assert leaf is not None and space.ept is not None
                hpa = space.ept.host_address(leaf.entry_address)
                assert hpa is not None
                space.memory.write_u64(hpa, leaf.value | (1 << m.reserved_bit))
        for m in self.mappings:
            self._set_ept_xu(space, m)
        for m in self.mappings:
            self._clear_upper(space, m)
        if self.table_perms != "rwx":
            space.protect_tables(self.table_perms)
        if self.pml:
            assert space.vmcs is not None
            space.vmcs.pml_enabled = True
            space.vmcs.pml_address = space.host_frames.alloc()
            space.vmcs.pml_index = self.pml_index
        return space

    def _clear_upper(self, space: NestedSpace, m: MappingSpec) -> None:
        """Clear P, R/W or U/S in an entry above the leaf (entries may be shared)."""
        if m.upper_clear and m.guest_page.level < m.upper_level <= self.guest_levels:
            try:
                slot = space.tables.entry_address(self.gva(m), m.upper_level)
            except MappingError:  # a P cleared for another mapping hides this one's tables
                return
            value = space.tables.store.read_u64(slot)
            space.tables.store.write_u64(slot, value & ~m.upper_clear)

    def _set_ept_xu(self, space: NestedSpace, m: MappingSpec) -> None:
        """Bit 10 (execute for user-mode linear addresses with MBEC, ignored without) in every
        EPT entry on the path of the data page."""
        if m.ept_xu and space.ept is not None:
            leaf = space.tables.lookup(self.gva(m))
            if leaf is None:
                return
            gpa = leaf.target
            found = space.ept.lookup(gpa)
            if found is None:
                return
            for level in range(found.level, space.ept.levels + 1):
                slot = space.ept.entry_address(gpa, level)
                space.memory.write_u64(slot, space.memory.read_u64(slot) | (1 << 10))


@st.composite
def mapping_specs(draw: st.DrawFn) -> MappingSpec:
    guest_page = draw(st.sampled_from(list(PageSize)))
    ept_page = draw(st.sampled_from(list(PageSize)))
    slot = draw(st.integers(-8, 40).filter(lambda s: s != 0))
    offset = draw(st.integers(0, GiB // guest_page - 1)) * guest_page
    return MappingSpec(
        slot=slot,
        offset=offset,
        guest_page=guest_page,
        ept_page=ept_page,
        ept_perms=draw(st.sampled_from(EPT_PERMS)),
        writable=draw(st.booleans()),
        user=draw(st.booleans()),
        xd=draw(st.booleans()),
        pkey=draw(st.integers(0, 15)),
        reserved_bit=draw(st.sampled_from([0] * 14 + [50, 47])),
        upper_level=draw(st.integers(2, 5)),
        upper_clear=draw(st.sampled_from([0, 0, 0, 2, 4, 6, 1])),
        ept_xu=draw(st.booleans()),
    )


@st.composite
def scenario_specs(draw: st.DrawFn) -> ScenarioSpec:
    maps = draw(st.lists(mapping_specs(), min_size=1, max_size=5, unique_by=lambda m: m.slot))
    return ScenarioSpec(
        guest_levels=draw(st.sampled_from([4, 5])),
        ept_levels=draw(st.sampled_from([4, 5])),
        ept_ad=draw(st.booleans()),
        mbec=draw(st.booleans()),
        table_perms=draw(st.sampled_from(TABLE_PERMS)),
        cr0_wp=draw(st.booleans()),
        smep=draw(st.sampled_from([False, False, True])),
        smap=draw(st.sampled_from([False, False, True])),
        pke=draw(st.sampled_from([False, False, True])),
        nxe=draw(st.sampled_from([True, True, True, False])),
        ac=draw(st.booleans()),
        pkru=draw(st.integers(0, (1 << 32) - 1)),
        mappings=tuple(maps),
        pml_index=draw(st.sampled_from([-1, -1, 511, 0, 1, 2])),
    )


@st.composite
def access_streams(
    draw: st.DrawFn, spec: ScenarioSpec, size: int = 30
) -> list[tuple[int, Access, bool]]:
    """Accesses near the mapped pages (often the same page again), some anywhere."""
    out = []
    for _ in range(draw(st.integers(1, size))):
        choice = draw(st.integers(0, 9))
        if choice < 8:
            m = draw(st.sampled_from(spec.mappings))
            near = draw(st.sampled_from([0, 0, 0, 8, 64, 4088, 4096, 1 << 21, m.guest_page - 8]))
            gva = spec.gva(m) + min(near, m.guest_page - 8)
        elif choice == 8:
            gva = draw(st.integers(0, (1 << 64) - 1)) & ~7  # anywhere, often non-canonical
        else:
            gva = draw(st.integers(0, 1 << 47)) & ~7
        out.append((gva, draw(st.sampled_from(list(Access))), draw(st.booleans())))
    return out


def snapshot(memory: PhysicalMemory) -> dict[int, bytes]:
    """Every backed frame's bytes (frames of zeros are left out)."""
    out = {}
    for pfn in list(memory._row_of):
        frame = memory.peek_frame(pfn)
        if frame is not None and frame.any():
            out[pfn] = frame.tobytes()
    return out
