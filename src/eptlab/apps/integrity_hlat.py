"""Intel VT-rp for the integrity monitor (mode ``hlat``): hypervisor-managed linear-address
translation for the kernel code, paging-write and guest-paging verification.

What the hypervisor sets up (:func:`install_hlat`), after the code pages are write-protected
in the EPT as in ``trap-code``:

* HLAT paging structures (SDM Vol. 3A §4.5.1), in guest-physical pages the hypervisor takes for
  itself: they map the kernel code's linear range to the code's guest-physical blocks exactly
  as the guest did at attach time; every other entry of those tables is present with bit 11
  set, so any other address restarts with ordinary paging (SDM Vol. 3A §4.5.5). HLATP points at
  their top table, the HLAT prefix size is 1 (addresses with bit 63 set, the kernel half, go
  through HLAT first).
* Those table pages are read-only in the EPT with the paging-write access bit (58) set, and the
  "EPT paging-write control" is on (SDM Vol. 3C §29.3.3.2): the walker may set accessed flags
  in them (and, EPT A/D being on, access them at all) while a guest store to them is an EPT
  violation.
* The code pages' EPT leaves get "verify guest paging" (bit 57) and "guest-paging
  verification" is on: an access to code whose translation used any paging entry outside
  paging-write pages (the guest's own tables: the direct map, an alias) is an EPT violation
  with qualification bit 15.

A remapping attack edits the guest's tables; code fetches keep using the HLAT tables, so the
edit changes nothing (nothing is reported either: HLAT prevents, it does not detect).

The fast engine does not model VT-rp (its kernels are shared and unchanged), so a guest with
HLAT runs on :class:`ReferenceLoop`: every access is translated by the reference walker
(:class:`eptlab.mmu.walker.ReferenceWalker`), with no TLB, paging-structure cache or data
cache. Its exits and what it catches are exact; its cycles are not comparable with the
engine's, so the loop reports walk references instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..arch.access import Access, Mode
from ..arch.bits import PAGE_SIZE, PageSize
from ..arch.ept import Ept
from ..arch.paging import Pte
from ..errors import ConfigError, EptlabError
from ..hv.exits import Exit, ExitAction, PreemptionTimer, Record
from ..hv.guest_runner import MAX_EXITS_PER_ACCESS, Policy, RunReport
from ..hv.vcpu import VCPU
from ..mmu.walker import Dim, ReferenceWalker, Translation
from ..tables import GuestPageTables

if TYPE_CHECKING:
    from .integrity_guest import KernelGuest

U64 = (1 << 64) - 1
_2M = int(PageSize.SIZE_2M)
RESTART_ENTRY = int(Pte.P | Pte.RESTART)  # present, restart with ordinary paging


@dataclass(frozen=True)
class HlatSetup:
    """What :func:`install_hlat` built: the HLAT tables and the pages holding them."""

    tables: GuestPageTables
    pages: tuple[int, ...]  # guest-physical pages of the HLAT paging structures
    ept_edits: int
    splits: int


def install_hlat(guest: KernelGuest) -> HlatSetup:
    """Build HLAT tables for the kernel code, protect them with paging-write, mark the code
    with verify-guest-paging and turn the three VT-rp controls on (module docstring)."""
    vm, kernel = guest.vm, guest.kernel
    pages: list[int] = []

    def alloc_table() -> int:
        gpa = kernel.frames.alloc()
        if vm.ept.lookup(gpa) is None:
            vm.back(gpa)
        vm.zero_page(gpa)
        pages.append(gpa)
        return gpa

    tables = GuestPageTables(
        vm, alloc_table, levels=kernel.levels, maxphyaddr=vm.hv.features.maxphyaddr
    )
    code = guest.sections["code"]
    for offset, block in zip(
        range(0, code.length, _2M), guest.section_blocks["code"], strict=True
    ):
        tables.map(code.start + offset, block, PageSize.SIZE_2M, writable=False, global_=True)
    for page in pages:  # every other entry restarts with ordinary paging
        words = vm.words(page, PAGE_SIZE // 8)
        words[words == 0] = np.uint64(RESTART_ENTRY)
    ept, edits, splits = vm.ept, 0, 0
    for page in pages:
        splits += ept.split_to_4k(page)[1]
        edits += ept.protect(page, PAGE_SIZE, "r--")
        leaf = ept.lookup(page)
        assert leaf is not None
        vm.hv.host.memory.write_u64(leaf.entry_address, leaf.value | int(Ept.PWA))
        edits += 1
    for page in guest.code_pages:
        leaf = ept.lookup(page)
        assert leaf is not None and leaf.level == 1, "the code pages are split first"
        vm.hv.host.memory.write_u64(leaf.entry_address, leaf.value | int(Ept.VGP))
        edits += 1
    for vcpu in vm.vcpus:
        m = vcpu.vmcs
        m.hlat, m.hlatp, m.hlat_prefix_size = True, tables.root, 1
        m.paging_write = m.guest_paging_verification = True
    vm.invept()
    return HlatSetup(tables, tuple(pages), edits, splits)


@dataclass
class ReferenceReport(RunReport):
    """A run on the reference walker: :class:`RunReport` (engine_cycles is 0: no cycle model)
    plus the walk references of the translations that completed."""

    translations: int = 0
    references: int = 0  # entries read (guest, HLAT and EPT), completed translations
    restarted: int = 0  # translations whose HLAT walk restarted with ordinary paging
    restart_references: int = 0  # references read before those restarts


def restart_cost(t: Translation) -> int:
    """References a translation read in HLAT paging before restarting (0: no restart)."""
    kinds = [r.dim for r in t.references]
    if Dim.HLAT not in kinds or Dim.GUEST not in kinds:
        return 0
    return max(i for i, d in enumerate(kinds) if d == Dim.HLAT) + 1


class ReferenceLoop:
    """The run loop of :class:`eptlab.hv.guest_runner.GuestRunner` (same contract: retry or
    skip as the handler says, values written at the HPA used, a preemption-timer exit every
    ``period`` accesses when armed) with each access translated by the reference walker."""

    def __init__(self, vcpu: VCPU, policy: Policy) -> None:
        self.vcpu, self.policy, self.hv = vcpu, policy, vcpu.vm.hv

    def run(
        self,
        gva: npt.NDArray[np.int64],
        kind: npt.NDArray[np.int8],
        *,
        values: Mapping[int, int] | None = None,
        period: int = 50_000,
        final_timer: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> ReferenceReport:
        """Run the whole stream (signed GVAs, kinds 0 read / 1 write / 2 fetch)."""
        if period < 1:
            raise ConfigError("period", "must be at least 1")
        values = values or {}
        memory = self.hv.host.memory
        walker = ReferenceWalker(memory, self.vcpu.guest, self.vcpu.vmcs, self.hv.features)
        exits_before = Counter(self.hv.exits)
        report = ReferenceReport(len(gva), Counter(), 0, {})
        addresses = (gva.astype(np.int64).view(np.uint64)).tolist()
        kinds = kind.tolist()
        for pos in range(len(addresses)):
            self._access(walker, pos, addresses[pos], Access(kinds[pos]), values, report)
            done = pos + 1
            timer = (done < len(addresses) and done % period == 0) or (
                done == len(addresses) and final_timer
            )
            if timer and self.policy.timer_armed:
                self._deliver(PreemptionTimer(), done)
            if progress is not None and (done % period == 0 or done == len(addresses)):
                progress(done)
        exits = Counter(self.hv.exits)
        exits.subtract(exits_before)
        report.exits = +exits
        return report

    def _access(
        self,
        walker: ReferenceWalker,
        pos: int,
        address: int,
        access: Access,
        values: Mapping[int, int],
        report: ReferenceReport,
    ) -> None:
        for _ in range(MAX_EXITS_PER_ACCESS):
            t = walker.translate(address, access, Mode.SUPERVISOR)
            if t.hpa is not None:
                report.translations += 1
                report.references += t.count
                cost = restart_cost(t)
                report.restarted += bool(cost)
                report.restart_references += cost
                if pos in values:
                    self.hv.host.memory.write_u64(t.hpa & ~7, values[pos])
                    report.performed_stores[pos] = t.hpa
                return
            if t.fault is not None:
                guest_os = self.vcpu.guest_os
                if guest_os is None or not guest_os.handle_fault(self.vcpu, t.fault):
                    self.vcpu.unresolved_faults.append(t.fault)
                    return
                continue
            assert t.exit is not None
            action = self._deliver(t.exit, pos, values.get(pos))
            if action is ExitAction.STOP:
                raise EptlabError("the reference loop does not stop early")
            if action is ExitAction.SKIP:
                return
            if action is ExitAction.STEP:
                raise EptlabError("the reference loop does not single-step")
        raise EptlabError(f"access {pos} did not complete after {MAX_EXITS_PER_ACCESS} exits")

    def _deliver(
        self, record: Record, position: int, operand: int | None = None
    ) -> ExitAction:
        p = self.policy
        p.clock, p.operand = position, operand
        return self.hv.handle(Exit(self.vcpu, record))
