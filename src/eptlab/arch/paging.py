"""Guest (ordinary) x86-64 paging formats: 4-level and 5-level paging, control-register bits,
page-fault error codes.

Source: Intel SDM Vol. 3A, chapter 4 "Paging": §4.1.1 (paging modes and control bits),
§4.5 "4-Level Paging and 5-Level Paging" (Tables 4-14 to 4-20, entry formats), §4.6 "Access
Rights", §4.7 "Page-Fault Exceptions" (Figure 4-12, error code), §4.8 "Accessed and Dirty Flags".
Bit formats only; the rules that use them live in :mod:`eptlab.mmu`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from ..errors import EncodingError, ReservedBitsError
from .bits import PAGE_SHIFT, PageSize, bit, bits, level_shift


class Cr0(IntFlag):
    """CR0 bits that matter to paging (SDM Vol. 3A §2.5)."""

    PE = bit(0)
    WP = bit(16)  # write protect: supervisor writes honour R/W (SDM §4.6)
    PG = bit(31)


class Cr4(IntFlag):
    """CR4 bits that matter to paging (SDM Vol. 3A §2.5, §4.1.3)."""

    PAE = bit(5)
    PGE = bit(7)
    LA57 = bit(12)  # 5-level paging
    SMEP = bit(20)  # supervisor-mode execution prevention
    SMAP = bit(21)  # supervisor-mode access prevention
    PKE = bit(22)  # protection keys for user-mode pages


class Efer(IntFlag):
    """IA32_EFER bits that matter to paging (SDM Vol. 3A §2.2.1)."""

    LME = bit(8)
    LMA = bit(10)
    NXE = bit(11)  # execute-disable bit (XD, bit 63 of entries) enabled


RFLAGS_AC = bit(18)
"""EFLAGS.AC: with CR4.SMAP, explicit supervisor data accesses to user pages need AC=1."""

CR3_ADDRESS_MASK = bits(51, 12)
"""CR3 bits M-1:12 hold the physical address of the top paging structure (SDM Table 4-12)."""


class Pte(IntFlag):
    """Bits of a guest paging-structure entry (SDM Vol. 3A Tables 4-15 to 4-20).

    ``PS`` is bit 7 in a PDPTE or PDE (it maps a 1 GiB / 2 MiB page when set); in a PTE bit 7
    is ``PAT`` instead, and in a PML5E/PML4E it is reserved. ``PAT`` of a 2 MiB/1 GiB page is
    bit 12 (``LARGE_PAT``).
    """

    P = bit(0)
    RW = bit(1)
    US = bit(2)
    PWT = bit(3)
    PCD = bit(4)
    A = bit(5)
    D = bit(6)
    PS = bit(7)
    G = bit(8)
    RESTART = bit(11)  # ignored by ordinary paging; HLAT paging restarts (SDM Vol. 3A §4.5.5)
    LARGE_PAT = bit(12)
    XD = bit(63)


PTE_PAT = bit(7)  # PAT bit of a PTE (level 1)
PKEY_SHIFT = 59
PKEY_MASK = bits(62, 59)  # protection key of a leaf (used when CR4.PKE=1)


class PageFaultError(IntFlag):
    """The page-fault (#PF) error code (SDM Vol. 3A §4.7, Figure 4-12); each bit's meaning is
    in :data:`PAGE_FAULT_MEANING`."""

    P = bit(0)
    WR = bit(1)
    US = bit(2)
    RSVD = bit(3)
    ID = bit(4)
    PK = bit(5)
    SS = bit(6)
    HLAT = bit(7)
    SGX = bit(15)


PAGE_FAULT_MEANING: dict[PageFaultError, str] = {
    PageFaultError.P: "0: non-present page; 1: protection violation (or reserved bit)",
    PageFaultError.WR: "the access was a write",
    PageFaultError.US: "the access was a user-mode access",
    PageFaultError.RSVD: "a reserved bit was set in some paging-structure entry",
    PageFaultError.ID: "instruction fetch (only reported if NXE=1 or SMEP=1, SDM §4.7)",
    PageFaultError.PK: "protection-key violation",
    PageFaultError.SS: "shadow-stack access",
    PageFaultError.HLAT: "the fault occurred during HLAT paging",
    PageFaultError.SGX: "violation of SGX-specific access-control requirements",
}
"""What each #PF error-code bit says (SDM Vol. 3A §4.7)."""


def linear_address_width(cr4: int) -> int:
    """48 for 4-level paging, 57 for 5-level paging (CR4.LA57)."""
    return 57 if cr4 & Cr4.LA57 else 48


def paging_levels(cr4: int) -> int:
    """4 or 5 (SDM §4.5: 5-level paging when CR4.LA57 = 1)."""
    return 5 if cr4 & Cr4.LA57 else 4


def is_canonical(address: int, width: int) -> bool:
    """Bits 63:width-1 of a canonical address are all equal (SDM Vol. 1 §3.3.7.1)."""
    top = address >> (width - 1)
    return top in (0, (1 << (65 - width)) - 1)


def canonical(address: int, width: int) -> int:
    """Sign-extend bit ``width-1`` of ``address`` into bits 63:width (a 64-bit value)."""
    address &= (1 << width) - 1
    if address >> (width - 1):
        address |= ((1 << 64) - 1) ^ ((1 << width) - 1)
    return address


def is_leaf(value: int, level: int) -> bool:
    """A present entry is a leaf at level 1, or at level 2/3 with PS=1."""
    return level == 1 or (level in (2, 3) and bool(value & Pte.PS))


def frame_mask(level: int, maxphyaddr: int) -> int:
    """Mask of the physical-address bits held by a *leaf* at ``level`` (4 KiB/2 MiB/1 GiB frame)."""
    return bits(maxphyaddr - 1, level_shift(level))


def reserved_mask(value: int, level: int, maxphyaddr: int, nxe: bool) -> int:
    """Bits that are reserved in this present entry (SDM Vol. 3A §4.5, Tables 4-15..4-20).

    Setting any of them makes the walk stop with a #PF whose RSVD flag is set.
    """
    mask = bits(51, maxphyaddr)  # address bits beyond MAXPHYADDR
    if not nxe:
        mask |= Pte.XD  # bit 63 is reserved unless IA32_EFER.NXE = 1
    if level >= 4:
        mask |= Pte.PS  # PML5E / PML4E: bit 7 reserved
    elif level == 3 and value & Pte.PS:
        mask |= bits(29, 13)  # 1 GiB page: bits 29:13 reserved
    elif level == 2 and value & Pte.PS:
        mask |= bits(20, 13)  # 2 MiB page: bits 20:13 reserved
    return mask


def next_table(value: int, maxphyaddr: int) -> int:
    """Physical address of the table a non-leaf entry references (bits M-1:12)."""
    return value & bits(maxphyaddr - 1, PAGE_SHIFT)


@dataclass(frozen=True, slots=True)
class GuestEntry:
    """One guest paging-structure entry, decoded.

    ``address`` is the physical address of the next table (non-leaf) or of the page frame
    (leaf; aligned to the page size). Fields that exist only in leaves (``dirty``, ``global_``,
    ``pat``, ``pkey``) must be left at their defaults in non-leaf entries.
    """

    level: int
    address: int
    present: bool = True
    writable: bool = True
    user: bool = False
    pwt: bool = False
    pcd: bool = False
    accessed: bool = False
    dirty: bool = False
    page_size: bool = False
    global_: bool = False
    pat: bool = False
    xd: bool = False
    pkey: int = 0

    def __post_init__(self) -> None:
        name = "GuestEntry"
        if self.level not in (1, 2, 3, 4, 5):
            raise EncodingError(name, "level", f"{self.level} is not 1..5")
        if self.page_size and self.level not in (2, 3):
            raise EncodingError(
                name, "page_size", f"PS is only defined at levels 2 and 3, not {self.level}"
            )
        leaf = self.level == 1 or self.page_size
        if not leaf and (self.dirty or self.global_ or self.pat or self.pkey):
            raise EncodingError(name, "dirty/global/pat/pkey", "only a leaf entry has them")
        if not 0 <= self.pkey <= 15:
            raise EncodingError(name, "pkey", f"{self.pkey} is not 0..15")
        align = PageSize.at_level(self.level).value if leaf else 1 << PAGE_SHIFT
        if self.address % align or not 0 <= self.address < 1 << 52:
            raise EncodingError(
                name, "address", f"{self.address:#x} is not a {align:#x}-aligned 52-bit address"
            )

    @property
    def leaf(self) -> bool:
        """Whether the entry maps a page (level 1, or PS set at level 2 or 3)."""
        return self.level == 1 or self.page_size

    def encode(self, maxphyaddr: int = 52) -> int:
        """The 64-bit entry value. Raises if the address does not fit in MAXPHYADDR bits."""
        if self.address >> maxphyaddr:
            raise EncodingError(
                "GuestEntry", "address", f"{self.address:#x} exceeds MAXPHYADDR={maxphyaddr}"
            )
        value = self.address
        for flag, on in (
            (Pte.P, self.present),
            (Pte.RW, self.writable),
            (Pte.US, self.user),
            (Pte.PWT, self.pwt),
            (Pte.PCD, self.pcd),
            (Pte.A, self.accessed),
            (Pte.D, self.dirty),
            (Pte.PS, self.page_size),
            (Pte.G, self.global_),
            (Pte.XD, self.xd),
        ):
            if on:
                value |= flag
        if self.pat:
            value |= PTE_PAT if self.level == 1 else Pte.LARGE_PAT
        return value | (self.pkey << PKEY_SHIFT)

    @classmethod
    def decode(cls, value: int, level: int, maxphyaddr: int = 52, nxe: bool = True) -> GuestEntry:
        """Decode a present entry; raises :class:`ReservedBitsError` if reserved bits are set."""
        if not value & Pte.P:
            raise EncodingError("GuestEntry", "present", f"{value:#018x} is not present")
        reserved = reserved_mask(value, level, maxphyaddr, nxe)
        if value & reserved:
            raise ReservedBitsError(f"GuestEntry(level={level})", value, reserved)
        leaf = is_leaf(value, level)
        addr_mask = frame_mask(level, maxphyaddr) if leaf else next_table(-1, maxphyaddr)
        pat_bit = PTE_PAT if level == 1 else Pte.LARGE_PAT
        return cls(
            level=level,
            address=value & addr_mask,
            present=True,
            writable=bool(value & Pte.RW),
            user=bool(value & Pte.US),
            pwt=bool(value & Pte.PWT),
            pcd=bool(value & Pte.PCD),
            accessed=bool(value & Pte.A),
            dirty=leaf and bool(value & Pte.D),
            page_size=level in (2, 3) and bool(value & Pte.PS),
            global_=leaf and bool(value & Pte.G),
            pat=leaf and bool(value & pat_bit),
            xd=bool(value & Pte.XD),
            pkey=(value & PKEY_MASK) >> PKEY_SHIFT if leaf else 0,
        )
