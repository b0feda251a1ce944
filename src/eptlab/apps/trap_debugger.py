"""The rotating-trap debugger: catch wild-pointer writes into heap memory nobody owns by
trapping a random, rotating sample of the guest's heap pages in the EPT.

KFENCE and GWP-ASan find memory bugs in production because they watch only a *sample* of the
memory and rely on time and volume to find bugs: cheap enough to leave on. This is the same idea
from the hypervisor: every ``period`` accesses (a VMX-preemption-timer exit) a new uniform random
sample of ``fraction`` of the heap pages loses its EPT write permission (mode ``write``, ``r-x``)
or every permission (modes ``all`` and ``raf``, ``---``: the entry is then not present and reads
trap too; EPT cannot trap reads alone, SDM Vol. 3C §29.3.3.1 makes write-without-read a
misconfiguration); the previous sample gets ``rwx`` back. After revoking, the debugger runs
INVEPT: a processor may keep using a cached translation that still allows the write (SDM
Vol. 3C §29.4.3), and a write through it would not exit (``invept=False`` shows it). Restoring
a right needs no INVEPT here (a cached translation with fewer rights makes the processor walk
again; on hardware it may cause a spurious EPT violation, which the handler would answer the
same way).

**A trapped access** exits with an EPT violation. A write is checked (below); a read is checked
in mode ``raf`` only (read-after-free: a load of memory the guest does not own is reported,
except the allocator's own load of a free chunk's link word, word 0, when it pops its free
list); mode ``all`` lets reads through unchecked. The access is then let through, in one of
two ways (``resume``):

``emulate``
    decode the store and perform it in software (the value from the decode, at the HPA the
    debugger knows), resume after it; the page stays protected. One exit, ``emulate_cycles``.
``mtf``
    give the page its rights back, resume with the monitor trap flag set: the guest runs that one
    access and exits again (MTF, reason 37); revoke the rights and INVEPT. Two exits, two EPT
    edits and an INVEPT, whose refill walks the engine counts.

The debugger reports; it does not stop the write (KFENCE reports too: hiding the corruption would
hide the symptom), so memory ends the same in every configuration.

**The check.** The guest allocator reports ownership changes through a ring in guest memory and
flushes it with a hypercall every ``batch`` events (:mod:`eptlab.apps.heap_guest`). A write
hitting memory the guest does not own is a bug, and three views are kept side by side:

``unfiltered``
    the ownership map as of the last flush: any trapped write outside the owned objects alarms.
    It raises false alarms on objects allocated (or freed and reallocated) since the last flush,
    whose owners write them at once, and on the allocator's own link stores into free memory;
    and it misses writes into chunks freed since the last flush.
``sync-only``
    first read the ring's pending events (guest memory: no exit) and apply them, then check.
    The stale-map alarms are gone; the allocator's link stores still alarm.
filtered (the reports)
    sync, then the filter's rules: the allow-list for allocator metadata (the link word, word 0,
    of a chunk the map knows is free, holding the address of another free chunk of the same
    size, or 0 when ``allow_null``: the end of a list, is the allocator's), and with
    ``ignore_silent`` a store that leaves the word as it was (a silent store changes nothing:
    what a canary or diff check such as KFENCE's redzone check at free sees). What is left is a
    report. A bug whose value passes a rule is lost: NULL or a freed-object pointer stored in a
    free chunk's link word, or any silent store (counted by
    :func:`eptlab.apps.trap_score.filter_outcomes`).

An alarm carries its context: the guest RIP of the access (from the VMCS at the exit, filled
from the stream's instruction pointers) and the vCPU that made it.

Costs (cycles, on top of the engine's, from the active cost profile): each exit
``vmexit_cycles``; each emulated access ``emulate_cycles``; each check
``debugger_check_cycles``; each ring event applied ``ring_entry_cycles``; EPT edits
``ept_edit_cycles``; INVEPT ``invept_cycles``, and with several vCPUs one shootdown IPI per
other vCPU (``vmexit_cycles`` + ``invept_cycles`` each). The unfiltered and sync-only views are
counterfactuals kept for the comparison: their bookkeeping is not charged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..arch.bits import PAGE_SIZE
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..costs import active_profile
from ..errors import ConfigError, EptlabError
from ..guest import DIRECT_MAP_BASE
from ..hv import VCPU, VM, Exit
from ..hv.exits import ExitAction
from ..memory.physical import PhysicalMemory
from .heap_guest import (
    EVENT_ALLOC,
    EVENT_FREE,
    EVENT_SLAB,
    FLUSH_HYPERCALL,
    RING_SLOTS,
    U64,
    decode_event,
)

MODES = ("write", "all", "raf")
RESUMES = ("emulate", "mtf")
_REVOKED = {"write": "r-x", "all": "---", "raf": "---"}
SMALL_INTEGER = 1 << 16  # values below it (and above 0) classify as small integers


class Ownership:
    """What the guest owns, as the debugger learns it from the allocator's events."""

    def __init__(self) -> None:
        self.slab_class: dict[int, int] = {}  # slab page -> object size
        self.live_small: set[int] = set()  # live small objects (start)
        self.large: dict[int, int] = {}  # page of a live large object -> its start
        self.free_chunks: dict[int, int] = {}  # chunks known free (start -> size)
        self.applied = 0  # ring events applied so far

    def apply(self, word: int) -> None:
        op, gpa, size = decode_event(word)
        if op == EVENT_SLAB:
            self.slab_class[gpa] = size
            for obj in range(gpa, gpa + PAGE_SIZE, size):
                self.free_chunks[obj] = size
        elif op == EVENT_ALLOC:
            self.free_chunks.pop(gpa, None)
            if size < PAGE_SIZE:
                self.live_small.add(gpa)
            else:
                for page in range(gpa, gpa + size, PAGE_SIZE):
                    self.large[page] = gpa
        elif op == EVENT_FREE:
            self.free_chunks[gpa] = size
            if size < PAGE_SIZE:
                self.live_small.discard(gpa)
            else:
                for page in range(gpa, gpa + size, PAGE_SIZE):
                    self.large.pop(page, None)
        else:
            raise EptlabError(f"unknown ownership event {word:#x}")

    def catch_up(self, memory: PhysicalMemory, ring_hpa: int) -> int:
        """Apply the ring's events not yet applied (read from the guest's ring page, at its
        host-physical address); returns how many."""
        head = memory.read_u64(ring_hpa)
        if head - self.applied > RING_SLOTS:
            raise EptlabError(f"ownership ring overrun: {head - self.applied} pending events")
        for i in range(self.applied, head):
            self.apply(memory.read_u64(ring_hpa + 8 * (1 + i % RING_SLOTS)))
        count = head - self.applied
        self.applied = head
        return count

    def owns(self, gpa: int) -> bool:
        page = gpa & ~(PAGE_SIZE - 1)
        if page in self.large:
            return True
        size = self.slab_class.get(page)
        return size is not None and page + (gpa - page) // size * size in self.live_small

    def free_link(self, gpa: int, value: int | None, *, allow_null: bool = True) -> bool:
        """The allow-list: the allocator storing a free-list link into a free chunk (its word
        0 gets a pointer to another free chunk of the same size, or 0 if ``allow_null``)."""
        size = self.free_chunks.get(gpa)
        if size is None or value is None:
            return False
        if value == 0:
            return allow_null
        return self.free_chunks.get((value - DIRECT_MAP_BASE) & U64) == size

    def classify(self, value: int | None, before: int) -> str:
        """The value class of a store (:data:`VALUE_CLASSES`) as this map sees it."""
        if value is None:
            return "garbage"  # no modelled value
        if value == before:
            return "same"
        if value == 0:
            return "null"
        if value < SMALL_INTEGER:
            return "small"
        target = (value - DIRECT_MAP_BASE) & U64
        if self.owns(target):
            return "live"
        return "freed" if target in self.free_chunks else "garbage"


@dataclass(frozen=True)
class Alarm:
    """A trapped access the debugger judged, with its context."""

    position: int  # stream position of the access
    gpa: int
    value: int | None  # the stored value (None: a read, or a store the model gives no value)
    ip: int = 0  # the guest RIP of the access
    vcpu: int = 0  # the index of the vCPU that made it
    before: int = 0  # what the word held before the store
    link: bool = False  # a free chunk's link word getting a free-chunk pointer
    null_link: bool = False  # a free chunk's link word getting 0
    value_class: str = "garbage"  # as the synced map classifies it

    @property
    def silent(self) -> bool:
        return self.value is not None and self.value == self.before

    def dismissed(self, *, allow_null: bool, ignore_silent: bool) -> bool:
        """Whether a filter with these rules lets this write through (no report)."""
        return self.link or (allow_null and self.null_link) or (ignore_silent and self.silent)


@dataclass
class DebuggerCounters:
    trapped_writes: int = 0
    trapped_reads: int = 0  # mode all
    emulated: int = 0
    stepped: int = 0
    checks: int = 0
    ring_entries: int = 0  # applied to the map the debugger uses
    metadata_writes: int = 0  # link stores let through by the allow-list
    silent_writes: int = 0  # silent stores let through (ignore_silent)
    link_reads: int = 0  # mode raf: loads of a free chunk's link word let through
    flushes: int = 0
    rotations: int = 0
    ept_edits: int = 0
    invept: int = 0
    ipis: int = 0  # shootdown IPIs: each other vCPU runs INVEPT too
    splits: int = 0

    def cycles(self) -> int:
        """Cycles of the debugger's own work (VM exits are costed by the caller)."""
        p = active_profile()
        return (
            self.emulated * p.cycles("emulate_cycles")
            + self.checks * p.cycles("debugger_check_cycles")
            + self.ring_entries * p.cycles("ring_entry_cycles")
            + self.ept_edits * p.cycles("ept_edit_cycles")
            + self.invept * p.cycles("invept_cycles")
            + self.ipis * (p.cycles("vmexit_cycles") + p.cycles("invept_cycles"))
        )


class TrapDebugger:
    """The policy, attached to one VM's heap (see the module docstring)."""

    def __init__(
        self,
        vm: VM,
        pages: Iterable[int],
        ring: int,
        *,
        fraction: float,
        mode: str = "write",
        resume: str = "emulate",
        invept: bool = True,
        allow_null: bool = True,
        ignore_silent: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError("fraction", f"{fraction} is not in [0, 1]")
        if mode not in MODES:
            raise ConfigError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
        if resume not in RESUMES:
            raise ConfigError("resume", f"{resume!r} is not one of {', '.join(RESUMES)}")
        self.vm, self.hv, self.ring = vm, vm.hv, ring
        self.pages = sorted(set(pages))
        if not self.pages:
            raise ConfigError("pages", "no heap page to watch")
        self.fraction, self.mode, self.resume_mode = fraction, mode, resume
        self.invept = invept
        self.allow_null, self.ignore_silent = allow_null, ignore_silent
        self.sampled = 0 if fraction == 0 else max(1, round(fraction * len(self.pages)))
        self.rng = np.random.default_rng([seed, 11])
        self.revoked = _REVOKED[mode]
        self.counters = DebuggerCounters()
        self.synced = Ownership()  # what the debugger checks against
        self.flushed = Ownership()  # the unfiltered counterfactual: updated at flushes only
        self.reports: list[Alarm] = []
        self.sync_only: list[Alarm] = []  # every write the filter judged (its rules decide)
        self.unfiltered: list[Alarm] = []
        self.read_reports: list[Alarm] = []  # mode raf
        self.trapped: frozenset[int] = frozenset()
        self.samples: list[tuple[int, frozenset[int]]] = []  # (clock, pages) at each change
        self.hpa: dict[int, int] = {}  # heap page -> its host-physical address
        self.slot: dict[int, int] = {}  # heap page -> host address of its EPT leaf entry
        self.ring_hpa = 0
        self.stepping: int | None = None
        # the run loop's side of the conversation (eptlab.hv.guest_runner.Policy)
        self.clock = 0
        self.operand: int | None = None
        self.attached = False

    @property
    def timer_armed(self) -> bool:
        """Rotation runs on the VMX-preemption timer when only a sample is trapped."""
        return self.attached and 0 < self.sampled < len(self.pages)

    # -- setting up ---------------------------------------------------------------------------

    def attach(self, registration: Iterable[int] = ()) -> None:
        """Learn the heap as the guest registers it (its ownership events so far), split the
        heap's EPT mappings to 4 KiB pages, register the handlers, trap the first sample and
        INVEPT (the split alone needs it: a cached 2 MiB translation would bypass every trap)."""
        if self.attached:
            raise ConfigError("TrapDebugger", "already attached")
        self.attached = True
        for word in registration:
            self.synced.apply(word)
            self.flushed.apply(word)
        ept = self.vm.ept
        for page in self.pages:
            leaf = ept.lookup(page)
            if leaf is None:
                raise ConfigError("pages", f"heap page {page:#x} is not backed")
            leaf, splits = ept.split_to_4k(page)
            self.counters.splits += splits
            self.hpa[page] = leaf.target
            self.slot[page] = ept.leaf_slot(page)
        self.ring_hpa = self.vm.host_address(self.ring)  # the debugger maps the ring once
        self.hv.on(ExitReason.EPT_VIOLATION, self._on_ept_violation)
        self.hv.on(ExitReason.MONITOR_TRAP_FLAG, self._on_mtf)
        self.hv.on(ExitReason.PREEMPTION_TIMER, self._on_timer)
        self.hv.hypercall(FLUSH_HYPERCALL, "trap-debugger-flush")(self._on_flush)
        self.trap(self._draw(), invept=False)
        self._invept()

    def _draw(self) -> set[int]:
        if self.sampled >= len(self.pages):
            return set(self.pages)
        chosen = self.rng.choice(len(self.pages), self.sampled, replace=False)
        return {self.pages[int(i)] for i in chosen}

    def trap(self, pages: Iterable[int], *, invept: bool | None = None) -> None:
        """Make ``pages`` the trapped sample: the pages leaving it get ``rwx`` back, the pages
        entering it lose their rights, then INVEPT (unless ``invept`` is False, or the
        debugger was built with ``invept=False``)."""
        new = frozenset(pages)
        if not new <= set(self.hpa):
            raise ConfigError("pages", "can only trap heap pages")
        edit = self.vm.ept.set_entry_permissions
        for page in sorted(self.trapped - new):
            self.counters.ept_edits += edit(self.slot[page], "rwx")
        revoked = 0
        for page in sorted(new - self.trapped):
            revoked += edit(self.slot[page], self.revoked)
        self.counters.ept_edits += revoked
        self.trapped = new
        self.samples.append((self.clock, new))
        if revoked and (self.invept if invept is None else invept):
            self._invept()

    def _invept(self) -> None:
        """INVEPT here; with several vCPUs a shootdown (each other vCPU takes an IPI, exits
        and runs INVEPT: priced as an exit plus an INVEPT each)."""
        self.counters.ipis += self.vm.shootdown(self.vm.vcpus[0])
        self.counters.invept += 1

    # -- exits --------------------------------------------------------------------------------

    def _on_timer(self, exit_: Exit) -> ExitAction | None:
        if exit_.vcpu.vm is not self.vm:
            return None
        self.counters.rotations += 1
        self.trap(self._draw())
        return ExitAction.RETRY

    def _on_flush(self, vcpu: VCPU, args: tuple[int, ...]) -> int:
        self.counters.flushes += 1
        self.counters.ring_entries += self.synced.catch_up(self.hv.host.memory, self.ring_hpa)
        self.flushed.catch_up(self.hv.host.memory, self.ring_hpa)
        return 0

    def _on_ept_violation(self, exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if exit_.vcpu.vm is not self.vm or not isinstance(record, EptViolation):
            return None
        page = record.gpa & ~(PAGE_SIZE - 1)
        if page not in self.trapped:
            return None
        write = bool(record.qualification & EptQual.WRITE)
        offset = record.gpa & (PAGE_SIZE - 1) & ~7
        context = {"ip": exit_.vcpu.rip, "vcpu": exit_.vcpu.index}
        if write:
            self.counters.trapped_writes += 1
            before = self.hv.host.memory.read_u64(self.hpa[page] + offset)
            self.check(record.gpa & ~7, self.operand, before=before, **context)
        else:
            self.counters.trapped_reads += 1
            if self.mode == "raf":
                self.check_read(record.gpa & ~7, **context)
        if self.resume_mode == "emulate":
            if write and self.operand is not None:
                self.hv.host.memory.write_u64(self.hpa[page] + offset, self.operand)
            self.counters.emulated += 1
            return ExitAction.SKIP
        self.counters.ept_edits += self.vm.ept.set_entry_permissions(self.slot[page], "rwx")
        self.counters.stepped += 1
        self.stepping = page
        return ExitAction.STEP

    def _on_mtf(self, exit_: Exit) -> ExitAction | None:
        if exit_.vcpu.vm is not self.vm or self.stepping is None:
            return None
        page, self.stepping = self.stepping, None
        self.counters.ept_edits += self.vm.ept.set_entry_permissions(self.slot[page], self.revoked)
        if self.invept:
            self._invept()
        return ExitAction.RETRY

    def check(
        self, gpa: int, value: int | None, *, before: int = 0, ip: int = 0, vcpu: int = 0
    ) -> bool:
        """Judge a trapped write (``before``: the word's content) in the three views; True
        when it is reported."""
        alarm = Alarm(self.clock, gpa, value, ip, vcpu, before)
        if not self.flushed.owns(gpa):
            self.unfiltered.append(alarm)
        self.counters.checks += 1
        self.counters.ring_entries += self.synced.catch_up(self.hv.host.memory, self.ring_hpa)
        own = self.synced
        if own.owns(gpa):
            return False
        alarm = Alarm(
            self.clock, gpa, value, ip, vcpu, before,
            link=value != 0 and own.free_link(gpa, value),
            null_link=value == 0 and own.free_link(gpa, value),
            value_class=own.classify(value, before),
        )
        self.sync_only.append(alarm)
        if alarm.dismissed(allow_null=self.allow_null, ignore_silent=False):
            self.counters.metadata_writes += 1
            return False
        if alarm.dismissed(allow_null=self.allow_null, ignore_silent=self.ignore_silent):
            self.counters.silent_writes += 1
            return False
        self.reports.append(alarm)
        return True

    def check_read(self, gpa: int, *, ip: int = 0, vcpu: int = 0) -> bool:
        """Mode raf: judge a trapped load; True when it is reported (a load of memory the
        guest does not own, other than a free chunk's link word)."""
        self.counters.checks += 1
        self.counters.ring_entries += self.synced.catch_up(self.hv.host.memory, self.ring_hpa)
        if self.synced.owns(gpa):
            return False
        if gpa in self.synced.free_chunks:
            self.counters.link_reads += 1
            return False
        self.read_reports.append(Alarm(self.clock, gpa, None, ip, vcpu))
        return True
