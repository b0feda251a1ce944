"""EPT formats: EPT paging-structure entries, the EPT pointer (EPTP), memory types.

Source: Intel SDM Vol. 3C, chapter "VMX Support for Address Translation": "EPT Translation
Mechanism" (§29.3.2 in the 2023+ editions, §28.2.2 before; Figure 29-1 and Tables 29-1 to 29-7),
"EPT Misconfigurations" (§29.3.3.1) and "Accessed and Dirty Flags for EPT" (§29.3.5); the EPTP
is the VM-execution control field of §25.6.11 (Table 25-9). Bit formats only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

from ..errors import EncodingError, MisconfiguredEptEntry
from .bits import PAGE_SHIFT, PageSize, bit, bits, level_shift


class MemoryType(IntEnum):
    """EPT/EPTP memory types (SDM Vol. 3A §12.3 "Methods of Caching Available"); 2, 3, 7 are
    reserved in an EPT leaf (an EPT misconfiguration)."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6




class Ept(IntFlag):
    """Bits of an EPT paging-structure entry (SDM Vol. 3C Tables 29-1..29-7)."""

    R = bit(0)
    W = bit(1)
    X = bit(2)  # execute; supervisor-mode execute when mode-based execute control is 1
    IGNORE_PAT = bit(6)  # leaf only
    PS = bit(7)  # maps a 1 GiB page (PDPTE) / 2 MiB page (PDE); reserved at levels 4 and 5
    A = bit(8)  # accessed (EPTP bit 6 = 1)
    D = bit(9)  # dirty, leaf only (EPTP bit 6 = 1)
    XU = bit(10)  # user-mode execute (mode-based execute control)
    # VT-rp (SDM Vol. 3C §29.3.3.2, Figure 29-1): leaf bits, ignored unless the tertiary
    # VM-execution control that governs them is 1
    VGP = bit(57)  # verify guest paging ("verify paging-write"): guest-paging verification
    PWA = bit(58)  # paging-write access: guest paging may update the page (EPT paging-write)
    SUPPRESS_VE = bit(63)  # leaf: suppress #VE


MEMTYPE_SHIFT = 3
MEMTYPE_MASK = bits(5, 3)
PERMISSION_MASK = bits(2, 0)


def ept_is_present(value: int, mbec: bool = False) -> bool:
    """An EPT entry is not present when bits 2:0 are 0 (and, with MBEC, bit 10 too)."""
    return bool(value & PERMISSION_MASK) or (mbec and bool(value & Ept.XU))


def ept_is_leaf(value: int, level: int) -> bool:
    """A present EPT entry maps a page at level 1, or at level 2/3 when bit 7 is 1."""
    return level == 1 or (level in (2, 3) and bool(value & Ept.PS))


# Plain-int copies of the bits above, for code that cannot use IntFlag (the numba kernels read
# them as compile-time constants; :func:`ept_misconfig_code` is compiled into the kernels).
EPT_R, EPT_W, EPT_X = int(Ept.R), int(Ept.W), int(Ept.X)
EPT_PS, EPT_A, EPT_D, EPT_XU = int(Ept.PS), int(Ept.A), int(Ept.D), int(Ept.XU)

MISCONFIG_REASONS = (
    "",
    "write-without-read",
    "execute-only-unsupported",
    "reserved-bit",
    "reserved-memory-type",
)
"""Names of the :func:`ept_misconfig_code` codes (index = code; 0: not misconfigured)."""
MISCONFIG_WRITE_WITHOUT_READ = 1
MISCONFIG_EXECUTE_ONLY = 2
MISCONFIG_RESERVED_BIT = 3
MISCONFIG_MEMORY_TYPE = 4


def ept_misconfig_code(
    value: int, level: int, maxphyaddr: int, execute_only: bool, mbec: bool
) -> int:
    """The EPT-misconfiguration rule, as a code (0: none; else an index of
    :data:`MISCONFIG_REASONS`). The one copy of the rule: :func:`ept_misconfiguration` names the
    code, and the numba kernels compile this very function (so it uses plain ints and
    arithmetic only: no IntFlag, no calls).

    SDM Vol. 3C §29.3.3.1 "EPT Misconfigurations": bit 0 clear and bit 1 set (write without
    read); bit 0 clear and, without execute-only support, bit 2 set or (with mode-based execute
    control) bit 10 set; a reserved bit set (including address bits at or above MAXPHYADDR,
    Tables 29-1..29-7); a leaf whose memory type (bits 5:3) is 2, 3 or 7.
    """
    if (value & EPT_W) and not (value & EPT_R):
        return MISCONFIG_WRITE_WITHOUT_READ
    if (
        not execute_only
        and not (value & EPT_R)
        and ((value & EPT_X) or (mbec and (value & EPT_XU)))
    ):
        return MISCONFIG_EXECUTE_ONLY
    leaf = level == 1 or ((level == 2 or level == 3) and (value & EPT_PS) != 0)
    reserved = ((1 << (52 - maxphyaddr)) - 1) << maxphyaddr  # bits 51:MAXPHYADDR
    if level >= 4:
        reserved |= 0xF8  # EPT PML5E / PML4E: bits 7:3
    elif not leaf:
        reserved |= 0x78  # entry referencing a table: bits 6:3
    elif level == 3:
        reserved |= 0x3FFFF000  # 1 GiB page: bits 29:12
    elif level == 2:
        reserved |= 0x1FF000  # 2 MiB page: bits 20:12
    if value & reserved:
        return MISCONFIG_RESERVED_BIT
    if leaf:
        memtype = (value >> MEMTYPE_SHIFT) & 7
        if memtype == 2 or memtype == 3 or memtype == 7:
            return MISCONFIG_MEMORY_TYPE
    return 0


def ept_misconfiguration(
    value: int, level: int, maxphyaddr: int, execute_only: bool = True, mbec: bool = False
) -> str | None:
    """Why a present EPT entry is an EPT misconfiguration (a :data:`MISCONFIG_REASONS` name), or
    None if it is not (SDM Vol. 3C §29.3.3.1; the rule is :func:`ept_misconfig_code`)."""
    code = ept_misconfig_code(value, level, maxphyaddr, execute_only, mbec)
    return MISCONFIG_REASONS[code] if code else None


def ept_address(value: int, level: int, maxphyaddr: int) -> int:
    """Address held by a present EPT entry: the next table, or the frame a leaf maps."""
    lo = level_shift(level) if ept_is_leaf(value, level) else PAGE_SHIFT
    return value & bits(maxphyaddr - 1, lo)


@dataclass(frozen=True, slots=True)
class EptEntry:
    """One EPT paging-structure entry, decoded.

    Leaf-only fields (``memory_type``, ``ignore_pat``, ``dirty``, ``suppress_ve``) must keep
    their defaults in an entry that references a table. Construction refuses any value the
    processor would answer with an EPT misconfiguration; to *build* such an entry on purpose,
    write the raw value into memory.
    """

    level: int
    address: int
    read: bool = True
    write: bool = True
    execute: bool = True
    user_execute: bool = False
    memory_type: MemoryType = MemoryType.WB
    ignore_pat: bool = False
    page_size: bool = False
    accessed: bool = False
    dirty: bool = False
    suppress_ve: bool = False

    def __post_init__(self) -> None:
        name = "EptEntry"
        if self.level not in (1, 2, 3, 4, 5):
            raise EncodingError(name, "level", f"{self.level} is not 1..5")
        if self.page_size and self.level not in (2, 3):
            raise EncodingError(name, "page_size", "bit 7 maps a page only at levels 2 and 3")
        leaf = self.leaf
        if not leaf and (
            self.memory_type != MemoryType.WB or self.ignore_pat or self.dirty or self.suppress_ve
        ):
            raise EncodingError(
                name, "memory_type/ignore_pat/dirty/suppress_ve", "only a leaf entry has them"
            )
        if self.memory_type not in tuple(MemoryType):
            raise MisconfiguredEptEntry(name, "memory_type", f"{self.memory_type} is reserved")
        if self.write and not self.read:
            raise MisconfiguredEptEntry(
                name, "write", "write without read is an EPT misconfiguration"
            )
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
        """The 64-bit entry value; raises EncodingError if the address does not fit in MAXPHYADDR
        bits."""
        if self.address >> maxphyaddr:
            raise EncodingError(
                "EptEntry", "address", f"{self.address:#x} exceeds MAXPHYADDR={maxphyaddr}"
            )
        value = self.address
        for flag, on in (
            (Ept.R, self.read),
            (Ept.W, self.write),
            (Ept.X, self.execute),
            (Ept.XU, self.user_execute),
            (Ept.IGNORE_PAT, self.ignore_pat),
            (Ept.PS, self.page_size),
            (Ept.A, self.accessed),
            (Ept.D, self.dirty),
            (Ept.SUPPRESS_VE, self.suppress_ve),
        ):
            if on:
                value |= int(flag)  # plain ints: IntFlag arithmetic is slow on hot paths
        if self.leaf:
            value |= int(self.memory_type) << MEMTYPE_SHIFT
        return value

    @classmethod
    def decode(cls, value: int, level: int, maxphyaddr: int = 52, mbec: bool = False) -> EptEntry:
        """Decode a present, well-formed entry; a misconfigured value raises
        :class:`MisconfiguredEptEntry` naming the rule it breaks."""
        if not ept_is_present(value, mbec):
            raise EncodingError("EptEntry", "present", f"{value:#018x} is not present")
        reason = ept_misconfiguration(value, level, maxphyaddr, mbec=mbec)
        if reason is not None:
            raise MisconfiguredEptEntry(
                f"EptEntry(level={level})", "value", f"{value:#018x}: {reason}"
            )
        leaf = ept_is_leaf(value, level)
        return cls(
            level=level,
            address=ept_address(value, level, maxphyaddr),
            read=bool(value & Ept.R),
            write=bool(value & Ept.W),
            execute=bool(value & Ept.X),
            user_execute=bool(value & Ept.XU),
            memory_type=MemoryType((value & MEMTYPE_MASK) >> MEMTYPE_SHIFT)
            if leaf
            else MemoryType.WB,
            ignore_pat=leaf and bool(value & Ept.IGNORE_PAT),
            page_size=level in (2, 3) and bool(value & Ept.PS),
            accessed=bool(value & Ept.A),
            dirty=leaf and bool(value & Ept.D),
            suppress_ve=leaf and bool(value & Ept.SUPPRESS_VE),
        )


EPTP_WALK_LENGTH_SHIFT = 3
EPTP_AD_ENABLE = bit(6)
EPTP_SSS_ENABLE = bit(7)  # supervisor shadow-stack enforcement (not modelled beyond the bit)


@dataclass(frozen=True, slots=True)
class Eptp:
    """The extended-page-table pointer (SDM Vol. 3C §25.6.11, Table 25-9).

    Bits 2:0 memory type for accessing the EPT structures (UC or WB), 5:3 page-walk length
    minus 1 (3 = 4 levels, 4 = 5 levels), 6 enable accessed/dirty flags, N-1:12 address of the
    top EPT table. Other values make VM entry fail, so construction refuses them.
    """

    root: int
    levels: int = 4
    memory_type: MemoryType = MemoryType.WB
    ad_enabled: bool = False

    def __post_init__(self) -> None:
        if self.memory_type not in (MemoryType.UC, MemoryType.WB):
            raise EncodingError("Eptp", "memory_type", "must be UC (0) or WB (6)")
        if self.levels not in (4, 5):
            raise EncodingError("Eptp", "levels", f"page-walk length {self.levels} is not 4 or 5")
        if self.root % (1 << PAGE_SHIFT) or not 0 <= self.root < 1 << 52:
            raise EncodingError("Eptp", "root", f"{self.root:#x} is not a 4 KiB-aligned address")

    def encode(self) -> int:
        """The 64-bit EPTP value (SDM Vol. 3C §25.6.11: memory type, walk length - 1, A/D enable,
        root)."""
        value = self.root | int(self.memory_type) | (self.levels - 1) << EPTP_WALK_LENGTH_SHIFT
        return value | (EPTP_AD_ENABLE if self.ad_enabled else 0)

    @classmethod
    def decode(cls, value: int, maxphyaddr: int = 52) -> Eptp:
        """Parse an EPTP value; reserved bits or an unsupported memory type or walk length raise
        EncodingError."""
        reserved = bits(11, 8) | bits(63, maxphyaddr)
        if value & reserved:
            raise EncodingError("Eptp", "reserved", f"reserved bits set in {value:#x}")
        mt = value & 7
        if mt not in (MemoryType.UC, MemoryType.WB):
            raise EncodingError("Eptp", "memory_type", f"{mt} is not UC (0) or WB (6)")
        return cls(
            root=value & bits(maxphyaddr - 1, PAGE_SHIFT),
            levels=((value >> EPTP_WALK_LENGTH_SHIFT) & 7) + 1,
            memory_type=MemoryType(mt),
            ad_enabled=bool(value & EPTP_AD_ENABLE),
        )


def parse_permissions(text: str) -> int:
    """``"rwx"``, ``"r-x"``, ``"---"``, ... -> EPT bits 2:0. Any combination is accepted,
    including ``-w-`` (which the processor answers with an EPT misconfiguration)."""
    if len(text) != 3 or any(c not in (f, "-") for c, f in zip(text, "rwx", strict=True)):
        raise ValueError(f"permissions {text!r} must look like 'rwx', 'r-x' or '---'")
    return sum(1 << i for i, c in enumerate(text) if c != "-")
