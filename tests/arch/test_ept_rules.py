"""EPT rules, one test per rule, against the Intel SDM Vol. 3C.

§29.3.2 (EPT translation, present entries, 4-level EPT limits the GPA to 48 bits), §29.3.3.1 (EPT
misconfigurations, exit reason 49), §29.3.3.2 (EPT violations, exit reason 48; rights are the AND
over the entries used; mode-based execute control), §29.3.5 (EPT A/D: guest paging-structure
accesses become writes) and Table 28-7 (exit qualification for EPT violations). The last part
checks the arch encoders (EptEntry, GuestEntry, Eptp) and the errors they raise.

Qualification values are written as sums of the Table 28-7 bits below, never read back from the
walker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.arch import Access, Mode, PageSize
from eptlab.arch.ept import EptEntry, Eptp, MemoryType
from eptlab.arch.exits import EptMisconfig, EptViolation
from eptlab.arch.paging import GuestEntry
from eptlab.errors import (
    EncodingError,
    EptlabError,
    MisconfiguredEptEntry,
    ReservedBitsError,
)
from eptlab.mmu import CpuFeatures, Dim, Translation
from eptlab.mmu.scenario import NestedSpace

# -- Table 28-7, restated ----------------------------------------------------------------------

Q_READ, Q_WRITE, Q_FETCH = 1 << 0, 1 << 1, 1 << 2
Q_READABLE, Q_WRITABLE, Q_EXECUTABLE, Q_USER_EXECUTABLE = 1 << 3, 1 << 4, 1 << 5, 1 << 6
Q_GLA_VALID, Q_TRANSLATION = 1 << 7, 1 << 8
Q_USER_LINEAR, Q_WRITABLE_LINEAR, Q_XD_LINEAR = 1 << 9, 1 << 10, 1 << 11

EPT_VIOLATION, EPT_MISCONFIG = 48, 49

# EPT entry bits (SDM Tables 29-1..29-7)
E_R, E_W, E_X, E_PS, E_A, E_D, E_XU = 1, 2, 4, 1 << 7, 1 << 8, 1 << 9, 1 << 10
E_MEMTYPE = 0b111 << 3
# guest entry bits
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_XD = 1, 2, 4, 1 << 5, 1 << 6, 1 << 63

R, W, X = Access.READ, Access.WRITE, Access.FETCH
SUP, USR = Mode.SUPERVISOR, Mode.USER
K4, M2, G1 = PageSize.SIZE_4K, PageSize.SIZE_2M, PageSize.SIZE_1G

GVA = 0x0000_7F12_3456_7ABC
N = M = 4  # guest and EPT levels unless a test says otherwise

ACCESS_BIT = {R: Q_READ, W: Q_WRITE, X: Q_FETCH}


def rights(perms: str) -> int:
    """Qualification bits 5:3 for EPT permissions written 'rwx' style."""
    return sum(
        q for c, q in zip(perms, (Q_READABLE, Q_WRITABLE, Q_EXECUTABLE), strict=True) if c != "-"
    )


def linear(user: bool, writable: bool, xd: bool) -> int:
    return (
        (Q_USER_LINEAR if user else 0)
        | (Q_WRITABLE_LINEAR if writable else 0)
        | (Q_XD_LINEAR if xd else 0)
    )


def make(**kwargs: Any) -> NestedSpace:
    return NestedSpace.create(**kwargs)


def data_gpa(space: NestedSpace, gva: int = GVA, guest_page: PageSize = K4, **kw: Any) -> int:
    """Map ``gva`` and return the GPA that ``gva`` itself translates to (offset included)."""
    base = space.map(gva, guest_page, **kw)
    return base + (gva & (guest_page - 1))


def ept_addr(space: NestedSpace, gpa: int, level: int) -> int:
    assert space.ept is not None
    return space.ept.entry_address(gpa, level)


def ept_get(space: NestedSpace, gpa: int, level: int) -> int:
    return space.memory.read_u64(ept_addr(space, gpa, level))


def ept_set(space: NestedSpace, gpa: int, level: int, value: int) -> None:
    space.memory.write_u64(ept_addr(space, gpa, level), value)


def ept_edit(space: NestedSpace, gpa: int, level: int, set_: int = 0, clear: int = 0) -> None:
    ept_set(space, gpa, level, (ept_get(space, gpa, level) & ~clear) | set_)


def guest_edit(space: NestedSpace, gva: int, level: int, set_: int = 0, clear: int = 0) -> None:
    slot = space.tables.entry_address(gva, level)
    space.tables.store.write_u64(slot, (space.tables.store.read_u64(slot) & ~clear) | set_)


def guest_entry_gpa(space: NestedSpace, gva: int, level: int) -> int:
    return space.tables.entry_address(gva, level)


def preset_guest_ad(space: NestedSpace, gva: int, leaf_level: int, dirty: bool) -> None:
    """Set A in every guest entry on the path (and D in the leaf) so no flag update is needed."""
    for level in range(space.tables.levels, leaf_level - 1, -1):
        guest_edit(space, gva, level, set_=PTE_A | (PTE_D if dirty and level == leaf_level else 0))


def walk(space: NestedSpace, access: Access, mode: Mode = SUP, gva: int = GVA) -> Translation:
    return space.walker().translate(gva, access, mode)


def violation(t: Translation) -> EptViolation:
    assert t.fault is None and t.hpa is None, (t.fault, t.hpa)
    assert isinstance(t.exit, EptViolation), t.exit
    assert t.exit.reason == EPT_VIOLATION
    return t.exit


def misconfig(t: Translation) -> EptMisconfig:
    assert t.fault is None and t.hpa is None, (t.fault, t.hpa)
    assert isinstance(t.exit, EptMisconfig), t.exit
    assert t.exit.reason == EPT_MISCONFIG and t.exit.qualification == 0
    return t.exit


def assert_violation(t: Translation, gpa: int, qualification: int, gla: int = GVA) -> None:
    v = violation(t)
    assert v.qualification == qualification, f"{v.qualification:#x} != {qualification:#x}"
    assert v.gpa == gpa and v.gla == gla


def assert_misconfig(t: Translation, gpa: int, level: int) -> None:
    mc = misconfig(t)
    assert mc.gpa == gpa and mc.level == level
    last = t.references[-1]
    assert (last.dim, last.level) == (Dim.EPT, level), "the walk must stop at the bad entry"


def assert_ok(space: NestedSpace, t: Translation, gpa: int) -> None:
    assert t.fault is None and t.exit is None, (t.fault, t.exit)
    assert space.ept is not None
    assert t.gpa == gpa and t.hpa == space.ept.host_address(gpa)


# -- EPT violations: not-present entries -------------------------------------------------------

NOT_PRESENT_LEAF = [
    # access, mode, user, writable, xd, qualification (sum of Table 28-7 bits)
    (R, SUP, False, True, False, 0x581),  # R | GLA | TRANSLATION | WRITABLE_LINEAR
    (W, SUP, False, True, False, 0x582),
    (X, SUP, False, True, False, 0x584),
    (R, USR, True, False, False, 0x381),  # R | GLA | TRANSLATION | USER_LINEAR
    (W, USR, True, True, False, 0x782),
    (X, USR, True, False, False, 0x384),
    (R, SUP, False, False, True, 0x981),  # R | GLA | TRANSLATION | XD_LINEAR
    (W, USR, True, True, True, 0xF82),
]


@pytest.mark.parametrize(("access", "mode", "user", "writable", "xd", "qual"), NOT_PRESENT_LEAF)
@pytest.mark.parametrize("ept_page", [K4, M2, G1])
def test_not_present_leaf(
    access: Access,
    mode: Mode,
    user: bool,
    writable: bool,
    xd: bool,
    qual: int,
    ept_page: PageSize,
) -> None:
    """Bits 2:0 = 0 in the leaf: a violation whose bits 5:3 are 0 (Table 28-7 note: cleared when
    an entry used is not present); bits 7 and 8 set (final access); 9-11 from guest paging."""
    space = make()
    gpa = data_gpa(space, ept_page=ept_page, ept_perms="---", user=user, writable=writable, xd=xd)
    assert qual == ACCESS_BIT[access] | Q_GLA_VALID | Q_TRANSLATION | linear(user, writable, xd)
    t = walk(space, access, mode)
    assert_violation(t, gpa, qual)
    last = t.references[-1]
    assert (last.dim, last.level, last.for_level) == (Dim.EPT, ept_page.level, 0)
    assert t.count == N * (M + 1) + (M - ept_page.level + 1)


@pytest.mark.parametrize("level", [3, 2])
@pytest.mark.parametrize("junk", [0, 0x38 | E_A | (1 << 20) | (1 << 51)])
@pytest.mark.parametrize("access", [R, W, X])
def test_not_present_non_leaf(level: int, junk: int, access: Access) -> None:
    """A non-leaf EPT entry with bits 2:0 = 0 is not present whatever its other bits hold: the
    violation reports no rights (bits 5:3 = 0) and the walk stops there."""
    space = make()
    gpa = data_gpa(space)
    ept_set(space, gpa, level, junk)
    t = walk(space, access)
    assert_violation(t, gpa, ACCESS_BIT[access] | Q_GLA_VALID | Q_TRANSLATION | Q_WRITABLE_LINEAR)
    last = t.references[-1]
    assert (last.dim, last.level) == (Dim.EPT, level)
    assert t.count == N * (M + 1) + (M - level + 1)


@pytest.mark.parametrize(("access", "mode"), [(R, SUP), (W, USR), (X, USR)])
def test_not_present_top_ept_entry_stops_the_first_guest_access(access: Access, mode: Mode) -> None:
    """Without the EPT PML4E nothing translates: the first access is to the guest PML4E, a read
    of a paging-structure entry (bit 0, bit 7, not bit 8), whatever the guest access was."""
    space = make()
    data_gpa(space, user=True)
    ept_set(space, 0, 4, 0)
    t = walk(space, access, mode)
    assert_violation(t, guest_entry_gpa(space, GVA, 4), Q_READ | Q_GLA_VALID)  # 0x81
    assert t.count == 1


# -- EPT violations: rights --------------------------------------------------------------------

LEAF_PERMS = ["r--", "rw-", "r-x", "--x", "rwx"]


@pytest.mark.parametrize("perms", LEAF_PERMS)
@pytest.mark.parametrize("access", [R, W, X])
@pytest.mark.parametrize("ept_page", [K4, M2])
def test_leaf_rights(perms: str, access: Access, ept_page: PageSize) -> None:
    """Reads need bit 0, writes bit 1, fetches bit 2 (§29.3.3.2); a violation reports the access
    in bits 2:0 and what the entries allow in bits 5:3."""
    space = make()
    gpa = data_gpa(space, ept_page=ept_page, ept_perms=perms)
    needed = {R: "r", W: "w", X: "x"}[access]
    t = walk(space, access)
    if needed in perms:
        assert_ok(space, t, gpa)
    else:
        qual = (
            ACCESS_BIT[access] | rights(perms) | Q_GLA_VALID | Q_TRANSLATION | (Q_WRITABLE_LINEAR)
        )
        assert_violation(t, gpa, qual)
        assert t.count == N * (M + 1) + (M - ept_page.level + 1)


@pytest.mark.parametrize("level", [4, 3, 2])
@pytest.mark.parametrize(
    ("upper", "access", "qual"),
    [
        # upper entry r-x, leaf rwx: a write is denied; AND = r-x
        ("r-x", W, Q_WRITE | Q_READABLE | Q_EXECUTABLE),
        # upper entry --x, leaf rwx: a read is denied; AND = --x
        ("--x", R, Q_READ | Q_EXECUTABLE),
        # upper entry rw-, leaf rwx: a fetch is denied; AND = rw-
        ("rw-", X, Q_FETCH | Q_READABLE | Q_WRITABLE),
    ],
)
def test_rights_are_anded_over_all_entries(
    level: int, upper: str, access: Access, qual: int
) -> None:
    """§29.3.3.2: an access is denied if its bit is clear in *any* entry used, and bits 5:3
    report the AND over all of them - here a non-leaf entry restricts an rwx leaf."""
    space = make()
    gpa = data_gpa(space)
    # guest A/D flags preset: no processor write to the guest tables is needed (the EPT PML4E
    # also maps the table pages, and we want the data access to be the one that is judged)
    preset_guest_ad(space, GVA, 1, dirty=True)
    perm_bits = sum(b for c, b in zip(upper, (E_R, E_W, E_X), strict=True) if c != "-")
    ept_edit(space, gpa, level, set_=perm_bits, clear=E_R | E_W | E_X)
    t = walk(space, access)
    if level == 4 and "r" not in upper:
        # the PML4E also translates the guest tables: the guest PML4E read itself is denied
        # (a paging-structure access: bit 0, no bit 8)
        assert_violation(t, guest_entry_gpa(space, GVA, 4), Q_READ | Q_EXECUTABLE | Q_GLA_VALID)
        return
    assert_violation(t, gpa, qual | Q_GLA_VALID | Q_TRANSLATION | Q_WRITABLE_LINEAR)
    # the other accesses the AND allows still work (controls)
    for other in (R, W, X):
        if {R: "r", W: "w", X: "x"}[other] in upper:
            assert_ok(space, walk(space, other), gpa)


@pytest.mark.parametrize(
    ("guest_level", "edit", "bits"),
    [
        (2, {"clear": PTE_US}, Q_WRITABLE_LINEAR),  # U/S=0 in the PDE: supervisor address
        (3, {"clear": PTE_RW}, Q_USER_LINEAR),  # R/W=0 in the PDPTE: read-only page
        (4, {"set_": PTE_XD}, Q_USER_LINEAR | Q_WRITABLE_LINEAR | Q_XD_LINEAR),
        (1, {}, Q_USER_LINEAR | Q_WRITABLE_LINEAR),
    ],
)
def test_linear_bits_describe_the_whole_guest_translation(
    guest_level: int, edit: dict[str, int], bits: int
) -> None:
    """Bits 9-11: user-mode address (U/S = 1 everywhere), read/write page (R/W = 1 everywhere),
    execute-disabled page (XD = 1 anywhere, NXE = 1) - SDM §4.6 meanings, not the leaf's bits."""
    space = make()
    gpa = data_gpa(space, user=True, writable=True, ept_perms="---")
    guest_edit(space, GVA, guest_level, **edit)
    assert_violation(walk(space, R), gpa, Q_READ | Q_GLA_VALID | Q_TRANSLATION | bits)


# -- bit 8: guest paging-structure accesses ----------------------------------------------------


@pytest.mark.parametrize(("access", "mode"), [(R, SUP), (W, SUP), (X, SUP), (W, USR)])
@pytest.mark.parametrize(
    ("perms", "qual"), [("---", Q_READ | Q_GLA_VALID), ("--x", Q_READ | Q_EXECUTABLE | Q_GLA_VALID)]
)
def test_paging_structure_access_clears_bit_8(
    access: Access, mode: Mode, perms: str, qual: int
) -> None:
    """Reading a guest paging-structure entry is a data read (§29.3.3.2) whatever the guest
    access; bit 8 is 0 and bits 9-11 are not reported (they need bit 8 = 1)."""
    space = make()
    data_gpa(space, user=True, writable=True, xd=False)
    space.protect_tables(perms)
    t = walk(space, access, mode)
    assert_violation(t, guest_entry_gpa(space, GVA, 4), qual)
    assert t.count == M  # only the EPT walk of the guest PML4E's GPA


@pytest.mark.parametrize("level", [3, 2, 1])
def test_paging_structure_access_at_lower_level(level: int) -> None:
    """Only the page holding the guest entry at ``level`` is unreadable: the upper entries are
    read, then the violation names the entry's own GPA."""
    space = make()
    data_gpa(space)
    table_gpa = guest_entry_gpa(space, GVA, level) & ~0xFFF
    ept_edit(space, table_gpa, 1, clear=E_R | E_W | E_X)
    t = walk(space, W)
    assert_violation(t, guest_entry_gpa(space, GVA, level), Q_READ | Q_GLA_VALID)
    assert t.count == (N - level) * (M + 1) + M


# -- guest A/D updates are writes (§29.3.3.2) --------------------------------------------------


def _rmw_quals(base: int) -> set[int]:
    """A/D updates are read-modify-writes: bit 1 is set; whether bit 0 is also set is
    implementation-specific (SDM Vol. 3C §28.2.1, notes to Table 28-7)."""
    return {base, base | Q_READ}


@pytest.mark.parametrize("perms", ["r--", "r-x"])
@pytest.mark.parametrize("access", [R, X])
def test_guest_accessed_flag_update_needs_ept_write(perms: str, access: Access) -> None:
    space = make()
    data_gpa(space)
    space.protect_tables(perms)
    t = walk(space, access)
    v = violation(t)
    # the first entry whose A flag must be set is the guest PML4E
    assert v.gpa == guest_entry_gpa(space, GVA, 4) and v.gla == GVA
    assert v.qualification in _rmw_quals(Q_WRITE | rights(perms) | Q_GLA_VALID), hex(
        v.qualification
    )


@pytest.mark.parametrize("perms", ["r--", "r-x"])
def test_no_violation_when_no_guest_flag_must_change(perms: str) -> None:
    space = make()
    gpa = data_gpa(space)
    preset_guest_ad(space, GVA, 1, dirty=False)
    space.protect_tables(perms)
    assert_ok(space, walk(space, R), gpa)
    assert_ok(space, walk(space, X), gpa)
    # a write must set D in the PTE: that write to the guest page table is a violation
    t = walk(space, W)
    v = violation(t)
    assert v.gpa == guest_entry_gpa(space, GVA, 1)
    assert v.qualification in _rmw_quals(Q_WRITE | rights(perms) | Q_GLA_VALID)
    preset_guest_ad(space, GVA, 1, dirty=True)
    assert_ok(space, walk(space, W), gpa)


# -- EPT A/D: guest paging-structure accesses are writes (§29.3.5) -----------------------------


@pytest.mark.parametrize(
    ("perms", "qual"),
    [
        ("r-x", Q_READ | Q_WRITE | Q_READABLE | Q_EXECUTABLE | Q_GLA_VALID),  # 0xAB
        ("r--", Q_READ | Q_WRITE | Q_READABLE | Q_GLA_VALID),  # 0x8B
        ("---", Q_READ | Q_WRITE | Q_GLA_VALID),  # 0x83
        ("--x", Q_READ | Q_WRITE | Q_EXECUTABLE | Q_GLA_VALID),  # 0xA3
    ],
)
@pytest.mark.parametrize("access", [R, X])
def test_ept_ad_makes_paging_structure_reads_writes(perms: str, qual: int, access: Access) -> None:
    """With EPTP bit 6 = 1 a read-only table page faults even for a guest read, and even when
    no guest A/D flag needs to change; the qualification has both bits 0 and 1."""
    space = make(ept_ad=True)
    data_gpa(space)
    preset_guest_ad(space, GVA, 1, dirty=True)
    space.protect_tables(perms)
    t = walk(space, access)
    assert_violation(t, guest_entry_gpa(space, GVA, 4), qual)
    assert t.count == M


@pytest.mark.parametrize("perms", ["rw-", "rwx"])
def test_ept_ad_writable_tables_translate(perms: str) -> None:
    space = make(ept_ad=True)
    gpa = data_gpa(space)
    space.protect_tables(perms)
    for access in (R, W, X):
        assert_ok(space, walk(space, access), gpa)


def test_without_ept_ad_read_only_tables_with_flags_set_translate() -> None:
    """Control for the test above: the same read-only tables are fine without EPT A/D."""
    space = make(ept_ad=False)
    gpa = data_gpa(space)
    preset_guest_ad(space, GVA, 1, dirty=True)
    space.protect_tables("r--")
    for access in (R, W, X):
        assert_ok(space, walk(space, access), gpa)


# -- mode-based execute control (§29.3.3.2, Table 28-7 bit 6) ----------------------------------


def set_leaf_exec(space: NestedSpace, gpa: int, perms: int) -> None:
    """Give the data page's 4 KiB EPT leaf exactly the rights in ``perms`` (bits 2:0 and 10)."""
    ept_edit(space, gpa, 1, set_=perms, clear=(E_R | E_W | E_X | E_XU) & ~perms)


MBEC_CASES = [
    # guest page is user?, leaf rights, fetch mode, expected qualification (None = allowed)
    # a user-mode linear address is governed by bit 10 - even for a supervisor fetch
    (
        True,
        E_R | E_W | E_X,
        USR,
        Q_FETCH
        | Q_READABLE
        | Q_WRITABLE
        | Q_EXECUTABLE
        | Q_GLA_VALID
        | Q_TRANSLATION
        | Q_USER_LINEAR
        | Q_WRITABLE_LINEAR,
    ),  # 0x7BC
    (
        True,
        E_R | E_W | E_X,
        SUP,
        Q_FETCH
        | Q_READABLE
        | Q_WRITABLE
        | Q_EXECUTABLE
        | Q_GLA_VALID
        | Q_TRANSLATION
        | Q_USER_LINEAR
        | Q_WRITABLE_LINEAR,
    ),
    (True, E_R | E_W | E_XU, USR, None),
    (True, E_R | E_W | E_XU, SUP, None),
    # a supervisor-mode linear address is governed by bit 2
    (
        False,
        E_R | E_W | E_XU,
        SUP,
        Q_FETCH
        | Q_READABLE
        | Q_WRITABLE
        | Q_USER_EXECUTABLE
        | Q_GLA_VALID
        | Q_TRANSLATION
        | Q_WRITABLE_LINEAR,
    ),  # 0x5DC
    (False, E_R | E_W | E_X, SUP, None),
    (False, E_R | E_X | E_XU, SUP, None),
]


@pytest.mark.parametrize(("user", "perms", "mode", "qual"), MBEC_CASES)
def test_mode_based_execute(user: bool, perms: int, mode: Mode, qual: int | None) -> None:
    space = make(mbec=True)
    gpa = data_gpa(space, user=user)
    set_leaf_exec(space, gpa, perms)
    t = walk(space, X, mode)
    if qual is None:
        assert_ok(space, t, gpa)
    else:
        assert_violation(t, gpa, qual)
    # reads are not affected by execute rights
    assert_ok(space, walk(space, R, mode), gpa)


def test_without_mbec_bit_10_is_ignored() -> None:
    space = make(mbec=False)
    gpa = data_gpa(space, user=True)
    set_leaf_exec(space, gpa, E_R | E_X)  # bit 10 clear
    assert_ok(space, walk(space, X, USR), gpa)
    set_leaf_exec(space, gpa, E_R | E_XU)  # bit 10 alone grants nothing
    v = violation(walk(space, X, USR))
    # bit 6 is undefined without MBEC: compare the rest
    assert v.qualification & ~Q_USER_EXECUTABLE == (
        Q_FETCH | Q_READABLE | Q_GLA_VALID | Q_TRANSLATION | Q_USER_LINEAR | Q_WRITABLE_LINEAR
    )


def test_mbec_bit_10_alone_makes_an_entry_present() -> None:
    """§29.3.2: with MBEC an entry is present if any of bits 2:0 or bit 10 is 1."""
    space = make(mbec=True)
    gpa = data_gpa(space, user=True)
    set_leaf_exec(space, gpa, E_XU)
    assert_ok(space, walk(space, X, USR), gpa)  # execute-only is supported by default
    t = walk(space, R, USR)
    assert_violation(
        t,
        gpa,
        Q_READ
        | Q_USER_EXECUTABLE
        | Q_GLA_VALID
        | Q_TRANSLATION
        | Q_USER_LINEAR
        | Q_WRITABLE_LINEAR,
    )  # 0x7C1
    # without MBEC the same entry is not present: bits 5:3 cleared (bit 6 undefined)
    space2 = make(mbec=False)
    gpa2 = data_gpa(space2, user=True)
    set_leaf_exec(space2, gpa2, E_XU)
    v = violation(walk(space2, X, USR))
    assert v.qualification & ~Q_USER_EXECUTABLE == (
        Q_FETCH | Q_GLA_VALID | Q_TRANSLATION | Q_USER_LINEAR | Q_WRITABLE_LINEAR
    )


def test_mbec_user_execute_only_without_execute_only_support_is_misconfig() -> None:
    """§29.3.3.1: bit 0 clear and, without execute-only support, bit 2 set or (MBEC) bit 10
    set is an EPT misconfiguration."""
    space = make(mbec=True, features=CpuFeatures(ept_execute_only=False))
    gpa = data_gpa(space, user=True)
    set_leaf_exec(space, gpa, E_XU)
    assert_misconfig(walk(space, X, USR), gpa, 1)
    set_leaf_exec(space, gpa, E_R | E_XU)  # control: with read it is fine
    assert_ok(space, walk(space, X, USR), gpa)


# -- EPT misconfigurations (§29.3.3.1) ---------------------------------------------------------


@pytest.mark.parametrize("perms", ["-w-", "-wx"])
@pytest.mark.parametrize("access", [R, W, X])
@pytest.mark.parametrize("ept_page", [K4, M2, G1])
def test_write_without_read_is_misconfig(perms: str, access: Access, ept_page: PageSize) -> None:
    space = make()
    gpa = data_gpa(space, ept_page=ept_page, ept_perms=perms)
    assert_misconfig(walk(space, access), gpa, ept_page.level)


def test_write_without_read_in_a_table_page_is_misconfig() -> None:
    space = make()
    data_gpa(space)
    space.protect_tables("-w-")
    assert_misconfig(walk(space, R), guest_entry_gpa(space, GVA, 4), 1)


@pytest.mark.parametrize("memtype", [2, 3, 7])
@pytest.mark.parametrize("ept_page", [K4, M2, G1])
def test_reserved_memory_type_is_misconfig(memtype: int, ept_page: PageSize) -> None:
    space = make()
    gpa = data_gpa(space, ept_page=ept_page)
    ept_edit(space, gpa, ept_page.level, set_=memtype << 3, clear=E_MEMTYPE)
    assert_misconfig(walk(space, R), gpa, ept_page.level)


@pytest.mark.parametrize("memtype", [0, 1, 4, 5, 6])
def test_valid_memory_types_translate(memtype: int) -> None:
    space = make()
    gpa = data_gpa(space)
    ept_edit(space, gpa, 1, set_=memtype << 3, clear=E_MEMTYPE)
    assert_ok(space, walk(space, W), gpa)


@pytest.mark.parametrize(("ept_levels", "level"), [(4, 4), (5, 5), (5, 4)])
@pytest.mark.parametrize("bit", [3, 4, 5, 6, 7])
def test_reserved_bits_7_3_of_pml4e_and_pml5e(ept_levels: int, level: int, bit: int) -> None:
    """EPT PML5E/PML4E: bits 7:3 are reserved (bit 7 is not a page size there). The entry at
    index 0 also maps the guest tables, so the very first guest access meets it."""
    space = make(ept_levels=ept_levels)
    data_gpa(space)
    ept_edit(space, 0, level, set_=1 << bit)
    assert_misconfig(walk(space, R), guest_entry_gpa(space, GVA, 4), level)


@pytest.mark.parametrize("level", [3, 2])
@pytest.mark.parametrize("bit", [3, 4, 5, 6])
def test_reserved_bits_6_3_of_non_leaf(level: int, bit: int) -> None:
    space = make()
    gpa = data_gpa(space)
    ept_edit(space, gpa, level, set_=1 << bit)
    assert_misconfig(walk(space, R), gpa, level)


@pytest.mark.parametrize(
    ("ept_page", "bit"),
    [(M2, 12), (M2, 13), (M2, 16), (M2, 20), (G1, 12), (G1, 20), (G1, 21), (G1, 29)],
)
def test_reserved_address_bits_of_large_leaves(ept_page: PageSize, bit: int) -> None:
    space = make()
    gpa = data_gpa(space, ept_page=ept_page)
    ept_edit(space, gpa, ept_page.level, set_=1 << bit)
    assert_misconfig(walk(space, R), gpa, ept_page.level)


@pytest.mark.parametrize(
    ("maxphyaddr", "bit"), [(46, 46), (46, 51), (40, 40), (40, 45), (52 - 3, 50)]
)
@pytest.mark.parametrize("level", [3, 2, 1])
def test_address_bits_above_maxphyaddr(maxphyaddr: int, bit: int, level: int) -> None:
    space = make(features=CpuFeatures(maxphyaddr=maxphyaddr))
    gpa = data_gpa(space)
    ept_edit(space, gpa, level, set_=1 << bit)
    assert_misconfig(walk(space, R), gpa, level)


@pytest.mark.parametrize("bit", [7, 11, 52, 58, 62])
def test_ignored_bits_of_a_pte_are_not_misconfig(bit: int) -> None:
    """Control: bit 7 of an EPT PTE, bit 11 and bits 62:52 are ignored."""
    space = make()
    gpa = data_gpa(space)
    ept_edit(space, gpa, 1, set_=1 << bit)
    assert_ok(space, walk(space, R), gpa)


@pytest.mark.parametrize("access", [R, X])
def test_execute_only_without_support_is_misconfig(access: Access) -> None:
    space = make(features=CpuFeatures(ept_execute_only=False))
    gpa = data_gpa(space, ept_perms="--x")
    assert_misconfig(walk(space, access), gpa, 1)


def test_execute_only_with_support_is_allowed() -> None:
    space = make(features=CpuFeatures(ept_execute_only=True))
    gpa = data_gpa(space, ept_perms="--x")
    assert_ok(space, walk(space, X), gpa)
    assert_violation(
        walk(space, R), gpa, Q_READ | Q_EXECUTABLE | Q_GLA_VALID | Q_TRANSLATION | Q_WRITABLE_LINEAR
    )


@pytest.mark.parametrize("level", [3, 2])
def test_upper_misconfig_wins_over_not_present_lower_entry(level: int) -> None:
    space = make()
    gpa = data_gpa(space)
    ept_set(space, gpa, 1, 0)  # the leaf is not present ...
    ept_edit(space, gpa, level, set_=1 << 3)  # ... but an entry above it is misconfigured
    assert_misconfig(walk(space, R), gpa, level)


def test_misconfig_wins_over_rights_denied_above() -> None:
    """'An EPT violation occurs when there is no EPT misconfiguration': the PDE denies writes,
    the leaf is write-without-read; the walk reports the misconfiguration."""
    space = make()
    gpa = data_gpa(space, ept_perms="-w-")
    ept_edit(space, gpa, 2, clear=E_W)
    assert_misconfig(walk(space, W), gpa, 1)


def test_reserved_memory_type_wins_over_missing_rights() -> None:
    space = make()
    gpa = data_gpa(space, ept_perms="r--")
    ept_edit(space, gpa, 1, set_=7 << 3, clear=E_MEMTYPE)
    assert_misconfig(walk(space, W), gpa, 1)


def test_not_present_entry_with_reserved_values_is_a_violation() -> None:
    """Bits 2:0 = 0: the processor ignores the rest, so 'reserved' bits there are no
    misconfiguration (§29.3.2)."""
    space = make()
    gpa = data_gpa(space)
    ept_set(space, gpa, 1, (7 << 3) | (1 << 51) | (1 << 7))
    assert_violation(walk(space, R), gpa, Q_READ | Q_GLA_VALID | Q_TRANSLATION | Q_WRITABLE_LINEAR)


# -- 4-level EPT translates 48-bit guest-physical addresses (§29.3.2) -------------------------


def test_gpa_beyond_48_bits_with_4_level_ept_is_a_violation() -> None:
    """'With 4-level EPT, bits 51:48 of the guest-physical address must all be zero; otherwise,
    an EPT violation occurs' - and bits 5:3 of the qualification are cleared (Table 28-7)."""
    space = make(features=CpuFeatures(maxphyaddr=52))
    gpa = data_gpa(space)
    high = gpa | (1 << 48)
    guest_edit(space, GVA, 1, set_=1 << 48)  # the guest PTE now points above 2^48
    t = walk(space, R)
    # (the page at bits 47:0 is mapped: a walker that dropped bits 51:48 would translate)
    assert_violation(t, high, Q_READ | Q_GLA_VALID | Q_TRANSLATION | Q_WRITABLE_LINEAR)


def test_gpa_beyond_48_bits_with_5_level_ept_is_walked() -> None:
    space = make(ept_levels=5, features=CpuFeatures(maxphyaddr=52))
    gpa = data_gpa(space)
    guest_edit(space, GVA, 1, set_=1 << 48)
    t = walk(space, R)
    # not mapped: the EPT PML5E for index 1 is not present
    assert_violation(t, gpa | (1 << 48), Q_READ | Q_GLA_VALID | Q_TRANSLATION | Q_WRITABLE_LINEAR)
    assert t.references[-1].level == 5


# -- arch encoders -----------------------------------------------------------------------------

MAXPHY = st.integers(min_value=36, max_value=52)


@st.composite
def ept_entries(draw: st.DrawFn) -> tuple[EptEntry, int]:
    m = draw(MAXPHY)
    level = draw(st.integers(1, 5))
    page_size = level in (2, 3) and draw(st.booleans())
    leaf = level == 1 or page_size
    shift = 12 + 9 * (level - 1) if leaf else 12
    address = draw(st.integers(0, (1 << m) - 1)) >> shift << shift
    perms = draw(st.sampled_from(["r--", "rw-", "r-x", "rwx", "--x"]))
    entry = EptEntry(
        level=level,
        address=address,
        read=perms[0] == "r",
        write=perms[1] == "w",
        execute=perms[2] == "x",
        user_execute=draw(st.booleans()),
        memory_type=draw(st.sampled_from(list(MemoryType))) if leaf else MemoryType.WB,
        ignore_pat=leaf and draw(st.booleans()),
        page_size=page_size,
        accessed=draw(st.booleans()),
        dirty=leaf and draw(st.booleans()),
        suppress_ve=leaf and draw(st.booleans()),
    )
    return entry, m


@settings(max_examples=200, deadline=None)
@given(ept_entries())
def test_ept_entry_round_trip_and_bit_positions(case: tuple[EptEntry, int]) -> None:
    e, m = case
    v = e.encode(m)
    assert EptEntry.decode(v, e.level, m) == e
    # bit positions from SDM Tables 29-1..29-7
    assert v & 1 == e.read and v >> 1 & 1 == e.write and v >> 2 & 1 == e.execute
    assert v >> 7 & 1 == e.page_size and v >> 8 & 1 == e.accessed
    assert v >> 10 & 1 == e.user_execute
    assert v & (((1 << m) - 1) & ~0xFFF) == e.address
    assert v & ((1 << 52) - (1 << m)) == 0  # nothing at or above MAXPHYADDR
    assert v >> 11 & 1 == 0 and v >> 52 & 0x7FF == 0
    if e.leaf:
        assert v >> 3 & 7 == e.memory_type and v >> 6 & 1 == e.ignore_pat
        assert v >> 9 & 1 == e.dirty and v >> 63 == e.suppress_ve
    else:
        assert v >> 3 & 0xF == 0 and v >> 9 & 1 == 0 and v >> 63 == 0


@st.composite
def guest_entries(draw: st.DrawFn) -> tuple[GuestEntry, int]:
    m = draw(MAXPHY)
    level = draw(st.integers(1, 5))
    page_size = level in (2, 3) and draw(st.booleans())
    leaf = level == 1 or page_size
    shift = 12 + 9 * (level - 1) if leaf else 12
    address = draw(st.integers(0, (1 << m) - 1)) >> shift << shift
    entry = GuestEntry(
        level=level,
        address=address,
        writable=draw(st.booleans()),
        user=draw(st.booleans()),
        pwt=draw(st.booleans()),
        pcd=draw(st.booleans()),
        accessed=draw(st.booleans()),
        dirty=leaf and draw(st.booleans()),
        page_size=page_size,
        global_=leaf and draw(st.booleans()),
        pat=leaf and draw(st.booleans()),
        xd=draw(st.booleans()),
        pkey=draw(st.integers(0, 15)) if leaf else 0,
    )
    return entry, m


@settings(max_examples=200, deadline=None)
@given(guest_entries())
def test_guest_entry_round_trip_and_bit_positions(case: tuple[GuestEntry, int]) -> None:
    e, m = case
    v = e.encode(m)
    assert GuestEntry.decode(v, e.level, m, nxe=True) == e
    # SDM Vol. 3A Tables 4-15..4-20
    assert v & 1 == 1
    assert (v >> 1 & 1, v >> 2 & 1, v >> 3 & 1, v >> 4 & 1, v >> 5 & 1) == (
        e.writable,
        e.user,
        e.pwt,
        e.pcd,
        e.accessed,
    )
    assert v >> 63 == e.xd
    if e.level == 1:
        assert v >> 7 & 1 == e.pat  # bit 7 of a PTE is PAT
    else:
        assert v >> 7 & 1 == e.page_size
    if e.leaf:
        assert v >> 6 & 1 == e.dirty and v >> 8 & 1 == e.global_
        assert v >> 59 & 0xF == e.pkey
        if e.level > 1:
            assert v >> 12 & 1 == e.pat  # PAT of a large page is bit 12
        frame = ((1 << m) - 1) & ~((1 << (12 + 9 * (e.level - 1))) - 1)
        assert v & frame == e.address
    else:
        assert v >> 6 & 1 == 0 and v >> 8 & 1 == 0 and v >> 59 & 0xF == 0
        assert v & (((1 << m) - 1) & ~0xFFF) == e.address


@settings(max_examples=100, deadline=None)
@given(
    MAXPHY.flatmap(lambda m: st.tuples(st.just(m), st.integers(0, (1 << m) - 1))),
    st.sampled_from([4, 5]),
    st.sampled_from([MemoryType.UC, MemoryType.WB]),
    st.booleans(),
)
def test_eptp_round_trip_and_bit_positions(
    root: tuple[int, int], levels: int, memory_type: MemoryType, ad: bool
) -> None:
    m, address = root
    address &= ~0xFFF
    p = Eptp(root=address, levels=levels, memory_type=memory_type, ad_enabled=ad)
    v = p.encode()
    assert Eptp.decode(v, m) == p
    # SDM Vol. 3C Table 25-9: 2:0 memory type, 5:3 walk length - 1, 6 A/D, N-1:12 address
    assert v & 7 == memory_type and v >> 3 & 7 == levels - 1 and v >> 6 & 1 == ad
    assert v & ~0xFFF == address and v >> 7 & 0x1F == 0


RESERVED_2 = cast(MemoryType, 2)  # values MemoryType refuses to name: reserved types
RESERVED_7 = cast(MemoryType, 7)

ENCODER_ERRORS = [
    # (constructor, expected error class)
    pytest.param(
        lambda: EptEntry(level=1, address=0, read=False, write=True),
        MisconfiguredEptEntry,
        id="ept-write-without-read",
    ),
    pytest.param(
        lambda: EptEntry(level=1, address=0, memory_type=RESERVED_2),
        MisconfiguredEptEntry,
        id="ept-memtype-2",
    ),
    pytest.param(
        lambda: EptEntry(level=2, address=0, page_size=True, memory_type=RESERVED_7),
        MisconfiguredEptEntry,
        id="ept-memtype-7-2m",
    ),
    pytest.param(
        lambda: EptEntry(level=4, address=0, page_size=True), EncodingError, id="ept-ps-in-pml4e"
    ),
    pytest.param(
        lambda: EptEntry(level=1, address=0, page_size=True), EncodingError, id="ept-ps-in-pte"
    ),
    pytest.param(lambda: EptEntry(level=6, address=0), EncodingError, id="ept-level-6"),
    pytest.param(
        lambda: EptEntry(level=2, address=0, dirty=True), EncodingError, id="ept-dirty-in-non-leaf"
    ),
    pytest.param(
        lambda: EptEntry(level=3, address=0, memory_type=MemoryType.UC),
        EncodingError,
        id="ept-memtype-in-non-leaf",
    ),
    pytest.param(
        lambda: EptEntry(level=2, address=0x1000, page_size=True),
        EncodingError,
        id="ept-2m-misaligned",
    ),
    pytest.param(lambda: EptEntry(level=1, address=0x123), EncodingError, id="ept-4k-misaligned"),
    pytest.param(
        lambda: EptEntry(level=1, address=1 << 52), EncodingError, id="ept-address-too-wide"
    ),
    pytest.param(
        lambda: EptEntry(level=1, address=1 << 40).encode(40),
        EncodingError,
        id="ept-address-above-maxphyaddr",
    ),
    pytest.param(lambda: EptEntry.decode(0b010, 1), MisconfiguredEptEntry, id="decode-w"),
    pytest.param(lambda: EptEntry.decode(0b110, 1), MisconfiguredEptEntry, id="decode-wx"),
    pytest.param(
        lambda: EptEntry.decode(0b111 | 3 << 3, 1), MisconfiguredEptEntry, id="decode-memtype-3"
    ),
    pytest.param(
        lambda: EptEntry.decode(0b111 | E_PS, 4), MisconfiguredEptEntry, id="decode-ps-in-pml4e"
    ),
    pytest.param(
        lambda: EptEntry.decode(0b111 | 1 << 4, 2),
        MisconfiguredEptEntry,
        id="decode-bit4-non-leaf-pde",
    ),
    pytest.param(
        lambda: EptEntry.decode(0b111 | E_PS | 1 << 13, 2),
        MisconfiguredEptEntry,
        id="decode-2m-bit13",
    ),
    pytest.param(
        lambda: EptEntry.decode(0b111 | 1 << 46, 1, 46),
        MisconfiguredEptEntry,
        id="decode-above-maxphyaddr",
    ),
    pytest.param(
        lambda: GuestEntry(level=1, address=0, pkey=16), EncodingError, id="guest-pkey-16"
    ),
    pytest.param(
        lambda: GuestEntry(level=2, address=0, pkey=1), EncodingError, id="guest-pkey-non-leaf"
    ),
    pytest.param(
        lambda: GuestEntry(level=3, address=0, dirty=True), EncodingError, id="guest-dirty-non-leaf"
    ),
    pytest.param(
        lambda: GuestEntry(level=1, address=0, page_size=True), EncodingError, id="guest-ps-in-pte"
    ),
    pytest.param(
        lambda: GuestEntry(level=4, address=0, page_size=True),
        EncodingError,
        id="guest-ps-in-pml4e",
    ),
    pytest.param(
        lambda: GuestEntry(level=3, address=1 << 21, page_size=True),
        EncodingError,
        id="guest-1g-misaligned",
    ),
    pytest.param(
        lambda: GuestEntry(level=1, address=1 << 46).encode(46),
        EncodingError,
        id="guest-address-above-maxphyaddr",
    ),
    pytest.param(lambda: GuestEntry.decode(0x2, 1), EncodingError, id="guest-decode-not-present"),
    pytest.param(lambda: Eptp(root=0, levels=3), EncodingError, id="eptp-3-levels"),
    pytest.param(
        lambda: Eptp(root=0, memory_type=MemoryType.WC), EncodingError, id="eptp-memtype-wc"
    ),
    pytest.param(lambda: Eptp(root=0x800), EncodingError, id="eptp-misaligned"),
    pytest.param(lambda: Eptp.decode(6 | 3 << 3 | 1 << 8), EncodingError, id="eptp-reserved-bit-8"),
    pytest.param(lambda: Eptp.decode(6 | 1 << 3), EncodingError, id="eptp-walk-length-2"),
    pytest.param(lambda: Eptp.decode(1 | 3 << 3), EncodingError, id="eptp-decode-wc"),
    pytest.param(
        lambda: Eptp.decode(6 | 3 << 3 | 1 << 46, 46), EncodingError, id="eptp-above-maxphyaddr"
    ),
]


@pytest.mark.parametrize(("make_it", "error"), ENCODER_ERRORS)
def test_invalid_combinations_raise_named_errors(
    make_it: Callable[[], object], error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        make_it()
    assert isinstance(info.value, EptlabError) and isinstance(info.value, ValueError)


def test_ept_decode_of_not_present_is_not_a_misconfiguration() -> None:
    with pytest.raises(EncodingError) as info:
        EptEntry.decode(0x38 | 1 << 51, 1)
    assert not isinstance(info.value, MisconfiguredEptEntry)


@pytest.mark.parametrize(
    ("value", "level", "nxe", "reserved_bit"),
    [
        (0x3 | 1 << 7, 4, True, 7),  # PS in a PML4E
        (0x3 | 1 << 7, 5, True, 7),  # PS in a PML5E
        (0x3 | 1 << 7 | 1 << 13, 2, True, 13),  # 2 MiB page, bit 13
        (0x3 | 1 << 7 | 1 << 29, 3, True, 29),  # 1 GiB page, bit 29
        (0x3 | 1 << 63, 1, False, 63),  # XD without NXE
        (0x3 | 1 << 46, 1, True, 46),  # above MAXPHYADDR = 46
    ],
)
def test_guest_decode_reserved_bits(value: int, level: int, nxe: bool, reserved_bit: int) -> None:
    with pytest.raises(ReservedBitsError) as info:
        GuestEntry.decode(value, level, 46, nxe=nxe)
    assert info.value.value == value
    assert info.value.reserved_mask >> reserved_bit & 1
    assert isinstance(info.value, EncodingError)
