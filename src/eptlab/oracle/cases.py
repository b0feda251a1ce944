"""Random cases for the Bochs oracle: one guest page mapping under EPT, built with eptlab's own
table builders into a small host memory laid out like the harness's, plus one access.

Layout (host-physical = the harness's memory): EPT tables at [32, 64) MiB, guest page tables and
the data page at [64, 128) MiB. Guest-physical addresses live in [512 GiB, 1 TiB) (EPT PML4E 1;
the harness maps [0, 512 GiB) for its own stub through PML4E 0) with their low 30 bits in
[64, 128) MiB, and every EPT leaf maps GPA ``g`` to HPA ``g mod 1 GiB``, so 4 KiB, 2 MiB and
1 GiB EPT pages all land in the same host frames (a 1 GiB EPT page maps host [0, 1 GiB)).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import numpy as np

from ..arch.access import Access, Mode
from ..arch.bits import PAGE_SIZE, PageSize, bit, bits
from ..arch.ept import Ept, ept_is_leaf, ept_is_present
from ..arch.paging import Cr0, Cr4, Efer, Pte, canonical, is_leaf
from ..memory import PhysicalMemory
from ..mmu.context import CpuFeatures, GuestState, Vmcs
from ..tables import EptTables, GuestPageTables, GuestPhysicalStore, HostStore

MAXPHYADDR = 40
"""Bochs 2.7's physical-address width (BX_PHY_ADDRESS_WIDTH, CPUID 0x80000008)."""

FEATURES = CpuFeatures(maxphyaddr=MAXPHYADDR, ept_execute_only=True, advanced_ept_exit_info=False)
"""What Bochs's corei7_skylake_x / corei7_icelake_u / tigerlake models report
(IA32_VMX_EPT_VPID_CAP: execute-only, 4-level walks, 2 MiB/1 GiB pages, A/D flags; no advanced
VM-exit information for EPT violations; no mode-based execute control)."""

GiB, MiB = 1 << 30, 1 << 20
GPA_BASE = 512 * GiB
EPT_TABLE_HPA = 32 * MiB
TABLE_LOW, DATA_LOW = 64 * MiB, 96 * MiB
PML_PAGE = 0x305000
"""Host-physical address of the harness's PML log page (harness.c)."""
CASE_MAGIC = 0x45505443415345
HEADER_WORDS = 15

CR0_BASE = int(Cr0.PE | Cr0.PG)
_SIZES = (PageSize.SIZE_4K, PageSize.SIZE_2M, PageSize.SIZE_1G)


@dataclass
class Case:
    """One built case: its memory (before the access) and everything the access depends on."""

    id: int
    memory: PhysicalMemory
    guest: GuestState
    vmcs: Vmcs
    gva: int
    access: Access
    mode: Mode
    pages: list[int]  # host frames the case writes (zeroed first by the harness)
    notes: dict[str, object] = field(default_factory=dict)

    def words(self) -> list[tuple[int, int]]:
        """(HPA, value) of every non-zero word of the case's pages."""
        out: list[tuple[int, int]] = []
        for page in self.pages:
            data = np.frombuffer(self.memory.read(page, PAGE_SIZE), dtype="<u8")
            for i in np.flatnonzero(data):
                out.append((page + 8 * int(i), int(data[i])))
        return out

    def record(self) -> bytes:
        """The case as the harness reads it (little-endian u64 words, harness.c)."""
        words = self.words()
        header = [
            CASE_MAGIC,
            self.id,
            len(self.pages),
            len(words),
            self.vmcs.eptp.encode(),
            self.guest.cr0,
            self.guest.cr3,
            self.guest.cr4,
            self.guest.efer,
            self.guest.pkru,
            int(self.mode == Mode.USER),
            int(self.access),
            self.gva,
            int(self.vmcs.pml_enabled),
            self.vmcs.pml_index,
        ]
        assert len(header) == HEADER_WORDS
        flat = header + self.pages + [w for pair in words for w in pair]
        return struct.pack(f"<{len(flat)}Q", *flat)


class _Layout:
    """Hands out guest-physical frames in the case's 1 GiB slots and host frames for EPT."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ept_next = EPT_TABLE_HPA
        self.used_low: set[int] = set()

    def ept_frame(self) -> int:
        frame = self.ept_next
        self.ept_next += PAGE_SIZE
        return frame

    def low_offset(self, lo: int, size: int = 32 * MiB) -> int:
        while True:
            off = lo + self.rng.randrange(size // PAGE_SIZE) * PAGE_SIZE
            if off not in self.used_low:
                self.used_low.add(off)
                return off

    def slot(self, first: int = 0, count: int = 8) -> int:
        return GPA_BASE + (first + self.rng.randrange(count)) * GiB


def _hpa_of(gpa: int) -> int:
    return gpa % GiB


def build_case(case_id: int, seed: int, *, pke: bool = True) -> Case:
    """Case ``case_id`` of the random stream ``seed`` (deterministic). ``pke``: the CPU model
    supports protection keys (CR4.PKE may be set)."""
    rng = random.Random(seed * 1_000_003 + case_id)
    memory = PhysicalMemory(GiB)
    layout = _Layout(rng)
    ept_ad = rng.random() < 0.5
    ept_frames: list[int] = []

    def alloc_ept() -> int:
        frame = layout.ept_frame()
        ept_frames.append(frame)
        return frame

    ept = EptTables(
        HostStore(memory), alloc_ept, levels=4, maxphyaddr=MAXPHYADDR, ad_enabled=ept_ad
    )
    table_ept_page = rng.choice(_SIZES)
    data_ept_page = rng.choice(_SIZES)
    guest_page = rng.choices(_SIZES, weights=(5, 3, 2))[0]
    one_table_slot = rng.random() < 0.6
    table_slot = layout.slot(0, 4)
    table_gpas: list[int] = []

    def ensure_ept(gpa: int, size: PageSize) -> None:
        if ept.lookup(gpa) is None:
            base = gpa & ~(size - 1)
            ept.map(base, _hpa_of(base), size)

    def alloc_guest_table() -> int:
        slot = table_slot if one_table_slot else layout.slot(0, 4)
        gpa = slot + layout.low_offset(TABLE_LOW)
        ensure_ept(gpa, table_ept_page)
        table_gpas.append(gpa)
        return gpa

    tables = GuestPageTables(
        GuestPhysicalStore(memory, ept), alloc_guest_table, levels=4, maxphyaddr=MAXPHYADDR
    )
    # the data's slot: any when its EPT pages have the tables' size, else one of slots 4..7
    # (a 1 GiB EPT page cannot share its slot with pages of another size)
    data_slot = layout.slot() if data_ept_page == table_ept_page else layout.slot(4, 4)
    access = rng.choice(list(Access))
    mode = Mode.USER if rng.random() < 0.3 else Mode.SUPERVISOR
    offset = layout.low_offset(DATA_LOW) + rng.randrange(0, PAGE_SIZE - 16, 16)
    data_gpa = data_slot + offset
    pml4 = rng.randrange(1, 512)
    gva = canonical(
        (pml4 << 39) | (rng.randrange(1 << 39) & ~(guest_page - 1)) | (data_gpa & (guest_page - 1)),
        48,
    )
    user_page = rng.random() < (0.8 if mode == Mode.USER else 0.3)
    tables.map(
        gva & ~(guest_page - 1),
        data_gpa & ~(guest_page - 1),
        guest_page,
        writable=rng.random() < 0.8,
        user=user_page,
        xd=rng.random() < 0.2,
        pkey=rng.randrange(16) if rng.random() < 0.5 else 0,
    )
    ensure_ept(data_gpa, data_ept_page)
    if access == Access.FETCH:
        # VMCALL; HLT at the target: a successful fetch ends the case with a VMCALL exit
        memory.write_u64(_hpa_of(data_gpa), 0xF4C1010F)

    # -- mutate the guest entries on the path (SDM Vol. 3A §4.5 formats) -------------------
    nxe = rng.random() < 0.8
    levels = range(4, guest_page.level - 1, -1)
    path = [_hpa_of(tables.entry_address(gva, level)) for level in levels]
    for level, hpa in zip(range(4, 0, -1), path, strict=False):
        value = memory.read_u64(hpa)
        leaf = is_leaf(value, level)
        if not leaf:
            if rng.random() < 0.1:
                value &= ~int(Pte.RW)
            if rng.random() < 0.1:
                value &= ~int(Pte.US)
            if rng.random() < 0.05:
                value |= int(Pte.XD)
        if rng.random() < 0.35:
            value |= int(Pte.A)
        if leaf and rng.random() < 0.35:
            value |= int(Pte.D)
        if rng.random() < 0.03:
            value &= ~int(Pte.P)
        if rng.random() < 0.03:
            value |= _guest_reserved_bit(rng, value, level)
        memory.write_u64(hpa, value)

    # -- mutate the EPT entries on every path (SDM Vol. 3C §29.3.2, §29.3.3.1) ----------------
    seen: set[int] = set()
    gpas = [*table_gpas, data_gpa]
    for gpa in gpas:
        table = ept.root
        for level in range(4, 0, -1):
            slot_addr = table + ((gpa >> (12 + 9 * (level - 1))) & 0x1FF) * 8
            value = memory.read_u64(slot_addr)
            if not ept_is_present(value):
                break
            if slot_addr not in seen:
                seen.add(slot_addr)
                memory.write_u64(slot_addr, _mutate_ept(rng, value, level, gpa == data_gpa))
            if ept_is_leaf(value, level):
                break
            table = value & bits(MAXPHYADDR - 1, 12)

    cr4 = int(Cr4.PAE)
    for flag, p in ((Cr4.SMEP, 0.4), (Cr4.SMAP, 0.4), (Cr4.PKE, 0.4 if pke else 0.0)):
        if rng.random() < p:
            cr4 |= int(flag)
    guest = GuestState(
        cr3=tables.root,
        cr0=CR0_BASE | (int(Cr0.WP) if rng.random() < 0.7 else 0),
        cr4=cr4,
        efer=int(Efer.LME | Efer.LMA) | (int(Efer.NXE) if nxe else 0),
        pkru=_pkru(rng) if rng.random() < 0.6 else 0,
    )
    pml = ept_ad and rng.random() < 0.6
    pml_index = rng.choice((0, 1, 2, 3, 511, 512, 0xFFFF, rng.randrange(512)))
    vmcs = Vmcs(
        eptp=ept.eptp,
        pml_enabled=pml,
        pml_address=PML_PAGE,
        pml_index=pml_index if pml else 511,
    )
    guest_pages = sorted({_hpa_of(g) & ~(PAGE_SIZE - 1) for g in table_gpas})
    pages = sorted({*ept_frames, *guest_pages, _hpa_of(data_gpa) & ~(PAGE_SIZE - 1)})
    notes = {
        "guest_page": guest_page.label,
        "table_ept_page": table_ept_page.label,
        "data_ept_page": data_ept_page.label,
        "ept_ad": ept_ad,
        "pml": pml,
    }
    return Case(case_id, memory, guest, vmcs, gva, access, mode, pages, notes)


def _pkru(rng: random.Random) -> int:
    """A random PKRU that leaves at least one key open (AD = WD = 0): the harness gives that key
    to its own pages, which #PF delivery writes (Bochs applies PKRU to supervisor pages too)."""
    pkru = rng.getrandbits(32)
    if all((pkru >> (2 * k)) & 3 for k in range(16)):
        pkru &= ~(3 << (2 * rng.randrange(16)))
    return pkru


def _guest_reserved_bit(rng: random.Random, value: int, level: int) -> int:
    """A bit that is reserved in this guest entry (SDM Vol. 3A Tables 4-14..4-20)."""
    choices = [bit(rng.randrange(MAXPHYADDR, 52))]
    if level == 4:
        choices.append(int(Pte.PS))
    if level == 2 and value & Pte.PS:
        choices.append(bit(rng.randrange(13, 21)))
    if level == 3 and value & Pte.PS:
        choices.append(bit(rng.randrange(13, 30)))
    return rng.choice(choices)


def _mutate_ept(rng: random.Random, value: int, level: int, data: bool) -> int:
    """Random permissions, reserved bits, memory types and preset A/D flags for one entry."""
    leaf = ept_is_leaf(value, level)
    if rng.random() < (0.15 if data and leaf else 0.04):
        value = (value & ~7) | rng.randrange(8)
    if rng.random() < 0.03:
        choices = [bit(rng.randrange(MAXPHYADDR, 52))]
        if level == 4:
            choices.append(bit(rng.randrange(3, 8)))
        elif not leaf:
            choices.append(bit(rng.randrange(3, 7)))
        elif level == 2:
            choices.append(bit(rng.randrange(12, 21)))
        elif level == 3:
            choices.append(bit(rng.randrange(12, 30)))
        value |= rng.choice(choices)
    if leaf and rng.random() < 0.04:
        value = (value & ~(7 << 3)) | rng.randrange(8) << 3
    if rng.random() < 0.3:
        value |= int(Ept.A)
    if leaf and rng.random() < 0.3:
        value |= int(Ept.D)
    if rng.random() < 0.1:
        value |= int(Ept.XU)  # bit 10: ignored without mode-based execute control
    if leaf and rng.random() < 0.1:
        value |= int(Ept.IGNORE_PAT)
    return value
