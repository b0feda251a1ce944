"""The reference two-dimensional walker: plain, readable Python, the oracle for everything else.

It translates one guest-linear address the way the SDM describes, reading and writing real
entries in :class:`~eptlab.memory.PhysicalMemory`, and records every memory reference it makes.
With ``n`` guest levels and ``m`` EPT levels and no large pages a walk reads ``n*(m+1) + m``
entries: each guest entry's guest-physical address and the final guest-physical address are
translated through EPT (SDM Vol. 3C §29.3.2, "Guest-physical addresses ... translated by
traversing a set of EPT paging structures").

Order of references: for each guest level from the top, the EPT entries that translate the
guest entry's GPA, then the guest entry itself; last, the EPT entries for the final GPA.

Modelling choices where the SDM leaves freedom (the fast engine must make the same ones):

* Accessed/dirty flags are set per *completed* translation: an EPT translation of one GPA sets
  the EPT accessed flags of its entries (and the leaf's dirty flag for a write-like access) only
  if it ends without a violation; the guest walk sets guest A flags (and D in the leaf for a
  write) only once its permission checks pass, so a fault lower in the walk leaves the upper
  A flags clear. The guest flags are written *before* the final GPA is translated through EPT,
  so an EPT violation on the data page leaves them set. Bochs 2.7 does the same (checked by
  ``eptlab oracle bochs``: ``update_access_dirty_PAE`` runs before ``translate_guest_physical``
  of the final address). KVM's software walker (``arch/x86/kvm/mmu/paging_tmpl.h``,
  ``walk_addr_generic``) orders it the other way: it translates the final GPA first
  (``kvm_translate_gpa``) and sets the guest A/D flags only if that succeeds; the SDM leaves
  the order open.
* Guest A/D updates without EPT A/D are writes for EPT (SDM §29.3.3.2); a read-modify-write that
  causes an EPT violation reports bits 0 and 1 of the qualification (the SDM leaves bit 0 to the
  implementation).
* With EPT A/D enabled every access to a guest paging-structure entry is treated as a write
  (SDM §29.3.3.2); its EPT violations report bits 0 and 1; it sets the EPT dirty flag of the
  page holding the entry and so logs that page in PML.
* PML (SDM §29.3.6): the log-full check happens whenever an EPT translation must set an
  accessed or a dirty flag (a read of a page whose EPT entries lack A exits too); a log entry
  is written only for a dirty flag going 0 -> 1.
* EPT permissions are checked once the walk of a GPA reached its leaf (rights are the AND over
  all entries); a not-present entry stops the walk at once (a violation), an entry with an
  unsupported value stops it at once (a misconfiguration).

VT-rp (HLAT, paging-write, guest-paging verification), reference walker only:

* HLAT paging (SDM Vol. 3A §4.5.1): with "enable HLAT" = 1 a linear address is translated from
  the HLAT pointer instead of CR3 when the HLAT prefix size is 0, or when it is 1 and bit 63 of
  the address is 1. The HLAT structures have the guest-paging format and sit at guest-physical
  addresses, so each of their entries is translated through EPT like a guest entry (references
  of dimension ``hlat``). A present HLAT entry with bit 11 set restarts the translation with
  ordinary paging from CR3 (SDM Vol. 3A §4.5.5): the whole address is translated again and
  only the ordinary entries give the access rights. A fault during HLAT paging sets bit 7 of
  the #PF error code. Model choice: the entries of a restarted HLAT walk get no accessed flag.
* Paging-write (SDM Vol. 3C §29.3.3.2): with "EPT paging-write control" = 1, a paging write
  (the processor's A/D update of a guest or HLAT paging entry, and with EPT A/D every access
  to such an entry, which counts as a write) needs no EPT write permission when the EPT leaf
  mapping the entry's page has bit 58 (paging-write access, PWA) set. Guest *stores* to that
  page still need bit 1.
* Guest-paging verification (SDM Vol. 3C §29.3.3.2, exit qualification bit 15): with the
  "guest-paging verification" control = 1, an access whose final guest-physical address is
  mapped by an EPT leaf with bit 57 (verify guest paging, VGP) set is an EPT violation unless
  every paging entry of the translation that produced it sat in a page whose EPT leaf has PWA
  (effective only with the paging-write control on). It is reported with the access's own
  qualification bits plus bit 15.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ..arch.access import Access, Mode
from ..arch.bits import ENTRY_BYTES, PAGE_SHIFT, PageSize, bits, level_shift, table_index
from ..arch.ept import Ept, ept_address, ept_is_leaf, ept_is_present, ept_misconfiguration
from ..arch.exits import (
    GENERAL_PROTECTION_VECTOR,
    PAGE_FAULT_VECTOR,
    EptMisconfig,
    EptQual,
    EptViolation,
    GuestFault,
    PmlFull,
    VmExit,
)
from ..arch.paging import (
    RFLAGS_AC,
    Cr0,
    Cr4,
    Efer,
    PageFaultError,
    Pte,
    frame_mask,
    is_canonical,
    is_leaf,
    linear_address_width,
    next_table,
    paging_levels,
    reserved_mask,
)
from ..memory.physical import PhysicalMemory
from .context import PML_ENTRIES, CpuFeatures, GuestState, Vmcs


class Dim(StrEnum):
    """The dimension a page-walk reference belongs to."""

    GUEST = "guest"
    EPT = "ept"
    HLAT = "hlat"  # an entry of the hypervisor-managed (HLAT) paging structures


DATA = 0
"""``for_level`` of the EPT references that translate the final (data) guest-physical address."""


@dataclass(frozen=True, slots=True)
class Reference:
    """One read of a paging-structure entry during a walk.

    ``address`` is the host-physical address read and ``value`` the entry as read (before any
    A/D update). ``gpa`` is the guest-physical address being translated (EPT) or of the entry
    itself (guest). ``for_level`` says which guest level the reference serves: the guest level
    whose entry is being located, or :data:`DATA` for the final translation.
    """

    dim: Dim
    level: int
    address: int
    value: int
    gpa: int
    for_level: int

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view of the reference."""
        return {
            "dim": self.dim.value,
            "level": self.level,
            "address": self.address,
            "value": self.value,
            "gpa": self.gpa,
            "for_level": self.for_level,
        }


@dataclass(frozen=True, slots=True)
class FlagWrite:
    """An update of accessed/dirty flags the processor made to an entry."""

    dim: Dim
    level: int
    address: int
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class Translation:
    """Everything one walk did and found. Exactly one of ``hpa``, ``fault``, ``exit`` is set."""

    gva: int
    access: Access
    mode: Mode
    references: tuple[Reference, ...]
    flag_writes: tuple[FlagWrite, ...]
    pml_logged: tuple[int, ...]
    gpa: int | None = None
    hpa: int | None = None
    guest_page: PageSize | None = None
    ept_page: PageSize | None = None
    fault: GuestFault | None = None
    exit: VmExit | None = None

    @property
    def count(self) -> int:
        """Number of paging-structure entries read."""
        return len(self.references)

    @property
    def ok(self) -> bool:
        """Whether the translation completed (an HPA, no exit and no fault)."""
        return self.hpa is not None

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: references, GPA, HPA, exit or guest fault, flag writes, PML entries.
        """
        return {
            "gva": self.gva,
            "access": self.access.name.lower(),
            "mode": self.mode.name.lower(),
            "count": self.count,
            "references": [r.as_dict() for r in self.references],
            "gpa": self.gpa,
            "hpa": self.hpa,
            "guest_page": self.guest_page.label if self.guest_page else None,
            "ept_page": self.ept_page.label if self.ept_page else None,
            "exit": self.exit.as_dict() if self.exit else None,
            "guest_fault": self.fault.as_dict() if self.fault else None,
            "flag_writes": [
                {
                    "dim": w.dim.value,
                    "level": w.level,
                    "address": w.address,
                    "old": w.old,
                    "new": w.new,
                }
                for w in self.flag_writes
            ],
            "pml_logged": list(self.pml_logged),
        }


class _Stop(Exception):
    """Internal: ends a walk with a guest fault or a VM exit."""

    def __init__(self, outcome: GuestFault | VmExit) -> None:
        self.outcome = outcome


@dataclass(slots=True)
class _GuestStep:
    level: int
    gpa: int
    hpa: int
    value: int
    ept_rights: int  # R/W/X/XU AND over the EPT entries that translated ``gpa``
    ept_leaf: int  # the EPT leaf that mapped ``gpa`` (its PWA bit for paging writes and GPV)


@dataclass(slots=True)
class _EptResult:
    hpa: int
    rights: int
    page: PageSize
    leaf: int = 0  # the EPT leaf entry used (0 without EPT)


@dataclass(slots=True)
class _Walk:
    gva: int
    access: Access
    mode: Mode
    references: list[Reference] = field(default_factory=list)
    flag_writes: list[FlagWrite] = field(default_factory=list)
    pml_logged: list[int] = field(default_factory=list)


class ReferenceWalker:
    """Translates guest-linear addresses through guest paging and EPT, as the SDM says.

    ``vmcs=None`` runs without EPT (guest-physical = host-physical), for native paging.
    """

    def __init__(
        self,
        memory: PhysicalMemory,
        guest: GuestState,
        vmcs: Vmcs | None,
        features: CpuFeatures | None = None,
    ) -> None:
        self.memory, self.guest, self.vmcs = memory, guest, vmcs
        self.features = features or CpuFeatures()

    # -- the guest dimension (SDM Vol. 3A §4.5) -------------------------------------------------

    def translate(self, gva: int, access: Access, mode: Mode = Mode.SUPERVISOR) -> Translation:
        """Translate ``gva`` for ``access`` in ``mode`` with the full two-dimensional walk, setting
        A/D flags and logging to PML as the processor would; returns every reference and the
        outcome."""
        walk = _Walk(gva, Access(access), Mode(mode))
        try:
            gpa, hpa, guest_page, ept_page = self._translate(walk)
        except _Stop as stop:
            outcome = stop.outcome
            return Translation(
                gva,
                walk.access,
                walk.mode,
                tuple(walk.references),
                tuple(walk.flag_writes),
                tuple(walk.pml_logged),
                fault=outcome if isinstance(outcome, GuestFault) else None,
                exit=None if isinstance(outcome, GuestFault) else outcome,
            )
        return Translation(
            gva,
            walk.access,
            walk.mode,
            tuple(walk.references),
            tuple(walk.flag_writes),
            tuple(walk.pml_logged),
            gpa=gpa,
            hpa=hpa,
            guest_page=guest_page,
            ept_page=ept_page,
        )

    def _translate(self, walk: _Walk) -> tuple[int, int, PageSize, PageSize]:
        g, maxphy = self.guest, self.features.maxphyaddr
        gva = walk.gva
        if not is_canonical(gva, linear_address_width(g.cr4)):
            # SDM Vol. 1 §3.3.7.1: a non-canonical reference is a #GP(0), no walk happens
            raise _Stop(GuestFault(GENERAL_PROTECTION_VECTOR, 0, gva))
        vmcs = self.vmcs
        hlat = (
            vmcs is not None
            and vmcs.hlat
            and (vmcs.hlat_prefix_size == 0 or bool((gva >> 63) & 1))
        )  # SDM Vol. 3A §4.5.1: HLAT paging for this address
        steps = self._guest_walk(walk, vmcs.hlatp if hlat and vmcs else g.cr3, hlat=hlat)
        if steps is None:  # an HLAT entry with bit 11 set: restart with ordinary paging
            steps = self._guest_walk(walk, g.cr3, hlat=False)
            hlat = False
        assert steps is not None
        nxe = bool(g.efer & Efer.NXE)

        leaf = steps[-1]
        user_page = all(s.value & Pte.US for s in steps)
        writable = all(s.value & Pte.RW for s in steps)
        xd = nxe and any(s.value & Pte.XD for s in steps)
        pkey = (leaf.value >> 59) & 0xF
        allowed = self._paging_allows(walk, user_page, writable, xd)
        pk_allowed = self._pkey_allows(walk, user_page, pkey)
        if not (allowed and pk_allowed):
            error = PageFaultError.P | (0 if pk_allowed else PageFaultError.PK)
            raise _Stop(self._page_fault(walk, error | (PageFaultError.HLAT if hlat else 0)))

        self._set_guest_flags(walk, steps)

        guest_page = PageSize.at_level(leaf.level)
        gpa = (leaf.value & frame_mask(leaf.level, maxphy)) | (gva & (guest_page - 1))
        linear = (
            (EptQual.USER_LINEAR if user_page else 0)
            | (EptQual.WRITABLE_LINEAR if writable else 0)
            | (EptQual.XD_LINEAR if xd else 0)
        )
        # guest-paging verification looks at the EPT leaves of every entry used (SDM §29.3.3.2)
        verified = all(self._paging_write_allowed(s.ept_leaf) for s in steps)
        data = self._ept_translate(
            walk, gpa, for_level=DATA, paging_entry=False, linear=linear, verified=verified
        )
        return gpa, data.hpa, guest_page, data.page

    def _guest_walk(self, walk: _Walk, root: int, *, hlat: bool) -> list[_GuestStep] | None:
        """Read the paging entries for ``walk.gva`` from the table at ``root`` (CR3 or HLATP
        format). None: an HLAT entry asked for a restart (bit 11, SDM Vol. 3A §4.5.5)."""
        g, maxphy = self.guest, self.features.maxphyaddr
        nxe = bool(g.efer & Efer.NXE)
        gva, dim = walk.gva, Dim.HLAT if hlat else Dim.GUEST
        hlat_fault = PageFaultError.HLAT if hlat else 0
        steps: list[_GuestStep] = []
        table = next_table(root, maxphy)  # CR3 / HLATP bits M-1:12 (SDM Table 4-12)
        for level in range(paging_levels(g.cr4), 0, -1):
            entry_gpa = table + table_index(gva, level) * ENTRY_BYTES
            ept = self._ept_translate(walk, entry_gpa, for_level=level, paging_entry=True)
            value = self.memory.read_u64(ept.hpa)
            walk.references.append(Reference(dim, level, ept.hpa, value, entry_gpa, level))
            if not value & Pte.P:
                raise _Stop(self._page_fault(walk, hlat_fault))
            if value & reserved_mask(value, level, maxphy, nxe):
                error = PageFaultError.P | PageFaultError.RSVD | hlat_fault
                raise _Stop(self._page_fault(walk, error))
            if hlat and value & Pte.RESTART:
                return None
            steps.append(_GuestStep(level, entry_gpa, ept.hpa, value, ept.rights, ept.leaf))
            if is_leaf(value, level):
                break
            table = next_table(value, maxphy)
        return steps

    def _paging_write_allowed(self, ept_leaf: int) -> bool:
        """Whether the EPT leaf grants paging-write access (bit 58 with the "EPT paging-write
        control" on, SDM Vol. 3C §29.3.3.2)."""
        return self.vmcs is not None and self.vmcs.paging_write and bool(ept_leaf & Ept.PWA)

    def _page_fault(self, walk: _Walk, error: int) -> GuestFault:
        """A #PF with ``error`` plus the flags that describe the access (SDM §4.7)."""
        g = self.guest
        if walk.access == Access.WRITE:
            error |= PageFaultError.WR
        if walk.mode == Mode.USER:
            error |= PageFaultError.US
        if walk.access == Access.FETCH and (g.efer & Efer.NXE or g.cr4 & Cr4.SMEP):
            error |= PageFaultError.ID
        return GuestFault(PAGE_FAULT_VECTOR, int(error), walk.gva)

    def _paging_allows(self, walk: _Walk, user_page: bool, writable: bool, xd: bool) -> bool:
        """Access rights from the paging-structure entries (SDM Vol. 3A §4.6.1)."""
        g = self.guest
        wp = bool(g.cr0 & Cr0.WP)
        if walk.access == Access.FETCH:
            if xd:
                return False  # XD=1 in some entry with IA32_EFER.NXE=1
            if walk.mode == Mode.USER:
                return user_page
            return not (user_page and g.cr4 & Cr4.SMEP)  # SMEP: no supervisor fetch from user
        if walk.mode == Mode.USER:
            return user_page and (walk.access == Access.READ or writable)
        if user_page and g.cr4 & Cr4.SMAP and not g.rflags & RFLAGS_AC:
            return False  # SMAP: explicit supervisor data access to a user page needs EFLAGS.AC
        return walk.access == Access.READ or writable or not wp

    def _pkey_allows(self, walk: _Walk, user_page: bool, pkey: int) -> bool:
        """Protection keys (SDM Vol. 3A §4.6.2): data accesses to user-mode addresses only."""
        g = self.guest
        if not g.cr4 & Cr4.PKE or walk.access == Access.FETCH or not user_page:
            return True
        access_disable = (g.pkru >> (2 * pkey)) & 1
        write_disable = (g.pkru >> (2 * pkey + 1)) & 1
        if access_disable:
            return False
        return not (
            walk.access == Access.WRITE
            and write_disable
            and (walk.mode == Mode.USER or g.cr0 & Cr0.WP)
        )

    def _set_guest_flags(self, walk: _Walk, steps: list[_GuestStep]) -> None:
        """Set A in every entry used and D in the leaf of a write (SDM Vol. 3A §4.8).

        These are processor writes to guest paging structures: without EPT A/D they need EPT
        write permission (SDM §29.3.3.2); with EPT A/D the walk already treated every entry
        access as a write.
        """
        ept_ad = self.vmcs is not None and self.vmcs.eptp.ad_enabled
        for step in steps:
            new = step.value | Pte.A
            if step is steps[-1] and walk.access == Access.WRITE:
                new |= Pte.D
            if new == step.value:
                continue
            paging_write = self._paging_write_allowed(step.ept_leaf)
            if self.vmcs is not None and not ept_ad and not step.ept_rights & Ept.W and not (
                paging_write
            ):
                qual = EptQual.READ | EptQual.WRITE | self._rights_bits(step.ept_rights)
                raise _Stop(EptViolation(step.gpa, walk.gva, int(qual | EptQual.GLA_VALID)))
            self.memory.write_u64(step.hpa, new)
            walk.flag_writes.append(FlagWrite(Dim.GUEST, step.level, step.hpa, step.value, new))

    # -- the EPT dimension (SDM Vol. 3C §29.3) ------------------------------------------------

    def _ept_translate(
        self,
        walk: _Walk,
        gpa: int,
        *,
        for_level: int,
        paging_entry: bool,
        linear: int = 0,
        verified: bool = True,
    ) -> _EptResult:
        """Translate one guest-physical address: the access to it is either a guest
        paging-structure entry (``paging_entry``) or the data access of ``walk``; ``verified``
        says whether the walk's paging entries all sat in paging-write pages (for GPV)."""
        vmcs = self.vmcs
        if vmcs is None:
            return _EptResult(gpa, int(Ept.R | Ept.W | Ept.X | Ept.XU), PageSize.SIZE_4K, 0)
        maxphy = self.features.maxphyaddr
        ad = vmcs.eptp.ad_enabled
        if paging_entry:
            qual = EptQual.READ | (EptQual.WRITE if ad else 0)
        else:
            qual = {
                Access.READ: EptQual.READ,
                Access.WRITE: EptQual.WRITE,
                Access.FETCH: EptQual.FETCH,
            }[walk.access]
        qual |= EptQual.GLA_VALID
        if not paging_entry:
            qual |= EptQual.GLA_TRANSLATION
            if self.features.advanced_ept_exit_info:
                qual |= linear

        if gpa >> level_shift(vmcs.eptp.levels + 1):
            # SDM Vol. 3C §29.3.2: with 4-level EPT, bits 51:48 of the guest-physical address
            # must be 0, otherwise an EPT violation occurs (no entry is read; qualification
            # bits 5:3 are cleared, Table 28-7 note)
            raise _Stop(EptViolation(gpa, walk.gva, int(qual)))
        rights = int(Ept.R | Ept.W | Ept.X | Ept.XU)
        path: list[tuple[int, int, int]] = []  # (level, entry address, value)
        table = vmcs.eptp.root
        for level in range(vmcs.eptp.levels, 0, -1):
            entry = table + table_index(gpa, level) * ENTRY_BYTES
            value = self.memory.read_u64(entry)
            walk.references.append(Reference(Dim.EPT, level, entry, value, gpa, for_level))
            rights &= value
            if not ept_is_present(value, vmcs.mbec):
                raise _Stop(EptViolation(gpa, walk.gva, int(qual | self._rights_bits(rights))))
            why = self._ept_misconfiguration(value, level)
            if why is not None:
                raise _Stop(EptMisconfig(gpa, level, why))
            path.append((level, entry, value))
            if ept_is_leaf(value, level):
                break
            table = value & bits(maxphy - 1, PAGE_SHIFT)

        level, leaf_entry, leaf_value = path[-1]
        write_like = qual & EptQual.WRITE
        needed = Ept.R if qual & EptQual.READ else 0
        if write_like and not (paging_entry and self._paging_write_allowed(leaf_value)):
            needed |= Ept.W  # a paging write to a PWA page needs no W (SDM §29.3.3.2)
        if qual & EptQual.FETCH:
            # SDM §29.3.3.2: with mode-based execute control, bit 10 governs fetches from
            # user-mode linear addresses and bit 2 those from supervisor-mode addresses.
            needed |= Ept.XU if vmcs.mbec and linear & EptQual.USER_LINEAR else Ept.X
        gpv = (
            not paging_entry
            and vmcs.guest_paging_verification
            and bool(leaf_value & Ept.VGP)
            and not verified
        )  # SDM §29.3.3.2: guest-paging verification failed (qualification bit 15)
        if rights & needed != needed or gpv:
            qual |= self._rights_bits(rights)
            if gpv:
                qual |= EptQual.GUEST_PAGING_VERIFICATION
            raise _Stop(EptViolation(gpa, walk.gva, int(qual)))

        if ad:
            self._set_ept_flags(walk, gpa, path, dirty=bool(write_like))
        hpa = ept_address(leaf_value, level, maxphy) | (gpa & ((1 << level_shift(level)) - 1))
        return _EptResult(hpa, rights, PageSize.at_level(level), leaf_value)

    def _ept_misconfiguration(self, value: int, level: int) -> str | None:
        """Why a present EPT entry is a misconfiguration (SDM §29.3.3.1), or None."""
        assert self.vmcs is not None
        why = ept_misconfiguration(
            value, level, self.features.maxphyaddr, self.features.ept_execute_only, self.vmcs.mbec
        )
        pw_leaf = self.vmcs.paging_write and ept_is_leaf(value, level)
        if why is None and pw_leaf and value & Ept.PWA and not value & Ept.R:
            # SDM Vol. 3C §29.3.3.1: paging-write access without read access
            why = "paging-write access (bit 58) without read access"
        return why

    def _rights_bits(self, rights: int) -> EptQual:
        """Qualification bits 3-6: what the EPT entries walked allow (their AND)."""
        bits_ = EptQual(0)
        if rights & Ept.R:
            bits_ |= EptQual.READABLE
        if rights & Ept.W:
            bits_ |= EptQual.WRITABLE
        if rights & Ept.X:
            bits_ |= EptQual.EXECUTABLE
        if self.vmcs is not None and self.vmcs.mbec and rights & Ept.XU:
            bits_ |= EptQual.USER_EXECUTABLE
        return bits_

    def _set_ept_flags(
        self, walk: _Walk, gpa: int, path: list[tuple[int, int, int]], *, dirty: bool
    ) -> None:
        """EPT A on every entry used, D on the leaf of a write (SDM Vol. 3C §29.3.5); a 0->1
        dirty transition is logged when PML is on (SDM §29.3.6).

        With PML on, the processor examines the PML index whenever it needs to set an EPT
        accessed *or* dirty flag: an index outside 0..511 is a log-full exit, and then neither
        flag is set (SDM §29.3.6). Only a dirty flag going 0 -> 1 writes a log entry."""
        vmcs = self.vmcs
        assert vmcs is not None
        leaf_level, leaf_entry, leaf_value = path[-1]
        updates_needed = any(
            value & Ept.A == 0 or (dirty and entry == leaf_entry and value & Ept.D == 0)
            for _, entry, value in path
        )
        if vmcs.pml_enabled and updates_needed and vmcs.pml_index >= PML_ENTRIES:
            raise _Stop(PmlFull())  # log full: no accessed or dirty flag is set, nothing logged
        if dirty and not leaf_value & Ept.D and vmcs.pml_enabled:
            slot = vmcs.pml_address + vmcs.pml_index * ENTRY_BYTES
            self.memory.write_u64(slot, gpa & ~((1 << PAGE_SHIFT) - 1))
            vmcs.pml_index = (vmcs.pml_index - 1) & 0xFFFF  # a 16-bit field: 0 - 1 = 0xFFFF
            walk.pml_logged.append(gpa & ~((1 << PAGE_SHIFT) - 1))
        for level, entry, value in path:
            new = value | Ept.A
            if dirty and entry == leaf_entry:
                new |= Ept.D
            if new != value:
                self.memory.write_u64(entry, new)
                walk.flag_writes.append(FlagWrite(Dim.EPT, level, entry, value, new))
