"""Accessed/dirty flags and page-modification logging, against the Intel SDM.

Guest flags: SDM Vol. 3A §4.8 - A in every paging-structure entry used, D only in the entry that
maps the page written. EPT flags: SDM Vol. 3C §29.3.5 - with EPTP bit 6 = 1, A in every EPT entry
used, D in the EPT leaf of a written GPA, and accesses to guest paging-structure entries count as
writes. PML: SDM Vol. 3C §29.3.6 - the 4 KiB-aligned GPA is logged at the PML index (511 down)
when an EPT dirty flag goes 0 -> 1; with the index outside 0..511 any needed A/D update is a
log-full exit (reason 62) and no flag is set.

Expected flag values are computed here from the walk's own list of references (which entries
were used, and whether each EPT translation was write-like), then compared with memory.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import product
from typing import Any

import pytest

from eptlab.arch import Access, Mode, PageSize
from eptlab.arch.ept import Eptp
from eptlab.arch.exits import EptViolation, PmlFull
from eptlab.errors import ConfigError
from eptlab.mmu import DATA, Dim, Reference, Translation, Vmcs
from eptlab.mmu.scenario import NestedSpace

PTE_A, PTE_D, PTE_RW = 1 << 5, 1 << 6, 1 << 1
EPT_A, EPT_D = 1 << 8, 1 << 9
PML_FULL = 62

R, W, X = Access.READ, Access.WRITE, Access.FETCH
SUP, USR = Mode.SUPERVISOR, Mode.USER
K4, M2, G1 = PageSize.SIZE_4K, PageSize.SIZE_2M, PageSize.SIZE_1G

GVA = 0x0000_7F12_3456_7ABC


def walk(space: NestedSpace, access: Access, mode: Mode = SUP, gva: int = GVA) -> Translation:
    return space.walker().translate(gva, access, mode)


def mem(space: NestedSpace, hpa: int) -> int:
    return space.memory.read_u64(hpa)


def ept_translations(t: Translation) -> list[tuple[int, int, list[Reference]]]:
    """The walk's EPT references grouped per EPT translation, in order: (for_level, gpa, refs)."""
    groups: list[tuple[int, int, list[Reference]]] = []
    for r in t.references:
        if r.dim != Dim.EPT:
            continue
        if not groups or groups[-1][0] != r.for_level or groups[-1][1] != r.gpa:
            groups.append((r.for_level, r.gpa, []))
        groups[-1][2].append(r)
    return groups


# -- guest and EPT flags after a successful walk ---------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "guest_page", "ept_page"),
    list(product((4, 5), (4, 5), (K4, M2, G1), (K4, M2))),
)
@pytest.mark.parametrize("access", [R, W, X])
@pytest.mark.parametrize("ept_ad", [False, True])
def test_flags_after_a_successful_walk(
    n: int, m: int, guest_page: PageSize, ept_page: PageSize, access: Access, ept_ad: bool
) -> None:
    space = NestedSpace.create(guest_levels=n, ept_levels=m, ept_ad=ept_ad)
    space.map(GVA, guest_page, ept_page)
    t = walk(space, access)
    assert t.ok, (t.fault, t.exit)

    # guest: every entry used now has A; only the leaf of a write has D; nothing else changed
    guest = [r for r in t.references if r.dim == Dim.GUEST]
    assert [r.level for r in guest] == list(range(n, guest_page.level - 1, -1))
    for r in guest:
        leaf = r is guest[-1]
        assert r.value & (PTE_A | PTE_D) == 0  # fresh tables: nothing was set before
        expected = r.value | PTE_A | (PTE_D if leaf and access == W else 0)
        assert mem(space, r.address) == expected, (r.level, leaf)

    # EPT: first value seen of each entry, and the flags each translation should set
    before: dict[int, int] = {}
    want: dict[int, int] = defaultdict(int)
    groups = ept_translations(t)
    # one EPT translation per guest entry plus one for the data
    assert [g[0] for g in groups] == [r.level for r in guest] + [DATA]
    for for_level, _gpa, refs in groups:
        write_like = (for_level == DATA and access == W) or (for_level != DATA and ept_ad)
        for r in refs:
            before.setdefault(r.address, r.value)
            want[r.address] |= EPT_A
        if write_like:
            want[refs[-1].address] |= EPT_D  # the leaf of that translation only
    for address, value in before.items():
        assert value & (EPT_A | EPT_D) == 0
        now = mem(space, address)
        if ept_ad:
            assert now == value | want[address], hex(address)
        else:
            assert now == value, "EPT A/D off: the EPT entries are never written"
    if not ept_ad:
        assert not [w for w in t.flag_writes if w.dim == Dim.EPT]
    assert not t.pml_logged  # PML is off


@pytest.mark.parametrize("ept_ad", [False, True])
@pytest.mark.parametrize("access", [R, W, X])
def test_flags_are_sticky_and_set_once(ept_ad: bool, access: Access) -> None:
    """'If it is not already set': a second identical walk writes no flag."""
    space = NestedSpace.create(ept_ad=ept_ad)
    space.map(GVA)
    first = walk(space, access)
    assert first.flag_writes, "the first walk sets flags"
    second = walk(space, access)
    assert second.ok and second.flag_writes == ()
    assert [r.address for r in second.references] == [r.address for r in first.references]


def test_read_then_write_sets_only_the_dirty_flags() -> None:
    space = NestedSpace.create(ept_ad=True)
    space.map(GVA)
    walk(space, R)
    t = walk(space, W)
    changed = {(w.dim, w.level): w.new ^ w.old for w in t.flag_writes}
    # the guest PTE gets D; the data page's EPT leaf gets D; nothing else changes
    assert changed == {(Dim.GUEST, 1): PTE_D, (Dim.EPT, 1): EPT_D}


# -- faulting walks ------------------------------------------------------------------------


def _guest_path_values(space: NestedSpace, gva: int) -> list[int]:
    values = []
    for level in range(space.tables.levels, 0, -1):
        try:
            slot = space.tables.entry_address(gva, level)
        except Exception:  # a leaf above, or no table: the path ends
            break
        values.append(space.tables.store.read_u64(slot))
    return values


FAULTS = {
    "not-present-pde": dict(edit=(2, 0, 1), access=R, mode=SUP),
    "reserved-bit-pte": dict(edit=(1, 1 << 51, 0), access=W, mode=SUP),
    "user-write-read-only": dict(edit=(1, 0, PTE_RW), access=W, mode=USR),
    "user-read-supervisor": dict(edit=None, access=R, mode=USR, user=False),
}


@pytest.mark.parametrize("case", list(FAULTS.values()), ids=list(FAULTS))
@pytest.mark.parametrize("ept_ad", [False, True])
def test_faulting_walk_sets_no_guest_flag(case: dict[str, Any], ept_ad: bool) -> None:
    space = NestedSpace.create(ept_ad=ept_ad)
    space.map(GVA, user=case.get("user", True))
    if case["edit"] is not None:
        level, set_, clear = case["edit"]
        slot = space.tables.entry_address(GVA, level)
        space.tables.store.write_u64(slot, (space.tables.store.read_u64(slot) & ~clear) | set_)
    before = _guest_path_values(space, GVA)
    t = walk(space, case["access"], case["mode"])
    assert t.fault is not None and t.fault.vector == 14
    assert _guest_path_values(space, GVA) == before
    assert all(v & PTE_A == 0 for v in before)
    assert not [w for w in t.flag_writes if w.dim == Dim.GUEST]


def test_write_denied_by_ept_sets_no_ept_dirty_flag() -> None:
    """A write that causes an EPT violation does not happen, so no EPT dirty flag is set."""
    space = NestedSpace.create(ept_ad=True)
    gpa = space.map(GVA, ept_perms="r-x") + (GVA & 0xFFF)
    t = walk(space, W)
    assert isinstance(t.exit, EptViolation)
    assert space.ept is not None
    leaf = space.ept.lookup(gpa)
    assert leaf is not None and leaf.value & EPT_D == 0


# -- page-modification logging -------------------------------------------------------------


def pml_space(**kwargs: Any) -> tuple[NestedSpace, int]:
    space = NestedSpace.create(ept_ad=True, **kwargs)
    assert space.vmcs is not None
    log = space.host_frames.alloc()
    space.vmcs.pml_enabled = True
    space.vmcs.pml_address = log
    assert space.vmcs.pml_index == 511
    return space, log


def log_entry(space: NestedSpace, log: int, index: int) -> int:
    return space.memory.read_u64(log + 8 * index)


def ept_leaf_value(space: NestedSpace, gpa: int) -> int:
    assert space.ept is not None
    leaf = space.ept.lookup(gpa)
    assert leaf is not None
    return leaf.value


def test_pml_logs_table_pages_and_written_pages_from_511_down() -> None:
    space, log = pml_space()
    assert space.vmcs is not None
    gpa = space.map(GVA) + (GVA & 0xFFF)
    tables = [space.tables.entry_address(GVA, lvl) & ~0xFFF for lvl in (4, 3, 2, 1)]

    # a read: with EPT A/D the four guest table pages are written (their EPT D goes 0 -> 1)
    t = walk(space, R)
    assert t.ok
    assert t.pml_logged == tuple(tables)
    assert [log_entry(space, log, 511 - i) for i in range(4)] == tables
    assert space.vmcs.pml_index == 507
    assert ept_leaf_value(space, gpa) & EPT_D == 0  # the data page was only read

    # a write: the data page is logged, 4 KiB aligned, at the next index down
    t = walk(space, W)
    assert t.ok and t.pml_logged == (gpa & ~0xFFF,)
    assert log_entry(space, log, 507) == gpa & ~0xFFF
    assert space.vmcs.pml_index == 506

    # only 0 -> 1 transitions log
    for access in (W, R, X, W):
        t = walk(space, access)
        assert t.ok and t.pml_logged == ()
    assert space.vmcs.pml_index == 506
    assert log_entry(space, log, 506) == 0

    # software clears D (then INVEPT on hardware): the next write logs the page again
    assert space.ept is not None
    leaf = space.ept.lookup(gpa)
    assert leaf is not None
    space.memory.write_u64(leaf.entry_address, leaf.value & ~EPT_D)
    t = walk(space, W)
    assert t.pml_logged == (gpa & ~0xFFF,) and log_entry(space, log, 506) == gpa & ~0xFFF
    assert space.vmcs.pml_index == 505


def test_pml_logs_the_4k_aligned_gpa_inside_a_large_page() -> None:
    space, log = pml_space()
    gpa = space.map(GVA, M2, M2) + (GVA & (M2 - 1))
    assert gpa & (M2 - 1) & ~0xFFF, "the test needs an offset above 4 KiB inside the page"
    walk(space, R)
    t = walk(space, W)
    assert t.pml_logged == (gpa & ~0xFFF,)
    assert log_entry(space, log, 511 - 3) == gpa & ~0xFFF  # 3 table pages logged first


def test_pml_index_counts_down_to_zero_then_log_full() -> None:
    space, log = pml_space()
    assert space.vmcs is not None
    pages = [GVA + i * 0x1000 for i in range(4)]
    gpas = [space.map(p) + (p & 0xFFF) for p in pages]
    walk(space, R, gva=pages[0])  # log the table pages first (they are shared)
    space.vmcs.pml_index = 2
    for i in range(3):
        t = walk(space, W, gva=pages[i])
        assert t.ok and t.pml_logged == (gpas[i] & ~0xFFF,)
        assert log_entry(space, log, 2 - i) == gpas[i] & ~0xFFF
    assert space.vmcs.pml_index == 0xFFFF  # 0 - 1 in a 16-bit field

    before = ept_leaf_value(space, gpas[3])
    t = walk(space, W, gva=pages[3])
    assert isinstance(t.exit, PmlFull) and t.exit.reason == PML_FULL
    assert t.hpa is None and t.fault is None and t.pml_logged == ()
    assert ept_leaf_value(space, gpas[3]) == before  # no dirty (nor accessed) flag was set
    assert before & (EPT_A | EPT_D) == 0
    assert space.vmcs.pml_index == 0xFFFF
    assert [log_entry(space, log, i) for i in range(3)] == [g & ~0xFFF for g in gpas[2::-1]]


def test_log_full_needs_a_flag_update_to_exit() -> None:
    """With the log full, an access that sets no EPT flag proceeds; one that must set an
    accessed flag exits too (SDM §29.3.6: 'needs to set an accessed or dirty flag'). The two
    pages share their EPT path only when placed contiguously: pinned."""
    space, _ = pml_space(layout="contiguous")
    assert space.vmcs is not None
    written, fresh = GVA, GVA + 0x1000
    gpa_fresh = space.map(fresh) + (fresh & 0xFFF)
    space.map(written)
    assert walk(space, W, gva=written).ok
    space.vmcs.pml_index = 0xFFFF
    for access in (W, R, X):  # every flag this page needs is already set
        t = walk(space, access, gva=written)
        assert t.ok and t.pml_logged == ()
    # a read of a page whose EPT leaf has A = 0: the processor must set A first -> log full
    t = walk(space, R, gva=fresh)
    assert isinstance(t.exit, PmlFull)
    assert ept_leaf_value(space, gpa_fresh) & (EPT_A | EPT_D) == 0
    # once software has set A, the read goes through and logs nothing
    assert space.ept is not None
    leaf = space.ept.lookup(gpa_fresh)
    assert leaf is not None
    space.memory.write_u64(leaf.entry_address, leaf.value | EPT_A)
    t = walk(space, R, gva=fresh)
    assert t.ok and t.pml_logged == ()


def test_pml_requires_ept_ad() -> None:
    with pytest.raises(ConfigError):
        Vmcs(eptp=Eptp(root=0, ad_enabled=False), pml_enabled=True)
    Vmcs(eptp=Eptp(root=0, ad_enabled=True), pml_enabled=True)
