"""The number of memory references of a cold 2D walk, for every combination of levels and page
sizes in both dimensions (DESIGN.md: n*(m+1) + m without large pages)."""

from __future__ import annotations

from itertools import product

import pytest

from eptlab.arch import Access, PageSize
from eptlab.mmu import DATA, Dim
from eptlab.mmu.scenario import NestedSpace

GVA = 0x7F12_3456_7ABC


def expected_count(n: int, m: int, guest_page: PageSize, ept_page: PageSize) -> int:
    """Guest entries read: n levels minus the ones a large guest page skips. Each guest entry
    lives in a 4 KiB page-table page mapped by a 4 KiB EPT page (m references); the data GPA is
    translated through the EPT page size chosen (m minus the levels it skips)."""
    guest_entries = n - (guest_page.level - 1)
    return guest_entries * (m + 1) + (m - (ept_page.level - 1))


@pytest.mark.parametrize(("n", "m", "gp", "ep"), list(product((4, 5), (4, 5), PageSize, PageSize)))
def test_reference_count(n: int, m: int, gp: PageSize, ep: PageSize) -> None:
    space = NestedSpace.create(guest_levels=n, ept_levels=m)
    space.map(GVA, gp, ep)
    t = space.walker().translate(GVA, Access.READ)
    assert t.ok, (t.fault, t.exit)
    assert t.count == expected_count(n, m, gp, ep)
    assert t.guest_page == gp and t.ept_page == ep


@pytest.mark.parametrize(("n", "m", "total"), [(4, 4, 24), (5, 5, 35), (4, 5, 29), (5, 4, 29)])
def test_headline_counts(n: int, m: int, total: int) -> None:
    space = NestedSpace.create(guest_levels=n, ept_levels=m)
    space.map(GVA)
    assert space.walker().translate(GVA, Access.READ).count == total


def test_reference_order_is_grid_order() -> None:
    """For each guest level: its m EPT references, then the guest entry; then m for data."""
    space = NestedSpace.create()
    space.map(GVA)
    refs = space.walker().translate(GVA, Access.READ).references
    layout = [(r.dim, r.level, r.for_level) for r in refs]
    expected = []
    for g in (4, 3, 2, 1):
        expected += [(Dim.EPT, e, g) for e in (4, 3, 2, 1)] + [(Dim.GUEST, g, g)]
    expected += [(Dim.EPT, e, DATA) for e in (4, 3, 2, 1)]
    assert layout == expected
    # each guest entry is read at the HPA its EPT references produced
    for i in range(4):
        ept_leaf, guest = refs[5 * i + 3], refs[5 * i + 4]
        assert guest.address & ~0xFFF == ept_leaf.value & ((1 << 46) - 1) & ~0xFFF
        assert guest.gpa == ept_leaf.gpa


def test_translation_lands_on_mapped_frame() -> None:
    space = NestedSpace.create()
    gpa = space.map(GVA, PageSize.SIZE_2M, PageSize.SIZE_4K)
    t = space.walker().translate(GVA, Access.WRITE)
    assert t.gpa == gpa + (GVA & (PageSize.SIZE_2M - 1))
    assert space.ept is not None
    assert t.hpa == space.ept.host_address(t.gpa)


def test_without_ept_guest_physical_is_host_physical() -> None:
    space = NestedSpace.create(use_ept=False)
    space.map(GVA)
    t = space.walker().translate(GVA, Access.READ)
    assert t.count == 4 and all(r.dim == Dim.GUEST for r in t.references)
    assert t.hpa == t.gpa
