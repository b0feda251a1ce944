"""Where Bochs 2.7 departs from the SDM: the pinned list.

Each departure is a rule Bochs follows instead of the SDM's, read in Bochs's source
(``bochs/cpu/paging.cc``, ``vmexit.cc`` at REL_2_7_FINAL) and confirmed by the oracle's random
cases. :class:`BochsWalker` is the reference walker with chosen departures switched on; a
disagreement between Bochs and eptlab is *pinned* when the walker with one of these departures
(or all of them) gives exactly Bochs's outcome. Anything else is a new disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.access import Access, Mode
from ..arch.bits import ENTRY_BYTES, PageSize
from ..arch.ept import Ept
from ..arch.exits import EptQual, EptViolation, PmlFull
from ..arch.paging import Cr0, Cr4
from ..mmu.context import PML_ENTRIES
from ..mmu.walker import ReferenceWalker, _EptResult, _GuestStep, _Stop, _Walk


@dataclass(frozen=True)
class Departure:
    key: str
    sdm: str
    sdm_says: str
    bochs_does: str
    source: str


DEPARTURES: tuple[Departure, ...] = (
    Departure(
        "pml-full-on-every-translation",
        "Vol. 3C §29.3.6 (Page-Modification Logging)",
        "the PML index is examined only when the processor needs to set an EPT accessed or "
        "dirty flag; a translation whose flags are all set already does not look at it",
        "examines the index on every EPT translation (A/D and PML on): an index outside 0..511 "
        "is a log-full exit even when no flag would change (in the harness, an index outside "
        "0..511 at VM entry exits on the stub's first fetch, before the case's access)",
        "paging.cc translate_guest_physical -> vmexit.cc vmx_page_modification_logging",
    ),
    Departure(
        "pml-logs-byte-address",
        "Vol. 3C §29.3.6",
        "the logged guest-physical address is 4 KiB aligned (bits 11:0 cleared)",
        "logs the full guest-physical address of the access, bits 11:0 included",
        "vmexit.cc vmx_page_modification_logging writes guest_paddr as it is",
    ),
    Departure(
        "guest-ad-ignores-ept-write",
        "Vol. 3C §29.3.3.2 (EPT Violations)",
        "with EPT A/D off, the processor's updates of guest A/D flags are writes for EPT: a "
        "guest paging-structure page without EPT write permission causes an EPT violation",
        "writes guest accessed/dirty flags without any EPT permission check",
        "paging.cc update_access_dirty_PAE (physical writes after a read-only EPT walk)",
    ),
    Departure(
        "ad-walk-qualification-read-bit",
        "Vol. 3C §28.2.1, Table 28-7 (exit qualification for EPT violations), note on bit 0",
        "with EPT A/D on, an EPT violation caused by an access to a guest paging-structure "
        "entry sets both bit 0 (read) and bit 1 (write) of the exit qualification",
        "sets only bit 1 (the access is a write for it)",
        "paging.cc translate_guest_physical: rw = BX_WRITE, access_mask has no read bit",
    ),
    Departure(
        "large-ept-leaf-bit-12",
        "Vol. 3C §29.3.2, Tables 29-2 and 29-4 (EPT PDPTE mapping 1 GiB, PDE mapping 2 MiB)",
        "bits 29:12 of an EPT PDPTE that maps a 1 GiB page and bits 20:12 of an EPT PDE that "
        "maps a 2 MiB page are reserved: bit 12 set is an EPT misconfiguration",
        "does not check bit 12 (it clears it with the frame mask 0x000fffffffffe000 before "
        "testing the reserved low address bits, as for guest paging where bit 12 is PAT)",
        "paging.cc translate_guest_physical (large-page branch)",
    ),
    Departure(
        "pkeys-ignore-page-mode",
        "Vol. 3A §4.6.2 (Protection Keys)",
        "PKRU governs data accesses to user-mode addresses only, by user-mode and "
        "supervisor-mode accesses alike (AD: no data access; WD: no write by user mode, "
        "or by supervisor mode with CR0.WP=1)",
        "checks PKRU.AD only for user-mode accesses and applies AD and WD whatever the page's "
        "U/S (so supervisor-mode pages too)",
        "paging.cc translate_linear_long_mode (BX_SUPPORT_PKEYS block)",
    ),
)
BY_KEY = {d.key: d for d in DEPARTURES}


class BochsWalker(ReferenceWalker):
    """The reference walker with some of Bochs's departures (:data:`DEPARTURES`) switched on."""

    departures: frozenset[str] = frozenset()

    @classmethod
    def with_departures(
        cls, *keys: str, base: type[ReferenceWalker] = ReferenceWalker
    ) -> type[BochsWalker]:
        """A walker class with departures ``keys`` on top of ``base`` (a subclass of the
        reference walker, e.g. one under test)."""
        unknown = set(keys) - set(BY_KEY)
        if unknown:
            raise ValueError(f"unknown departures {sorted(unknown)}")
        bases = (cls,) if base is ReferenceWalker else (cls, base)
        return type("BochsWalker", bases, {"departures": frozenset(keys)})

    def _translate(self, walk: _Walk) -> tuple[int, int, PageSize, PageSize]:
        vmcs = self.vmcs
        if (
            "pml-full-on-every-translation" in self.departures
            and vmcs is not None
            and vmcs.eptp.ad_enabled
            and vmcs.pml_enabled
            and vmcs.pml_index >= PML_ENTRIES
        ):
            raise _Stop(PmlFull())  # the harness's stub translates GPAs before the access
        return super()._translate(walk)

    def _set_ept_flags(
        self, walk: _Walk, gpa: int, path: list[tuple[int, int, int]], *, dirty: bool
    ) -> None:
        vmcs = self.vmcs
        assert vmcs is not None
        if (
            "pml-full-on-every-translation" in self.departures
            and vmcs.pml_enabled
            and vmcs.pml_index >= PML_ENTRIES
        ):
            raise _Stop(PmlFull())
        logged = len(walk.pml_logged)
        super()._set_ept_flags(walk, gpa, path, dirty=dirty)
        if "pml-logs-byte-address" in self.departures and len(walk.pml_logged) > logged:
            slot = vmcs.pml_address + ((vmcs.pml_index + 1) & 0xFFFF) * ENTRY_BYTES
            self.memory.write_u64(slot, gpa)
            walk.pml_logged[-1] = gpa

    def _ept_misconfiguration(self, value: int, level: int) -> str | None:
        if "large-ept-leaf-bit-12" in self.departures and level in (2, 3) and value & Ept.PS:
            value &= ~(1 << 12)
        return super()._ept_misconfiguration(value, level)

    def _set_guest_flags(self, walk: _Walk, steps: list[_GuestStep]) -> None:
        if "guest-ad-ignores-ept-write" in self.departures:
            for step in steps:
                step.ept_rights |= int(Ept.W)
        super()._set_guest_flags(walk, steps)

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
        try:
            return super()._ept_translate(
                walk,
                gpa,
                for_level=for_level,
                paging_entry=paging_entry,
                linear=linear,
                verified=verified,
            )
        except _Stop as stop:
            outcome = stop.outcome
            if (
                "ad-walk-qualification-read-bit" in self.departures
                and paging_entry
                and self.vmcs is not None
                and self.vmcs.eptp.ad_enabled
                and isinstance(outcome, EptViolation)
            ):
                qual = outcome.qualification & ~int(EptQual.READ)
                raise _Stop(EptViolation(outcome.gpa, outcome.gla, qual)) from None
            raise

    def _pkey_allows(self, walk: _Walk, user_page: bool, pkey: int) -> bool:
        if "pkeys-ignore-page-mode" not in self.departures:
            return super()._pkey_allows(walk, user_page, pkey)
        g = self.guest
        if not g.cr4 & Cr4.PKE or walk.access == Access.FETCH:
            return True
        user = walk.mode == Mode.USER
        if user and (g.pkru >> (2 * pkey)) & 1:
            return False
        write_disable = (g.pkru >> (2 * pkey + 1)) & 1
        return not (walk.access == Access.WRITE and write_disable and (user or g.cr0 & Cr0.WP))


