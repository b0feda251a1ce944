"""The pinned Bochs departures as walker variants (no Bochs needed): each switches exactly the
rule it names, on a hand-made space where the SDM's rule and Bochs's rule give different
results."""

from __future__ import annotations

import pytest

from eptlab.arch import Access, Mode, PageSize
from eptlab.arch.exits import EptMisconfig, EptQual, EptViolation, PmlFull
from eptlab.arch.paging import Cr0, Cr4
from eptlab.mmu.scenario import NestedSpace
from eptlab.mmu.walker import ReferenceWalker, Translation
from eptlab.oracle.pinned import BY_KEY, DEPARTURES, BochsWalker

GVA = 0x7F00_0000_05A8  # a byte offset: logged GPAs show whether bits 11:0 are kept


def _walk(space: NestedSpace, cls: type[ReferenceWalker], access: Access = Access.READ,
          mode: Mode = Mode.SUPERVISOR) -> Translation:
    return cls(space.memory, space.guest, space.vmcs, space.features).translate(GVA, access, mode)


def _pair(key: str) -> tuple[type[ReferenceWalker], type[ReferenceWalker]]:
    return ReferenceWalker, BochsWalker.with_departures(key)


def test_every_departure_names_an_sdm_section() -> None:
    assert len(BY_KEY) == len(DEPARTURES) >= 6
    for d in DEPARTURES:
        assert d.sdm.startswith("Vol. 3") and "§" in d.sdm and d.source
    with pytest.raises(ValueError):
        BochsWalker.with_departures("no-such-departure")


def test_guest_ad_ignores_ept_write() -> None:
    def space() -> NestedSpace:
        s = NestedSpace.create()
        s.map(GVA)
        s.protect_tables("r-x")
        return s

    sdm, bochs = _pair("guest-ad-ignores-ept-write")
    t = _walk(space(), sdm)
    assert isinstance(t.exit, EptViolation) and t.exit.qualification & EptQual.WRITE
    assert _walk(space(), bochs).ok


def test_ad_walk_qualification_read_bit() -> None:
    def space() -> NestedSpace:
        s = NestedSpace.create(ept_ad=True)
        s.map(GVA)
        s.protect_tables("r-x")
        return s

    sdm, bochs = _pair("ad-walk-qualification-read-bit")
    a, b = _walk(space(), sdm).exit, _walk(space(), bochs).exit
    assert isinstance(a, EptViolation) and isinstance(b, EptViolation)
    assert a.qualification & EptQual.READ and a.qualification & EptQual.WRITE
    assert b.qualification == a.qualification & ~int(EptQual.READ)


def _pml_space(index: int) -> NestedSpace:
    s = NestedSpace.create(ept_ad=True)
    s.map(GVA)
    assert s.vmcs is not None
    s.vmcs.pml_enabled, s.vmcs.pml_address = True, s.host_frames.alloc()
    s.vmcs.pml_index = index
    return s


def test_pml_full_on_every_translation() -> None:
    """A read whose EPT entries all have A set needs no flag: the SDM walks on, Bochs exits."""
    sdm, bochs = _pair("pml-full-on-every-translation")
    warm = _pml_space(511)
    _walk(warm, sdm)  # sets all the accessed flags and dirty flags of the table pages
    assert warm.vmcs is not None
    warm.vmcs.pml_index = 0xFFFF
    sdm_t = _walk(warm, sdm)
    assert sdm_t.ok
    assert isinstance(_walk(warm, bochs).exit, PmlFull)


def test_pml_logs_byte_address() -> None:
    sdm, bochs = _pair("pml-logs-byte-address")
    a, b = _walk(_pml_space(511), sdm, Access.WRITE), _walk(_pml_space(511), bochs, Access.WRITE)
    assert a.ok and b.ok
    assert all(g % 4096 == 0 for g in a.pml_logged)
    assert b.pml_logged[-1] == a.gpa and a.gpa is not None and a.gpa % 4096 == GVA % 4096
    assert len(a.pml_logged) == len(b.pml_logged)
    assert [g & ~0xFFF for g in b.pml_logged] == list(a.pml_logged)


def test_large_ept_leaf_bit_12() -> None:
    def space() -> NestedSpace:
        s = NestedSpace.create()
        gpa = s.map(GVA, PageSize.SIZE_4K, PageSize.SIZE_2M)
        assert s.ept is not None
        leaf = s.ept.lookup(gpa)
        assert leaf is not None
        s.memory.write_u64(leaf.entry_address, leaf.value | 1 << 12)
        return s

    sdm, bochs = _pair("large-ept-leaf-bit-12")
    t = _walk(space(), sdm)
    assert isinstance(t.exit, EptMisconfig) and t.exit.why == "reserved-bit"
    assert _walk(space(), bochs).ok


@pytest.mark.parametrize(
    ("user", "page_user", "access", "pkru", "sdm_ok", "bochs_ok"),
    [
        (False, True, Access.READ, 0b01, False, True),  # AD: supervisor read of a user page
        (False, False, Access.WRITE, 0b10, True, False),  # WD on a supervisor page, WP=1
    ],
)
def test_pkeys_ignore_page_mode(
    user: bool, page_user: bool, access: Access, pkru: int, sdm_ok: bool, bochs_ok: bool
) -> None:
    def space() -> NestedSpace:
        s = NestedSpace.create(cr4_extra=int(Cr4.PKE), cr0=int(Cr0.PE | Cr0.PG | Cr0.WP))
        s.map(GVA, user=page_user)
        s.guest.pkru = pkru
        return s

    mode = Mode.USER if user else Mode.SUPERVISOR
    sdm, bochs = _pair("pkeys-ignore-page-mode")
    assert _walk(space(), sdm, access, mode).ok is sdm_ok
    assert _walk(space(), bochs, access, mode).ok is bochs_ok


def test_no_departure_is_the_reference_walker() -> None:
    plain = BochsWalker.with_departures()
    s1, s2 = NestedSpace.create(ept_ad=True), NestedSpace.create(ept_ad=True)
    s1.map(GVA)
    s2.map(GVA)
    a, b = _walk(s1, ReferenceWalker, Access.WRITE), _walk(s2, plain, Access.WRITE)
    assert a == b
