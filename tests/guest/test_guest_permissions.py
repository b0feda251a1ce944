"""Guest paging rules, one test per rule, against the Intel SDM Vol. 3A.

§4.5 (entry formats and reserved bits), §4.6 (access rights, SMEP, SMAP, protection keys), §4.7
(page-fault error code: P bit 0, W/R bit 1, U/S bit 2, RSVD bit 3, I/D bit 4, PK bit 5; CR2 gets
the faulting linear address) and Vol. 1 §3.3.7.1 (a non-canonical address is a #GP, no walk).

Every expectation below is written from those sections, not read back from the walker: the
error-code bits are spelled out here as numbers, and ``access_bits`` restates §4.7's rules for
W/R, U/S and I/D. The guest runs under EPT that allows everything, so only guest rules decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from eptlab.arch import Access, Mode, PageSize
from eptlab.arch.exits import GuestFault
from eptlab.mmu import CpuFeatures, Dim, Translation
from eptlab.mmu.scenario import NestedSpace

# -- SDM constants, restated here on purpose -------------------------------------------------

PF_VECTOR = 14
GP_VECTOR = 13

# page-fault error code, SDM Vol. 3A §4.7 Figure 4-12
P, WR, US, RSVD, ID, PK = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5

# entry bits, SDM Vol. 3A Tables 4-15..4-20
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
PTE_XD = 1 << 63

# control bits
CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 20, 1 << 21, 1 << 22
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
RFLAGS_AC = 1 << 18

R, W, X = Access.READ, Access.WRITE, Access.FETCH
SUP, USR = Mode.SUPERVISOR, Mode.USER

GVA = 0x0000_7F12_3456_7ABC
"""A canonical lower-half address with a non-zero page offset (CR2 must keep every bit)."""

EPT_LEVELS = 4


def make_space(
    levels: int = 4,
    *,
    wp: bool = True,
    nxe: bool = True,
    smep: bool = False,
    smap: bool = False,
    pke: bool = False,
    features: CpuFeatures | None = None,
) -> NestedSpace:
    cr0 = CR0_PE | CR0_PG | (CR0_WP if wp else 0)
    cr4 = (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0) | (CR4_PKE if pke else 0)
    efer = EFER_LME | EFER_LMA | (EFER_NXE if nxe else 0)
    return NestedSpace.create(
        guest_levels=levels,
        ept_levels=EPT_LEVELS,
        cr0=cr0,
        cr4_extra=cr4,
        efer=efer,
        features=features,
    )


def access_bits(access: Access, mode: Mode, *, nxe: bool = True, smep: bool = False) -> int:
    """The error-code bits that describe the access itself (SDM §4.7): W/R for a write, U/S for
    a user-mode access, I/D for a fetch only when IA32_EFER.NXE = 1 or CR4.SMEP = 1."""
    bits = 0
    if access == W:
        bits |= WR
    if mode == USR:
        bits |= US
    if access == X and (nxe or smep):
        bits |= ID
    return bits


def entry_gpa(space: NestedSpace, gva: int, level: int) -> int:
    return space.tables.entry_address(gva, level)


def read_entry(space: NestedSpace, gva: int, level: int) -> int:
    return space.tables.store.read_u64(entry_gpa(space, gva, level))


def write_entry(space: NestedSpace, gva: int, level: int, value: int) -> None:
    space.tables.store.write_u64(entry_gpa(space, gva, level), value)


def or_entry(space: NestedSpace, gva: int, level: int, set_: int = 0, clear: int = 0) -> None:
    write_entry(space, gva, level, (read_entry(space, gva, level) & ~clear) | set_)


def translate(space: NestedSpace, gva: int, access: Access, mode: Mode) -> Translation:
    return space.walker().translate(gva, access, mode)


def assert_page_fault(t: Translation, error: int, address: int = GVA) -> None:
    assert t.exit is None and t.hpa is None
    assert t.fault is not None, "expected a #PF, the walk succeeded"
    assert t.fault.vector == PF_VECTOR
    assert t.fault.error_code == error, f"{t.fault.error_code:#x} != {error:#x}"
    assert t.fault.address == address
    assert t.fault == GuestFault(PF_VECTOR, error, address)


def assert_ok(
    space: NestedSpace, t: Translation, gpa: int, page: PageSize = PageSize.SIZE_4K
) -> None:
    assert t.fault is None and t.exit is None, (t.fault, t.exit)
    offset = GVA & (page - 1)
    assert t.gpa == gpa + offset
    assert space.ept is not None
    assert t.hpa == space.ept.host_address(gpa + offset)  # the builder's software lookup


# -- not-present entries ---------------------------------------------------------------------

ACCESSES = [(R, SUP), (W, SUP), (X, SUP), (R, USR), (W, USR), (X, USR)]


@pytest.mark.parametrize(
    ("levels", "missing"), [(n, lvl) for n in (4, 5) for lvl in range(n, 0, -1)]
)
@pytest.mark.parametrize(("access", "mode"), ACCESSES)
def test_not_present_entry_at_each_level(
    levels: int, missing: int, access: Access, mode: Mode
) -> None:
    """P = 0 at any level: #PF with P = 0 and only the bits that describe the access; the walk
    ends at that entry (each guest entry read costs its EPT walk plus itself)."""
    space = make_space(levels)
    space.map(GVA, user=True)
    or_entry(space, GVA, missing, clear=PTE_P)
    t = translate(space, GVA, access, mode)
    assert_page_fault(t, access_bits(access, mode))
    last = t.references[-1]
    assert (last.dim, last.level) == (Dim.GUEST, missing)
    assert t.count == (levels - missing + 1) * (EPT_LEVELS + 1)


@pytest.mark.parametrize("levels", [4, 5])
def test_unmapped_address_faults_at_the_top_level(levels: int) -> None:
    space = make_space(levels)
    t = translate(space, GVA, R, SUP)
    assert_page_fault(t, 0)
    assert [r.level for r in t.references if r.dim == Dim.GUEST] == [levels]


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_not_present_entry_ignores_its_reserved_bits(level: int) -> None:
    """SDM §4.5: with P = 0 every other bit is ignored, so reserved bits do not make it RSVD."""
    space = make_space()
    space.map(GVA)
    or_entry(space, GVA, level, set_=(1 << 51) | PTE_PS | PTE_XD, clear=PTE_P)
    assert_page_fault(translate(space, GVA, W, SUP), WR)


@pytest.mark.parametrize(
    ("nxe", "smep"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_not_present_fetch_reports_id_only_with_nxe_or_smep(nxe: bool, smep: bool) -> None:
    space = make_space(nxe=nxe, smep=smep)
    expected = ID if (nxe or smep) else 0
    assert_page_fault(translate(space, GVA, X, SUP), expected)
    assert_page_fault(translate(space, GVA, X, USR), expected | US)


# -- reserved bits ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rsvd:
    levels: int
    page: PageSize
    level: int  # entry that gets the bits
    set_bits: int
    nxe: bool = True
    maxphyaddr: int = 46


RSVD_CASES = [
    # bits 51:MAXPHYADDR are reserved in every entry (Tables 4-15..4-20)
    *[
        pytest.param(Rsvd(4, PageSize.SIZE_4K, lvl, 1 << 51), id=f"bit51-L{lvl}")
        for lvl in (4, 3, 2, 1)
    ],
    *[
        pytest.param(Rsvd(5, PageSize.SIZE_4K, lvl, 1 << 46), id=f"bit46-5level-L{lvl}")
        for lvl in (5, 4, 3, 2, 1)
    ],
    pytest.param(Rsvd(4, PageSize.SIZE_4K, 2, 1 << 40, maxphyaddr=40), id="bit40-maxphy40"),
    pytest.param(Rsvd(4, PageSize.SIZE_4K, 1, 1 << 45, maxphyaddr=40), id="bit45-maxphy40"),
    # XD (bit 63) is reserved when IA32_EFER.NXE = 0, in leaves and non-leaves alike
    *[
        pytest.param(Rsvd(4, PageSize.SIZE_4K, lvl, PTE_XD, nxe=False), id=f"xd-nxe0-L{lvl}")
        for lvl in (4, 3, 2, 1)
    ],
    pytest.param(Rsvd(4, PageSize.SIZE_2M, 2, PTE_XD, nxe=False), id="xd-nxe0-2m-leaf"),
    # PS (bit 7) is reserved in a PML4E and in a PML5E
    pytest.param(Rsvd(4, PageSize.SIZE_4K, 4, PTE_PS), id="ps-in-pml4e"),
    pytest.param(Rsvd(5, PageSize.SIZE_4K, 5, PTE_PS), id="ps-in-pml5e"),
    pytest.param(Rsvd(5, PageSize.SIZE_4K, 4, PTE_PS), id="ps-in-pml4e-5level"),
    # bits 20:13 of a PDE that maps a 2 MiB page
    *[pytest.param(Rsvd(4, PageSize.SIZE_2M, 2, 1 << b), id=f"2m-bit{b}") for b in (13, 17, 20)],
    # bits 29:13 of a PDPTE that maps a 1 GiB page
    *[
        pytest.param(Rsvd(4, PageSize.SIZE_1G, 3, 1 << b), id=f"1g-bit{b}")
        for b in (13, 20, 21, 29)
    ],
    pytest.param(Rsvd(5, PageSize.SIZE_1G, 3, 1 << 29), id="1g-bit29-5level"),
]


@pytest.mark.parametrize("case", RSVD_CASES)
@pytest.mark.parametrize(("access", "mode"), [(R, SUP), (W, USR), (X, USR), (X, SUP)])
def test_reserved_bit_is_rsvd_fault(case: Rsvd, access: Access, mode: Mode) -> None:
    """A reserved bit in a present entry: #PF with P = 1 and RSVD = 1 (SDM §4.7) plus the access
    bits, and the walk stops at that entry. The page is a supervisor page, so a user access
    would also break U/S: the reserved bit is found first, during the walk."""
    space = make_space(case.levels, nxe=case.nxe, features=CpuFeatures(maxphyaddr=case.maxphyaddr))
    space.map(GVA, case.page)
    or_entry(space, GVA, case.level, set_=case.set_bits)
    t = translate(space, GVA, access, mode)
    assert_page_fault(t, P | RSVD | access_bits(access, mode, nxe=case.nxe))
    last = t.references[-1]
    assert (last.dim, last.level) == (Dim.GUEST, case.level)


@pytest.mark.parametrize(
    ("page", "bit"),
    [
        (PageSize.SIZE_2M, 12),
        (PageSize.SIZE_1G, 12),
        (PageSize.SIZE_4K, 7),
        (PageSize.SIZE_4K, 52),
        (PageSize.SIZE_4K, 58),
    ],
    ids=["2m-pat", "1g-pat", "4k-pat", "4k-bit52-ignored", "4k-bit58-ignored"],
)
def test_not_reserved_bits_do_not_fault(page: PageSize, bit: int) -> None:
    """Controls for the reserved-bit rules: bit 12 of a large page and bit 7 of a PTE are PAT,
    bits 58:52 are ignored; none of them is reserved."""
    space = make_space()
    gpa = space.map(GVA, page)
    or_entry(space, GVA, page.level, set_=1 << bit)
    assert_ok(space, translate(space, GVA, R, SUP), gpa, page)


def test_xd_is_not_reserved_with_nxe() -> None:
    space = make_space(nxe=True)
    gpa = space.map(GVA, xd=True)
    assert_ok(space, translate(space, GVA, R, SUP), gpa)


# -- access rights (SDM §4.6) ----------------------------------------------------------------


@dataclass(frozen=True)
class Perm:
    access: Access
    mode: Mode
    expect: int | None  # the error code, or None when the access is allowed
    user: bool = False
    writable: bool = True
    xd: bool = False
    wp: bool = True
    nxe: bool = True
    smep: bool = False
    smap: bool = False
    ac: bool = False
    pke: bool = False
    pkey: int = 0
    pkru: int = 0


def ad(key: int) -> int:
    """PKRU with the access-disable bit of ``key`` set (bit 2i, SDM §4.6.2)."""
    return 1 << (2 * key)


def wd(key: int) -> int:
    """PKRU with the write-disable bit of ``key`` set (bit 2i+1)."""
    return 1 << (2 * key + 1)


PERM_CASES = {
    # U/S: user-mode accesses need U/S = 1
    "user-read-supervisor-page": Perm(R, USR, P | US),
    "user-write-supervisor-page": Perm(W, USR, P | WR | US),
    "user-fetch-supervisor-page": Perm(X, USR, P | US | ID),
    "user-read-user-page": Perm(R, USR, None, user=True),
    "user-write-user-page": Perm(W, USR, None, user=True),
    "user-fetch-user-page": Perm(X, USR, None, user=True),
    # R/W: user writes need R/W = 1 whatever CR0.WP says
    "user-write-readonly-wp1": Perm(W, USR, P | WR | US, user=True, writable=False),
    "user-write-readonly-wp0": Perm(W, USR, P | WR | US, user=True, writable=False, wp=False),
    "user-read-readonly": Perm(R, USR, None, user=True, writable=False),
    # supervisor writes honour R/W only with CR0.WP = 1
    "sup-write-readonly-wp1": Perm(W, SUP, P | WR, writable=False),
    "sup-write-readonly-wp0": Perm(W, SUP, None, writable=False, wp=False),
    "sup-write-user-readonly-wp1": Perm(W, SUP, P | WR, user=True, writable=False),
    "sup-write-user-readonly-wp0": Perm(W, SUP, None, user=True, writable=False, wp=False),
    "sup-read-user-page": Perm(R, SUP, None, user=True),
    # XD with NXE = 1: no fetch, reads and writes unaffected
    "sup-fetch-xd": Perm(X, SUP, P | ID, xd=True),
    "user-fetch-xd": Perm(X, USR, P | US | ID, user=True, xd=True),
    "sup-read-xd": Perm(R, SUP, None, xd=True),
    "user-write-xd": Perm(W, USR, None, user=True, xd=True),
    "sup-fetch-not-xd": Perm(X, SUP, None),
    # I/D is reported only with NXE = 1 or SMEP = 1
    "user-fetch-sup-page-nxe0": Perm(X, USR, P | US, nxe=False),
    "user-fetch-sup-page-nxe0-smep": Perm(X, USR, P | US | ID, nxe=False, smep=True),
    "sup-fetch-nxe0": Perm(X, SUP, None, nxe=False),
    # SMEP: no supervisor fetch from a user-mode address
    "smep-sup-fetch-user-page": Perm(X, SUP, P | ID, user=True, smep=True),
    "smep-sup-fetch-user-page-nxe0": Perm(X, SUP, P | ID, user=True, smep=True, nxe=False),
    "no-smep-sup-fetch-user-page": Perm(X, SUP, None, user=True),
    "smep-sup-fetch-sup-page": Perm(X, SUP, None, smep=True),
    "smep-user-fetch-user-page": Perm(X, USR, None, user=True, smep=True),
    "smep-sup-read-user-page": Perm(R, SUP, None, user=True, smep=True),
    # SMAP: supervisor data accesses to user-mode addresses need EFLAGS.AC = 1
    "smap-sup-read-user-ac0": Perm(R, SUP, P, user=True, smap=True),
    "smap-sup-write-user-ac0": Perm(W, SUP, P | WR, user=True, smap=True),
    "smap-sup-write-user-ac0-wp0": Perm(W, SUP, P | WR, user=True, smap=True, wp=False),
    "smap-sup-read-user-ac1": Perm(R, SUP, None, user=True, smap=True, ac=True),
    "smap-sup-write-user-ac1": Perm(W, SUP, None, user=True, smap=True, ac=True),
    "smap-sup-fetch-user-ac0": Perm(X, SUP, None, user=True, smap=True),
    "smap-sup-read-sup-page-ac0": Perm(R, SUP, None, smap=True),
    "smap-user-read-user-ac0": Perm(R, USR, None, user=True, smap=True),
    "smap-ac1-write-user-readonly-wp1": Perm(
        W, SUP, P | WR, user=True, writable=False, smap=True, ac=True
    ),
    "smap-ac1-write-user-readonly-wp0": Perm(
        W, SUP, None, user=True, writable=False, smap=True, ac=True, wp=False
    ),
    # protection keys (CR4.PKE): data accesses to user-mode addresses, key from the leaf
    "pke0-ignores-pkru": Perm(R, USR, None, user=True, pkey=3, pkru=ad(3) | wd(3)),
    "pk-ad-user-read": Perm(R, USR, P | US | PK, user=True, pke=True, pkey=3, pkru=ad(3)),
    "pk-ad-user-write": Perm(W, USR, P | WR | US | PK, user=True, pke=True, pkey=3, pkru=ad(3)),
    "pk-ad-sup-read": Perm(R, SUP, P | PK, user=True, pke=True, pkey=3, pkru=ad(3)),
    "pk-ad-sup-read-smap-ac1": Perm(
        R, SUP, P | PK, user=True, pke=True, pkey=3, pkru=ad(3), smap=True, ac=True
    ),
    "pk-ad-user-fetch": Perm(X, USR, None, user=True, pke=True, pkey=3, pkru=ad(3)),
    "pk-ad-sup-fetch": Perm(X, SUP, None, user=True, pke=True, pkey=3, pkru=ad(3)),
    "pk-wd-user-read": Perm(R, USR, None, user=True, pke=True, pkey=5, pkru=wd(5)),
    "pk-wd-user-write-wp1": Perm(W, USR, P | WR | US | PK, user=True, pke=True, pkey=5, pkru=wd(5)),
    "pk-wd-user-write-wp0": Perm(
        W, USR, P | WR | US | PK, user=True, pke=True, pkey=5, pkru=wd(5), wp=False
    ),
    "pk-wd-sup-write-wp1": Perm(W, SUP, P | WR | PK, user=True, pke=True, pkey=5, pkru=wd(5)),
    "pk-wd-sup-write-wp0": Perm(W, SUP, None, user=True, pke=True, pkey=5, pkru=wd(5), wp=False),
    "pk-wd-user-write-readonly": Perm(
        W, USR, P | WR | US | PK, user=True, writable=False, pke=True, pkey=5, pkru=wd(5)
    ),
    "pk-ad-supervisor-page": Perm(R, SUP, None, pke=True, pkey=3, pkru=ad(3)),
    "pk-wd-supervisor-page-write": Perm(W, SUP, None, pke=True, pkey=3, pkru=wd(3)),
    "pk-other-key": Perm(
        W, USR, None, user=True, pke=True, pkey=3, pkru=ad(2) | wd(2) | ad(4) | wd(4)
    ),
    "pk-key15": Perm(R, USR, P | US | PK, user=True, pke=True, pkey=15, pkru=ad(15)),
    "pk-key0": Perm(W, USR, P | WR | US | PK, user=True, pke=True, pkey=0, pkru=wd(0)),
}


@pytest.mark.parametrize("case", list(PERM_CASES.values()), ids=list(PERM_CASES))
@pytest.mark.parametrize("levels", [4, 5])
def test_access_rights(case: Perm, levels: int) -> None:
    space = make_space(
        levels, wp=case.wp, nxe=case.nxe, smep=case.smep, smap=case.smap, pke=case.pke
    )
    space.guest.pkru = case.pkru
    if case.ac:
        space.guest.rflags |= RFLAGS_AC
    gpa = space.map(GVA, user=case.user, writable=case.writable, xd=case.xd, pkey=case.pkey)
    t = translate(space, GVA, case.access, case.mode)
    if case.expect is None:
        assert_ok(space, t, gpa)
    else:
        assert_page_fault(t, case.expect)
        # a protection fault happens after a complete walk: every guest level was read
        assert [r.level for r in t.references if r.dim == Dim.GUEST] == list(range(levels, 0, -1))


@pytest.mark.parametrize("level", [4, 3, 2])
@pytest.mark.parametrize(
    ("field", "set_", "access", "mode", "error"),
    [
        ("U/S=0", False, R, USR, P | US),
        ("R/W=0", False, W, USR, P | WR | US),
        ("R/W=0 sup wp1", False, W, SUP, P | WR),
        ("XD=1", True, X, USR, P | US | ID),
        ("XD=1 sup", True, X, SUP, P | ID),
    ],
)
def test_rights_combine_over_all_levels(
    level: int, field: str, set_: bool, access: Access, mode: Mode, error: int
) -> None:
    """SDM §4.6.1: a user-mode address needs U/S = 1 in every entry, a writable one R/W = 1 in
    every entry; one XD = 1 anywhere forbids fetches. A non-leaf entry is enough to deny."""
    space = make_space()
    space.map(GVA, user=True, writable=True)
    bit = {
        "U/S=0": PTE_US,
        "R/W=0": PTE_RW,
        "R/W=0 sup wp1": PTE_RW,
        "XD=1": PTE_XD,
        "XD=1 sup": PTE_XD,
    }[field]
    if set_:
        or_entry(space, GVA, level, set_=bit)
    else:
        or_entry(space, GVA, level, clear=bit)
    assert_page_fault(translate(space, GVA, access, mode), error)


def test_smap_applies_to_the_user_mode_address_not_the_leaf() -> None:
    """A page whose leaf has U/S = 1 but a PDE with U/S = 0 is a supervisor-mode address: SMAP
    does not apply to it (and SMEP does not forbid fetching it)."""
    space = make_space(smap=True, smep=True)
    gpa = space.map(GVA, user=True)
    or_entry(space, GVA, 2, clear=PTE_US)
    assert_ok(space, translate(space, GVA, R, SUP), gpa)
    assert_ok(space, translate(space, GVA, X, SUP), gpa)


def test_pkey_is_taken_from_the_leaf_of_a_large_page() -> None:
    space = make_space(pke=True)
    space.map(GVA, PageSize.SIZE_2M, user=True, pkey=9)
    space.guest.pkru = ad(9)
    assert_page_fault(translate(space, GVA, R, USR), P | US | PK)
    space.guest.pkru = ad(8) | ad(10)
    assert translate(space, GVA, R, USR).ok


def test_fault_address_is_the_full_linear_address() -> None:
    """CR2 receives the linear address that faulted, offset bits and upper half included."""
    space = make_space()
    high = 0xFFFF_8765_4321_0FF8
    space.map(high)  # supervisor page
    t = translate(space, high, R, USR)
    assert_page_fault(t, P | US, address=high)


# -- non-canonical addresses -----------------------------------------------------------------

NON_CANONICAL_4 = [
    1 << 47,
    0x0000_8000_0000_1234,
    0xFFFF_7FFF_FFFF_F000,
    1 << 63,
    0x0001_0000_0000_0000,
    0x00FF_FFFF_FFFF_FFFF,
]
NON_CANONICAL_5 = [1 << 56, 0xFEFF_FFFF_FFFF_F000, 1 << 63, 0x7FFF_FFFF_FFFF_FFFF]


@pytest.mark.parametrize(
    ("levels", "gva"),
    [(4, a) for a in NON_CANONICAL_4] + [(5, a) for a in NON_CANONICAL_5],
)
@pytest.mark.parametrize(("access", "mode"), [(R, SUP), (W, USR), (X, SUP)])
def test_non_canonical_address_is_gp_without_references(
    levels: int, gva: int, access: Access, mode: Mode
) -> None:
    space = make_space(levels)
    t = translate(space, gva, access, mode)
    assert t.fault == GuestFault(GP_VECTOR, 0, gva)
    assert t.exit is None and t.hpa is None
    assert t.count == 0 and t.flag_writes == () and t.pml_logged == ()


@pytest.mark.parametrize(
    ("levels", "gva"),
    [
        (5, 1 << 47),
        (5, 0x00FF_FFFF_FFFF_F000),
        (5, 0xFF00_0000_0000_0000),
        (4, 0xFFFF_8000_0000_0000),
        (4, 0x0000_7FFF_FFFF_F000),
    ],
)
def test_canonical_addresses_translate(levels: int, gva: int) -> None:
    """Controls: canonical in 57 bits with LA57 (though not in 48), and both 48-bit edges."""
    space = make_space(levels)
    gpa = space.map(gva)
    t = translate(space, gva, R, SUP)
    assert t.ok and t.gpa == gpa
