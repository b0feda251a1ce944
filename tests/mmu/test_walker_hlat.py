"""VT-rp in the reference walker, one fixed case per rule, against the Intel SDM.

Vol. 3A §4.5.1 (ordinary paging and HLAT paging: with "enable HLAT" = 1 and an HLAT prefix size
of 1, a linear address with bit 63 set is translated from HLATP, one with bit 63 clear from CR3;
with a prefix size of 0 every address goes through HLAT), §4.5.5 (an HLAT entry with bit 11 set
restarts the translation with ordinary paging, which alone gives the access rights), §4.7 (#PF
error-code bit 7: the fault occurred during HLAT paging); Vol. 3C §29.3.3.2 (EPT leaf bit 58,
paging-write access: with the "EPT paging-write control" the processor's paging writes to that
page need no EPT write permission, guest stores still do; bit 57, verify guest paging: with
"guest-paging verification" an access whose translation used paging entries outside
paging-write pages is an EPT violation, qualification bit 15), §29.3.3.1 (paging-write access
without read access is a misconfiguration). The constants are restated here on purpose.
"""

from __future__ import annotations

import pytest

from eptlab.arch import Access, Mode, PageSize
from eptlab.arch.exits import EptMisconfig, EptViolation, GuestFault
from eptlab.errors import ConfigError
from eptlab.memory.layout import layout_scope
from eptlab.mmu import Dim, Translation
from eptlab.mmu.context import Vmcs
from eptlab.mmu.engine import Engine
from eptlab.mmu.scenario import NestedSpace
from eptlab.tables import GuestPageTables

R, W, X = Access.READ, Access.WRITE, Access.FETCH
SUP = Mode.SUPERVISOR

EPT_VGP, EPT_PWA = 1 << 57, 1 << 58  # SDM Vol. 3C Figure 29-1
QUAL_WRITE, QUAL_GLA_TRANSLATION, QUAL_GPV = 1 << 1, 1 << 8, 1 << 15  # Table 28-7
PF_HLAT = 1 << 7  # Vol. 3A §4.7
PTE_P, PTE_RW, PTE_RESTART = 1 << 0, 1 << 1, 1 << 11

KERNEL = 0xFFFF_FFFF_8020_0000  # bit 63 set: HLAT paging with prefix size 1
USER = 0x0000_0000_4020_0000  # bit 63 clear: ordinary paging
ALIAS = 0xFFFF_C900_0000_0000  # another kernel-half address, mapped only by the guest


class Setup:
    """A guest whose tables map KERNEL (and USER, ALIAS) to one code page, an attacker page,
    and HLAT tables mapping KERNEL to the code page."""

    def __init__(self, *, ept_ad: bool = True, prefix: int = 1) -> None:
        with layout_scope("contiguous"):
            self.space = NestedSpace.create(ept_ad=ept_ad)
        s = self.space
        self.code = s.map(KERNEL, writable=False)
        self.attacker = s.map(0xFFFF_FFFF_9000_0000)  # another guest page it controls
        s.tables.map(USER, self.code, writable=False)
        s.tables.map(ALIAS, self.code, writable=True, xd=True)
        self.hlat_pages: list[int] = []

        def alloc() -> int:
            gpa = s.guest_frames.alloc()
            s.map_ept(gpa, PageSize.SIZE_4K)
            self.hlat_pages.append(gpa)
            return gpa

        self.hlat = GuestPageTables(s.tables.store, alloc, levels=4)
        self.hlat.map(KERNEL, self.code, writable=False)
        assert s.vmcs is not None
        self.vmcs: Vmcs = s.vmcs
        self.vmcs.hlat, self.vmcs.hlatp, self.vmcs.hlat_prefix_size = True, self.hlat.root, prefix

    def walker_translate(self, gva: int, access: Access = R) -> Translation:
        return self.space.walker().translate(gva, access, SUP)

    def ept_leaf(self, gpa: int) -> tuple[int, int]:
        assert self.space.ept is not None
        leaf = self.space.ept.lookup(gpa)
        assert leaf is not None
        return leaf.entry_address, leaf.value

    def set_ept_bits(self, gpa: int, *, clear: int = 0, set_: int = 0) -> None:
        address, value = self.ept_leaf(gpa)
        self.space.memory.write_u64(address, (value & ~clear) | set_)

    def restart_elsewhere(self) -> None:
        """Every other HLAT entry: present with bit 11 (restart with ordinary paging)."""
        store = self.space.tables.store
        for page in self.hlat_pages:
            for slot in range(page, page + 4096, 8):
                if store.read_u64(slot) == 0:
                    store.write_u64(slot, PTE_P | PTE_RESTART)

    def remap_guest(self) -> None:
        """The attack: the guest's own PTE for KERNEL now maps the attacker's page."""
        self.space.tables.map(KERNEL, self.attacker, writable=False, replace=True)


def test_hlat_translates_the_upper_half_from_hlatp_and_ignores_the_guest_tables() -> None:
    s = Setup()
    before = s.walker_translate(KERNEL)
    assert before.gpa == s.code
    assert {r.dim for r in before.references} == {Dim.HLAT, Dim.EPT}  # no guest entry read
    s.remap_guest()
    after = s.walker_translate(KERNEL)
    assert after.gpa == s.code  # the guest's remapping changed nothing
    s.vmcs.hlat = False
    assert s.walker_translate(KERNEL).gpa == s.attacker  # without HLAT it would have


def test_prefix_size_one_leaves_the_lower_half_to_cr3_and_zero_takes_every_address() -> None:
    s = Setup(prefix=1)
    low = s.walker_translate(USER)
    assert low.gpa == s.code and {r.dim for r in low.references} == {Dim.GUEST, Dim.EPT}
    s.vmcs.hlat_prefix_size = 0
    # the HLAT tables do not map USER: not present in HLAT paging, a #PF with bit 7 set
    fault = s.walker_translate(USER).fault
    assert isinstance(fault, GuestFault) and fault.vector == 14
    assert fault.error_code & PF_HLAT and not fault.error_code & 1  # not present, HLAT


def test_an_entry_with_bit_11_restarts_with_ordinary_paging() -> None:
    s = Setup()
    top = s.hlat.entry_address(ALIAS, 4)  # ALIAS's PML4 slot in the HLAT root: not present
    s.space.tables.store.write_u64(top, PTE_P | PTE_RESTART)
    t = s.walker_translate(ALIAS, W)
    assert t.gpa == s.code  # translated by the guest's tables after the restart
    dims = [r.dim for r in t.references]
    assert dims.count(Dim.HLAT) == 1 and Dim.GUEST in dims  # one HLAT entry read, then CR3
    # the rights are the ordinary paging's alone: ALIAS is writable there, so the write passes
    assert t.ok
    # an HLAT entry without bit 11 and not present: #PF during HLAT paging
    s.space.tables.store.write_u64(top, 0)
    fault = s.walker_translate(ALIAS).fault
    assert fault is not None and fault.error_code & PF_HLAT


def test_paging_write_lets_the_walker_use_read_only_hlat_tables_but_not_guest_stores() -> None:
    s = Setup(ept_ad=True)  # EPT A/D: every access to a paging entry is a write for EPT
    for page in s.hlat_pages:
        s.set_ept_bits(page, clear=0b010)  # read-only in the EPT
    out = s.walker_translate(KERNEL).exit
    assert isinstance(out, EptViolation) and out.gpa & ~0xFFF in s.hlat_pages
    assert out.qualification & QUAL_WRITE and not out.qualification & QUAL_GLA_TRANSLATION
    for page in s.hlat_pages:
        s.set_ept_bits(page, set_=EPT_PWA)
    assert s.walker_translate(KERNEL).exit is not None  # PWA is ignored without the control
    s.vmcs.paging_write = True
    assert s.walker_translate(KERNEL).gpa == s.code  # paging writes allowed by PWA
    # a guest store to an HLAT table page (mapped writable at ALIAS for the test) still exits
    s.space.tables.map(ALIAS, s.hlat.root, writable=True, xd=True, replace=True)
    s.vmcs.hlat_prefix_size = 1
    s.vmcs.hlat = False
    store = s.walker_translate(ALIAS, W).exit
    assert isinstance(store, EptViolation) and store.qualification & QUAL_GLA_TRANSLATION


def test_guest_paging_verification_stops_an_alias_and_passes_the_hlat_path() -> None:
    s = Setup()
    s.restart_elsewhere()  # ALIAS (kernel half) restarts with the guest's tables
    s.vmcs.paging_write = s.vmcs.guest_paging_verification = True
    for page in s.hlat_pages:
        s.set_ept_bits(page, set_=EPT_PWA)
    s.set_ept_bits(s.code, set_=EPT_VGP)
    assert s.walker_translate(KERNEL, X).gpa == s.code  # every entry in a PWA page
    alias = s.walker_translate(ALIAS, W).exit  # the guest's tables: no PWA
    assert isinstance(alias, EptViolation) and alias.gpa == s.code
    assert alias.qualification & QUAL_GPV and alias.qualification & QUAL_WRITE
    read = s.walker_translate(ALIAS, R).exit  # a read through the alias fails it too
    assert isinstance(read, EptViolation) and read.qualification & QUAL_GPV
    s.vmcs.guest_paging_verification = False
    assert s.walker_translate(ALIAS, W).ok  # the bits mean nothing without the control


def test_paging_write_access_without_read_is_a_misconfiguration() -> None:
    s = Setup()
    s.vmcs.paging_write = True
    s.set_ept_bits(s.hlat_pages[0], clear=0b111, set_=EPT_PWA | 0b100)  # X + PWA, no R
    out = s.walker_translate(KERNEL).exit
    assert isinstance(out, EptMisconfig)


def test_the_fast_engine_refuses_vt_rp_controls() -> None:
    s = Setup()
    engine = Engine(s.space.memory)
    engine.add_vcpu(s.space.guest, s.vmcs)
    with pytest.raises(ConfigError, match="reference walker"):
        engine.translate(KERNEL, R)
    with pytest.raises(ConfigError):
        Vmcs(eptp=s.vmcs.eptp, hlat_prefix_size=2)
