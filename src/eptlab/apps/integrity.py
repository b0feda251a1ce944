"""Kernel integrity monitoring from the EPT: trap writes to kernel code, or log them with PML.

A guest kernel's code changes legitimately at run time (static keys, alternatives, ftrace: a
5-byte NOP at a *patch site* becomes a ``JMP rel32`` and back), and illegitimately when an
attacker hooks a function. The guest cannot be trusted to police itself (a kernel-mode attacker
writes through any writable alias of the page: here the direct map), but the hypervisor sees
every guest-physical page. :class:`IntegrityMonitor` is that policy, in six modes:

``none``
    No monitor (the baseline).
``trap-code``
    The EPT leaves of kernel *code* pages lose their write permission. Every write to them is
    an EPT violation; the handler checks the written word against the allow-list of patch sites
    (site address *and* value: each site may only hold its NOP or its JMP), then **emulates**
    an allowed write or **denies** a malicious one. Detection is immediate and the write never
    reaches memory.
``trap-all``
    The naive guard: every page of the kernel image (code, rodata, data) is write-protected,
    so every ordinary write to kernel data exits too (and is emulated).
``pml``
    Writes run free. Page-modification logging records the first write (dirty flag 0 -> 1) to
    each 4 KiB page in the 512-entry log. The monitor reviews the log on each log-full exit and
    at the end of every period of ``period`` accesses (a VMX-preemption-timer exit): each logged
    code page is compared with the monitor's golden copy; changed words are accepted if they are
    a patch site holding one of its allowed values, otherwise they are a detection. Reviewed
    code pages are **re-armed**: their EPT dirty flags are cleared and the monitor runs INVEPT.
    Without the INVEPT the processor keeps using its cached translation, which still says
    "dirty", so the next write to the page sets no flag and logs nothing (set
    ``rearm_invept=False`` to see it). PML detects after the fact and cannot prevent.
``trap-pt``
    ``trap-code``, plus the guest paging entries on the code's translation path
    write-protected: a store that would remap the code is denied and reported, the guest's
    other stores to those pages are emulated (:mod:`eptlab.apps.integrity_pt`).
``hlat``
    ``trap-code``, plus Intel HLAT for the code's linear range, paging-write and guest-paging
    verification (:mod:`eptlab.apps.integrity_hlat`); runs on the reference walker.

The attacks beyond direct hooks (page-table remapping, a writable alias, write-then-restore)
are in :mod:`eptlab.apps.integrity_attacks`; the guest and its stream in
:mod:`eptlab.apps.integrity_guest`.

Emulation (our choice): the handler completes an allowed write in software, as KVM's
instruction emulator does for write-tracked pages: it decodes the store (here the stream
carries the stored value: :attr:`IntegrityMonitor.operand`), writes the word to host memory
through the VM's EPT, and the vCPU resumes *after* the access (``ExitAction.SKIP``). A denied
write is skipped the same way without writing anything. Ordinary data writes carry no
modelled value: emulating them only skips the access. The page stays write-protected
throughout, so there is no window in which another write could slip through.

Because the hv scheduler carries no stored values, the guest runs on the shared
single-vCPU loop of :mod:`eptlab.hv.guest_runner` (:class:`StreamRunner` feeds it a
:class:`Stream`): ``engine.run`` until an exit, ``hv.handle(exit)`` (the handlers registered with
:meth:`Hypervisor.on`), then resume at the same access or after it, as the handler returned;
stores that carry a value are written at the host-physical address the hardware used. The
period-end review in pml mode is a VMX-preemption-timer exit (basic exit reason 52) that the loop
delivers every ``period`` accesses while :attr:`IntegrityMonitor.timer_armed`.

Only the watched pages are split to 4 KiB EPT pages (pml: kernel code); the rest of guest memory
stays on 2 MiB EPT pages, whose dirty flags the monitor never clears, so they log once and the
log fills mostly with code pages.

Costs (cycles, from the active cost profile (:mod:`eptlab.costs`), added to the engine's own
cycle count): a VM exit round trip ``vmexit_cycles``; decoding and emulating (or refusing) a
trapped store ``emulate_cycles``; an INVEPT ``invept_cycles`` (the walks that refill the TLBs
afterwards are counted by the engine); an EPT entry edit ``ept_edit_cycles``; reading one PML
log entry ``pml_entry_cycles``; comparing one 4 KiB page with its golden copy
``page_compare_cycles``. The
monitor also splits the watched 2 MiB EPT mappings into 4 KiB pages; the TLB reach lost that
way shows up in the engine's cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SIZE
from ..arch.ept import Ept
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..costs import active_profile
from ..errors import ConfigError
from ..hv import VCPU, VM, Exit, guest_runner
from ..hv.exits import ExitAction
from ..hv.guest_runner import RunReport
from .integrity_guest import (
    INSN5_MASK,
    JMP32,
    NOP5,
    U64,
    CodeWrite,
    KernelActivity,
    KernelGuest,
    PatchSite,
    StoreInsert,
    Stream,
    jmp,
    with_insn,
)
from .integrity_hlat import ReferenceLoop
from .integrity_pt import PageTableGuard

MODES = ("none", "trap-code", "trap-all", "pml", "trap-pt", "hlat")
"""``trap-pt``: trap-code plus the guest page tables on the code's translation path
write-protected (:mod:`eptlab.apps.integrity_pt`); ``hlat``: trap-code plus HLAT, paging-write
and guest-paging verification (:mod:`eptlab.apps.integrity_hlat`, reference walker only)."""
TRAP_MODES = ("trap-code", "trap-all", "trap-pt", "hlat")

__all__ = [
    "INSN5_MASK",
    "JMP32",
    "MODES",
    "NOP5",
    "CodeWrite",
    "Detection",
    "StreamRunner",
    "IntegrityMonitor",
    "KernelActivity",
    "KernelGuest",
    "MonitorCounters",
    "PatchSite",
    "Stream",
    "StoreInsert",
    "jmp",
    "with_insn",
]


# -- the monitor --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    gpa: int  # the word found tampered with
    value: int
    at: int  # stream position when the monitor found it
    how: str  # "trap", "pml-review", "pt-trap" (trap-pt) or "gpv" (hlat)


@dataclass
class MonitorCounters:
    trapped_writes: int = 0  # write EPT violations on protected pages
    emulated: int = 0  # of which completed in software
    denied: int = 0
    patches_allowed: int = 0
    timer_exits: int = 0  # period ends (VMX-preemption-timer exits) in pml mode
    pml_full_exits: int = 0
    reviews: int = 0
    pml_entries: int = 0
    pages_compared: int = 0
    rearmed: int = 0  # dirty flags cleared
    invept: int = 0
    ept_edits: int = 0
    splits: int = 0
    pt_stores_trapped: int = 0  # trap-pt: guest stores to protected page-table pages
    pt_stores_denied: int = 0  # of which changed an entry on the code's path
    pt_paging_writes: int = 0  # trap-pt: the processor's A/D updates there (emulated)
    gpv_violations: int = 0  # hlat: exits that failed guest-paging verification
    logged_unchanged: int = 0  # pml: logged code pages whose contents had not changed

    def cycles(self) -> int:
        """Cycles of the monitor's own work (VM exits are costed by the caller)."""
        p = active_profile()
        return (
            (self.emulated + self.denied + self.pt_paging_writes) * p.cycles("emulate_cycles")
            + self.invept * p.cycles("invept_cycles")
            + self.ept_edits * p.cycles("ept_edit_cycles")
            + self.pml_entries * p.cycles("pml_entry_cycles")
            + self.pages_compared * p.cycles("page_compare_cycles")
        )


class IntegrityMonitor:
    """The policy, attached to one VM (see the module docstring for the modes)."""

    def __init__(
        self,
        vm: VM,
        mode: str,
        *,
        code_pages: Iterable[int],
        kernel_pages: Iterable[int] = (),
        sites: dict[int, PatchSite] | None = None,
        rearm_invept: bool = True,
        page_tables: dict[int, int] | None = None,
    ) -> None:
        """``page_tables`` (trap-pt): the guest paging entries on the code's translation path,
        by GPA, with the values they must keep."""
        if mode not in MODES:
            raise ConfigError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
        self.vm, self.hv, self.mode = vm, vm.hv, mode
        self.code_pages = frozenset(code_pages)
        self.kernel_pages = frozenset(kernel_pages) | self.code_pages
        self.allowed = {gpa: frozenset(s.states) for gpa, s in (sites or {}).items()}
        self.rearm_invept = rearm_invept
        self.counters = MonitorCounters()
        self.detections: list[Detection] = []
        self.decisions: dict[int, str] = {}  # stream position -> "allowed" / "denied"
        self.golden: dict[int, npt.NDArray[np.uint64]] = {}
        # what the run loop tells the handlers about the access that exited, and is told back
        self.clock = 0  # stream position of the current access
        self.operand: int | None = None  # the value a trapped store writes (its decode)
        self.protected: frozenset[int] = frozenset()
        self.attached = False
        self.pt_guard = PageTableGuard(page_tables or {}) if mode == "trap-pt" else None
        self.unchanged: list[tuple[int, int]] = []  # pml: (page, position) logged, unchanged

    # -- setting up ---------------------------------------------------------------------------

    def attach(self) -> None:
        """Split the watched pages to 4 KiB EPT pages, then protect them (trap modes) or turn
        PML on and arm their dirty flags (pml); register the exit handlers; INVEPT."""
        if self.attached:
            raise ConfigError("IntegrityMonitor", "already attached")
        self.attached = True
        watched = {
            "none": frozenset(),
            "trap-code": self.code_pages,
            "trap-all": self.kernel_pages,
            "pml": self.code_pages,
            "trap-pt": self.code_pages,
            "hlat": self.code_pages,
        }[self.mode]
        ept = self.vm.ept
        for page in sorted(watched):
            leaf = ept.lookup(page)
            if leaf is None:
                self.vm.back(page)
                leaf = ept.lookup(page)
                assert leaf is not None
            self.counters.splits += ept.split_to_4k(page)[1]
        if self.mode in TRAP_MODES:
            for page in sorted(watched):
                self.counters.ept_edits += ept.protect(page, PAGE_SIZE, "r-x")
            self.protected = watched
            if self.pt_guard is not None:
                self.counters.splits += self.pt_guard.protect(self.vm)
                self.counters.ept_edits += len(self.pt_guard.pages)
            self.hv.on(ExitReason.EPT_VIOLATION, self._on_ept_violation)
        elif self.mode == "pml":
            if not self.vm.pml_enabled:
                self.vm.enable_pml()
            for page in sorted(watched):
                self.golden[page] = self.vm.words(page, 512).copy()
                self._clear_dirty(page)
            self.hv.on(ExitReason.PML_FULL, self._on_pml_full)
            self.hv.on(ExitReason.PREEMPTION_TIMER, self._on_timer)
        # every mode (``none`` too) starts with the VM's cached translations dropped, so that
        # the modes are measured from the same state
        self._invept()

    def _invept(self) -> None:
        self.vm.invept()
        self.counters.invept += 1

    def _clear_dirty(self, page: int) -> None:
        leaf = self.vm.ept.lookup(page)
        assert leaf is not None and leaf.level == 1
        if leaf.value & Ept.D:
            self.hv.host.memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.D))
            self.counters.ept_edits += 1

    def is_allowed(self, gpa: int, value: int | None) -> bool:
        """The allow-list: a known patch site receiving one of its two states."""
        states = self.allowed.get(gpa & ~7)
        return states is not None and value is not None and value & U64 in states

    # -- trap modes ----------------------------------------------------------------------------

    def _on_ept_violation(self, exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if exit_.vcpu.vm is not self.vm or not isinstance(record, EptViolation):
            return None
        page = record.gpa & ~(PAGE_SIZE - 1)
        q = record.qualification
        guard = self.pt_guard
        if guard is not None and page in guard.pages:
            return self._on_page_table(record, guard)
        if q & EptQual.GUEST_PAGING_VERIFICATION and not q & EptQual.WRITE:
            if page not in self.protected:
                return None
            # hlat: code read or fetched through a translation that is not the hypervisor's
            self.counters.gpv_violations += 1
            self.decisions[self.clock] = "denied"
            self.detections.append(Detection(record.gpa & ~7, 0, self.clock, "gpv"))
            return ExitAction.SKIP
        if not q & EptQual.WRITE or not q & EptQual.GLA_TRANSLATION or page not in self.protected:
            return None  # not a data write to a page we protect: someone else's exit
        self.counters.trapped_writes += 1
        self.counters.gpv_violations += bool(q & EptQual.GUEST_PAGING_VERIFICATION)
        value = self.operand
        if page not in self.code_pages or self.is_allowed(record.gpa, value):
            # a patch site receiving a legal state, or (trap-all) an ordinary data write
            if value is not None:
                self.vm.write_u64(record.gpa & ~7, value)  # emulate: the store, in software
            if page in self.code_pages:
                self.counters.patches_allowed += 1
                self.decisions[self.clock] = "allowed"
            self.counters.emulated += 1
        else:
            self.counters.denied += 1
            self.decisions[self.clock] = "denied"
            self.detections.append(Detection(record.gpa & ~7, value or 0, self.clock, "trap"))
        return ExitAction.SKIP

    def _on_page_table(
        self, record: EptViolation, guard: PageTableGuard
    ) -> ExitAction | None:
        """trap-pt: a guest store to a protected page-table page is emulated unless it changes
        an entry on the code's path (denied, reported); a processor A/D update there (bit 8 of
        the qualification clear) is emulated and the walk retried."""
        q = record.qualification
        if not q & EptQual.WRITE:
            return None
        if not q & EptQual.GLA_TRANSLATION:
            guard.paging_write(self.vm, record.gpa)
            self.counters.pt_paging_writes += 1
            return ExitAction.RETRY
        self.counters.pt_stores_trapped += 1
        value = self.operand
        if value is not None and guard.allows(record.gpa, value):
            self.vm.write_u64(record.gpa & ~7, value)
            self.counters.emulated += 1
        elif value is None:
            self.counters.emulated += 1  # a store without a modelled value: skipped
        else:
            self.counters.pt_stores_denied += 1
            self.counters.denied += 1
            self.decisions[self.clock] = "denied"
            self.detections.append(Detection(record.gpa & ~7, value, self.clock, "pt-trap"))
        return ExitAction.SKIP

    # -- pml mode ------------------------------------------------------------------------------

    def _on_pml_full(self, exit_: Exit) -> ExitAction | None:
        if exit_.vcpu.vm is not self.vm:
            return None
        self.counters.pml_full_exits += 1
        self.review(exit_.vcpu)
        return ExitAction.RETRY  # the write that found the log full is retried with an empty log

    @property
    def timer_armed(self) -> bool:
        """pml mode reviews the log at every VMX-preemption-timer exit (end of a period)."""
        return self.attached and self.mode == "pml"

    def _on_timer(self, exit_: Exit) -> ExitAction | None:
        if exit_.vcpu.vm is not self.vm:
            return None
        self.period_end(exit_.vcpu)
        return ExitAction.RETRY

    def period_end(self, vcpu: VCPU) -> None:
        """The end of a period: in pml mode a timer exit and a review of the log."""
        if self.mode != "pml":
            return
        self.counters.timer_exits += 1
        self.review(vcpu)

    def review(self, vcpu: VCPU) -> list[Detection]:
        """Drain the vCPU's PML log, compare each logged code page with its golden copy, accept
        legal patch-site states, report everything else, then re-arm the reviewed pages (clear
        their EPT dirty flags, INVEPT) so their next write is logged again."""
        logged = self.vm.drain_pml(vcpu)
        self.counters.reviews += 1
        self.counters.pml_entries += len(logged)
        found: list[Detection] = []
        pages = sorted({gpa & ~(PAGE_SIZE - 1) for gpa in logged} & self.code_pages)
        for page in pages:
            self.counters.pages_compared += 1
            current = self.vm.words(page, 512).copy()
            golden = self.golden[page]
            changed = np.flatnonzero(current != golden).tolist()
            if not changed:  # logged, yet equal to the golden copy (written back, or restored)
                self.counters.logged_unchanged += 1
                self.unchanged.append((page, self.clock))
            for word in changed:
                gpa, value = page + 8 * word, int(current[word])
                if not self.is_allowed(gpa, value):
                    found.append(Detection(gpa, value, self.clock, "pml-review"))
            self.golden[page] = current  # known now: report each change once
            self._clear_dirty(page)
            self.counters.rearmed += 1
        if pages and self.rearm_invept:
            self._invept()
        self.detections += found
        return found


# -- running the guest --------------------------------------------------------------------------


class StreamRunner:
    """Runs a :class:`Stream` (its code writes carry their values) on a kernel guest's vCPU
    through the shared loop, :class:`eptlab.hv.guest_runner.GuestRunner`."""

    def __init__(self, guest: KernelGuest, monitor: IntegrityMonitor) -> None:
        self.guest, self.monitor = guest, monitor
        # VT-rp (hlat) runs on the reference walker: the fast engine does not model it
        loop = ReferenceLoop if guest.vcpu.vmcs.vt_rp else guest_runner.GuestRunner
        self.loop = loop(guest.vcpu, monitor)

    def run(
        self,
        stream: Stream,
        *,
        period: int = 50_000,
        progress: Callable[[int], None] | None = None,
    ) -> RunReport:
        """Run the whole stream; in pml mode the log is reviewed every ``period`` accesses and
        at the end."""
        values = {w.index: w.value for w in stream.writes}
        if isinstance(self.loop, ReferenceLoop):  # stores land at once on the reference walker
            return self.loop.run(
                stream.gva, stream.kind, values=values, period=period, progress=progress
            )
        return self.loop.run(
            stream.gva,
            stream.kind,
            values=values,
            period=period,
            progress=progress,
            barriers=stream.barriers,
        )
