"""Transactions (Intel TSX RTM) in a guest while the hypervisor works on its memory: the guest's
lock elision with retry and fallback, and the scenarios that make transactions abort.

The guest (:class:`TsxRunner`)
    Each vCPU runs *critical sections* (:class:`Section`: a body of reads, writes and atomic
    adds) with lock elision, as glibc's elided mutexes do::

        for attempt in range(1 + max_retries):
            if XBEGIN() == STARTED:
                if lock != 0: XABORT(0xFF)        # the lock word joins the read set
                body; XEND(); return              # committed
            if abort was "lock busy": wait until the lock is free
        acquire(lock); body; release(lock)        # the fallback path: faults normally

    The attempt is the stream ``XBEGIN, TEST_ABORT(lock, 0xFF), body..., XEND`` run on the RTM
    machine (:mod:`eptlab.mmu.rtm_machine`); on an abort the machine parks the lane at its
    abort path and :class:`RetryPolicy` decides, from EAX and the attempt count, to retry, to
    wait for the lock, or to fall back. The fallback stream ``WRITE lock=1, body, WRITE lock=0``
    runs non-transactionally: guest #PFs reach the guest kernel there, and its write of the lock
    word aborts every transaction that read it (the lock subscription that makes the fallback
    exclusive). Only one vCPU takes the fallback at a time; the others wait.

The hypervisor side
    Every VM exit the machine reports -- including the ones that aborted a transaction -- goes
    to :meth:`Hypervisor.handle`: lazy backing, copy-on-write breaks
    (:class:`~eptlab.apps.cow.CopyOnWrite`), dirty logging
    (:mod:`eptlab.hv.dirty_log`), PML drains. A handler that runs INVEPT on the VM's vCPUs (a
    shootdown) interrupts the *other* vCPUs with an IPI, which aborts their transactions too
    (cause ``ipi``). A timer is a VMX-preemption-timer exit after a seeded random number of the
    vCPU's accesses (uniform in [T/2, 3T/2] for ``timer_period`` T: a tick counts time, and
    accesses do not all take the same time, so it does not lock onto the sections' rhythm); it
    aborts the transaction it interrupts. Dirty-logging rounds (``round_every`` sections) run
    the hypervisor's collection between sections.

Plain locking
    With ``elide=False`` every section takes the lock at once (the fallback stream): the
    baseline elision is measured against. Exits then never abort anything.

Mitigations
    ``pretouch``: before each section, touch every page of its footprint non-transactionally
    (the lock word, then a read for pages it only reads, an atomic ``add 0`` for pages it
    writes), so the exits (backing, copy-on-write, dirty logging -- of the data pages and of
    the guest page-table pages whose accessed/dirty flags the walks set) and guest faults
    happen outside the transaction.
    ``prefetch``: announce the whole region once with the prefetch hypercall
    (:mod:`eptlab.apps.prefetch`), which backs it in batches; it helps only where memory is
    lazily backed (it does not break copy-on-write or dirty-logging protection).

:func:`eptlab.apps.tsx_scenarios.play` builds one scenario (a VM with a guest kernel, a
populated region, the hypervisor policy of the scenario) and runs it; :mod:`eptlab.apps.tsx_costs`
prices a run in cycles.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np

from ..apps.prefetch import PREFETCH_HYPERCALL
from ..arch.bits import PAGE_SHIFT
from ..arch.exits import EptViolation, ExitReason, VmExit
from ..errors import ConfigError, EptlabError
from ..hv import VCPU, Exit, ExitAction, GuestAction, Hypervisor, PreemptionTimer, Vmcall
from ..mmu.rtm import (
    XABORT_CAPACITY,
    XABORT_EXPLICIT,
    XABORT_RETRY,
    AbortCause,
    Op,
    RtmConfig,
    TxStream,
    xabort_code,
)
from ..mmu.rtm_machine import (
    Abort,
    AbortEvent,
    CommitEvent,
    DeadlineEvent,
    DoneEvent,
    Event,
    ExitEvent,
    FaultEvent,
    RtmMachine,
)

LOCK_BUSY = 0xFF  # the XABORT code of "the elided lock is held"

Decision = Literal["retry", "wait", "fallback"]


# -- the guest's policy -----------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """What the abort path does. ``max_retries`` transactional retries after the first attempt,
    then the fallback. A capacity abort (EAX bit 3) falls back at once unless
    ``retry_capacity``: the retry would track the same footprint again. ``honor_retry_bit``:
    give up at once whenever EAX bit 1 (RETRY) is clear, as glibc's elision does -- every
    exit-caused abort (EAX = 0) then falls back immediately. A "lock busy" XABORT waits for the
    lock to be free, then retries."""

    max_retries: int = 4
    honor_retry_bit: bool = False
    retry_capacity: bool = False

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError("max_retries", "must be >= 0")

    def decide(self, status: int, attempts: int) -> Decision:
        """``attempts``: transactional attempts of this section so far (the aborted one too)."""
        if status & XABORT_EXPLICIT and xabort_code(status) == LOCK_BUSY:
            return "wait" if attempts <= self.max_retries else "fallback"
        if attempts > self.max_retries:
            return "fallback"
        if status & XABORT_CAPACITY and not self.retry_capacity:
            return "fallback"
        if self.honor_retry_bit and not status & XABORT_RETRY:
            return "fallback"
        return "retry"


@dataclass(frozen=True)
class Section:
    """A critical section: its body, memory entries only (READ, WRITE, ADD)."""

    body: TxStream

    def __post_init__(self) -> None:
        if len(self.body) and int(self.body.op.max()) > Op.ADD:
            raise ConfigError("Section.body", "a body holds memory accesses only (no markers)")

    @cached_property
    def pretouch(self) -> TxStream:
        """One non-transactional touch per page of the footprint: ``add 0`` (a write that
        changes nothing) where the body writes, a read elsewhere."""
        body = self.body
        pages = body.gva >> PAGE_SHIFT
        writes = (body.op == Op.WRITE) | (body.op == Op.ADD)
        order = np.lexsort((~writes, pages))  # per page, a write first if there is one
        first = order[np.r_[True, pages[order][1:] != pages[order][:-1]]] if len(order) else order
        first = np.sort(first)
        ops = np.where(writes[first], Op.ADD, Op.READ).astype(np.int8)
        return TxStream.accesses(body.gva[first] & ~7, ops, 0)

    def attempt(self, lock: int) -> TxStream:
        return TxStream.concat(
            [
                TxStream.of([(Op.XBEGIN,), (Op.TEST_ABORT, lock, LOCK_BUSY)]),
                self.body,
                TxStream.marker(Op.XEND),
            ]
        )

    def fallback(self, lock: int) -> TxStream:
        return TxStream.concat(
            [TxStream.of([(Op.WRITE, lock, 1)]), self.body, TxStream.of([(Op.WRITE, lock, 0)])]
        )


ATTEMPT_PREFIX = 2  # XBEGIN, TEST_ABORT: body index = attempt index - 2
FALLBACK_PREFIX = 1  # the lock write


@dataclass(frozen=True)
class Completion:
    """A section that took effect: ``how`` is ``commit`` or ``fallback``; ``reads`` maps body
    indices to the values read (when recorded). ``sequence`` orders completions globally."""

    sequence: int
    lane: int
    section: int
    how: str
    reads: dict[int, int]


@dataclass
class TsxStats:
    sections: int = 0
    attempts: int = 0  # transactional attempts (XBEGINs of outermost transactions)
    commits: int = 0
    fallbacks: int = 0
    aborts: int = 0
    aborts_by_cause: Counter[str] = field(default_factory=Counter)
    retries_before_commit: int = 0  # summed over committed sections
    exits: Counter[ExitReason] = field(default_factory=Counter)  # every VM exit, by reason
    ept_violations: int = 0
    ept_violations_in_tx: int = 0
    guest_faults: int = 0  # delivered (non-transactional) guest faults
    unresolved_faults: int = 0
    lock_waits: int = 0
    pretouch_accesses: int = 0
    wasted_accesses: int = 0  # accesses of aborted attempts
    accesses: int = 0  # all accesses the lanes performed
    cycles: int = 0  # engine cycles (translation + data) of all accesses performed
    wasted_cycles: int = 0  # of which by aborted attempts
    fallback_cycles: int = 0  # of which on the fallback path (under the lock)
    rounds: int = 0
    completions: list[Completion] = field(default_factory=list)

    @property
    def abort_rate(self) -> float:
        return self.aborts / self.attempts if self.attempts else 0.0

    @property
    def retries_to_commit(self) -> float:
        """Mean aborted attempts before the commit, over sections that committed."""
        return self.retries_before_commit / self.commits if self.commits else 0.0

    def causes(self) -> str:
        """``cause=count`` pairs, most frequent first, ``;``-separated (empty: no abort)."""
        return ";".join(f"{c}={n}" for c, n in self.aborts_by_cause.most_common())


@dataclass
class _Job:
    vcpu: VCPU
    sections: Iterator[tuple[int, Section]]
    section: Section | None = None
    section_id: int = -1
    phase: str = "idle"  # pretouch, tx, wait, fallback, done
    want: str = "tx"  # what a waiting lane does when the lock is free: tx or fallback
    attempts: int = 0


class TsxRunner:
    """Runs critical sections with lock elision on several vCPUs (see the module docstring)."""

    def __init__(
        self,
        hv: Hypervisor,
        vcpus: Sequence[VCPU],
        *,
        lock: int,
        policy: RetryPolicy | None = None,
        config: RtmConfig | None = None,
        seed: int = 0,
        quantum: tuple[int, int] = (8, 64),
        mitigation: Literal["none", "pretouch"] = "none",
        timer_period: int | None = None,
        round_every: int | None = None,
        on_round: Callable[[], object] | None = None,
        record: bool = False,
        user: bool = True,
        elide: bool = True,
    ) -> None:
        if mitigation not in ("none", "pretouch"):
            raise ConfigError("mitigation", f"{mitigation!r} is not none or pretouch")
        if timer_period is not None and timer_period < 1:
            raise ConfigError("timer_period", "must be a positive number of accesses")
        if round_every is not None and round_every < 1:
            raise ConfigError("round_every", "must be a positive number of sections")
        self.hv, self.vcpus, self.lock = hv, list(vcpus), lock
        self.policy = policy or RetryPolicy()
        self.mitigation, self.timer_period = mitigation, timer_period
        self.round_every, self.on_round, self.record = round_every, on_round, record
        self.elide = elide  # False: plain locking, every section under the lock
        self._fallback_start: dict[int, int] = {}  # lane -> its engine cycles at the lock
        self.machine = RtmMachine(
            hv.engine, config, seed=seed, quantum=quantum, record_reads=record
        )
        for vcpu in self.vcpus:
            self.machine.add_lane(vcpu.engine_id, user=user)
        self.stats = TsxStats()
        self.rng = np.random.default_rng([seed, 0x7153])
        self.holder: int | None = None
        self.jobs: list[_Job] = []

    # -- running --------------------------------------------------------------------------------

    def run(self, programs: Sequence[Sequence[Section]]) -> TsxStats:
        """Run ``programs[i]`` on vCPU ``i`` to the end; returns the statistics."""
        if len(programs) != len(self.vcpus):
            raise ConfigError("programs", f"one per vCPU ({len(self.vcpus)}), got {len(programs)}")
        if any(job.phase not in ("idle", "done") for job in self.jobs):
            raise EptlabError("the runner is already running")
        self.jobs = [_Job(v, iter(enumerate(p))) for v, p in zip(self.vcpus, programs, strict=True)]
        for i in range(len(self.jobs)):
            self._arm_timer(i)
            self._next_section(i)
        while (event := self.machine.run()) is not None:
            self._on(event)
        stuck = [i for i, job in enumerate(self.jobs) if job.phase != "done"]
        if stuck:
            raise EptlabError(f"lanes {stuck} never finished (waiting for a lock nobody holds?)")
        self.stats.wasted_accesses = sum(lane.wasted for lane in self.machine.lanes)
        self.stats.accesses = sum(lane.executed for lane in self.machine.lanes)
        self.stats.cycles = sum(lane.cycles for lane in self.machine.lanes)
        self.stats.wasted_cycles = sum(lane.wasted_cycles for lane in self.machine.lanes)
        return self.stats

    def _next_section(self, i: int) -> None:
        job = self.jobs[i]
        nxt = next(job.sections, None)
        if nxt is None:
            job.phase, job.section = "done", None
            self.machine.set_deadline(i, None)
            self.machine.park(i)
            return
        job.section_id, job.section = nxt
        job.attempts = 0
        if self.mitigation == "pretouch":  # the lock word is part of the footprint too
            stream = TxStream.of([(Op.READ, self.lock)]) + job.section.pretouch
            self.stats.pretouch_accesses += len(stream)
            job.phase = "pretouch"
            self.machine.load(i, stream)
        else:
            self._attempt(i)

    def _attempt(self, i: int) -> None:
        job = self.jobs[i]
        assert job.section is not None
        if not self.elide:
            self._fallback(i)
            return
        if self.holder is not None and self.holder != i:
            job.phase, job.want = "wait", "tx"
            self.stats.lock_waits += 1
            self.machine.park(i)
            return
        job.attempts += 1
        self.stats.attempts += 1
        job.phase = "tx"
        self.machine.load(i, job.section.attempt(self.lock))

    def _fallback(self, i: int) -> None:
        job = self.jobs[i]
        assert job.section is not None
        if self.holder is not None and self.holder != i:
            job.phase, job.want = "wait", "fallback"
            self.stats.lock_waits += 1
            self.machine.park(i)
            return
        self.holder = i
        self.stats.fallbacks += 1
        self._fallback_start[i] = self.machine.lanes[i].cycles
        job.phase = "fallback"
        self.machine.load(i, job.section.fallback(self.lock))

    def _wake(self) -> None:
        for i, job in enumerate(self.jobs):
            if job.phase == "wait" and self.holder is None:
                (self._fallback if job.want == "fallback" else self._attempt)(i)

    def _completed(
        self, i: int, how: str, sequence: int, reads: tuple[tuple[int, int], ...]
    ) -> None:
        job = self.jobs[i]
        self.stats.sections += 1
        if self.record:
            prefix = ATTEMPT_PREFIX if how == "commit" else FALLBACK_PREFIX
            assert job.section is not None
            body = len(job.section.body)
            values = {k - prefix: v for k, v in reads if 0 <= k - prefix < body}
            self.stats.completions.append(Completion(sequence, i, job.section_id, how, values))
        self._next_section(i)
        if self.round_every and self.stats.sections % self.round_every == 0:
            self._round()

    def _round(self) -> None:
        """A dirty-logging round of the hypervisor (on another CPU): its INVEPT interrupts
        every vCPU of the VM."""
        if self.on_round is None:
            return
        before = self._invepts()
        self.on_round()
        self.machine.forget_translations()
        self.stats.rounds += 1
        self._interrupt_after(before, initiator=None)

    # -- events ---------------------------------------------------------------------------------

    def _on(self, event: Event) -> None:
        if isinstance(event, CommitEvent):
            job = self.jobs[event.lane]
            self.stats.commits += 1
            self.stats.retries_before_commit += job.attempts - 1
            self._completed(event.lane, "commit", event.sequence, event.reads)
        elif isinstance(event, DoneEvent):
            job = self.jobs[event.lane]
            if job.phase == "pretouch":
                self._attempt(event.lane)
            elif job.phase == "fallback":
                self.holder = None
                spent = self.machine.lanes[event.lane].cycles - self._fallback_start[event.lane]
                self.stats.fallback_cycles += spent
                self._completed(event.lane, "fallback", event.sequence, event.reads)
                self._wake()
            else:  # pragma: no cover - attempts end with XEND, whose commit loads the next job
                raise EptlabError(f"lane {event.lane} finished a stream in phase {job.phase}")
        elif isinstance(event, AbortEvent):
            self._aborted(event.abort)
        elif isinstance(event, ExitEvent):
            self._exit(event.lane, event.exit, in_tx=event.abort is not None)
            if event.abort is not None:
                self._aborted(event.abort)
        elif isinstance(event, FaultEvent):
            vcpu = self.jobs[event.lane].vcpu
            self.stats.guest_faults += 1
            if vcpu.guest_os is None or not vcpu.guest_os.handle_fault(vcpu, event.fault):
                self.stats.unresolved_faults += 1
                self.machine.skip(event.lane)
            self.machine.forget_translations()
        elif isinstance(event, DeadlineEvent):
            self._timer(event.lane)

    def _invepts(self) -> dict[int, int]:
        return {id(vm): vm.counters["invept"] for vm in self.hv.vms}

    def _interrupt_after(self, before: dict[int, int], initiator: int | None) -> None:
        """IPIs of the shootdowns a handler did: every other vCPU of that VM exits, and a
        transaction it was running aborts."""
        for j, job in enumerate(self.jobs):
            vm = job.vcpu.vm
            if j == initiator or vm.counters["invept"] == before.get(id(vm), 0):
                continue
            self.stats.exits[ExitReason.EXTERNAL_INTERRUPT] += 1
            abort = self.machine.interrupt(j, AbortCause.IPI)
            if abort is not None:
                self._aborted(abort)

    def _exit(self, i: int, record: VmExit, *, in_tx: bool) -> None:
        self.stats.exits[record.reason] += 1
        if isinstance(record, EptViolation):
            self.stats.ept_violations += 1
            self.stats.ept_violations_in_tx += int(in_tx)
        before = self._invepts()
        self.hv.handle(Exit(self.jobs[i].vcpu, record), expect=ExitAction.RETRY)
        self._interrupt_after(before, initiator=i)

    def _arm_timer(self, i: int) -> None:
        if self.timer_period is None:
            return
        t = self.timer_period
        interval = int(self.rng.integers(max(1, t // 2), t + t // 2 + 1))
        self.machine.set_deadline(i, self.machine.lanes[i].executed + interval)

    def _timer(self, i: int) -> None:
        self.stats.exits[ExitReason.PREEMPTION_TIMER] += 1
        self.hv.handle(Exit(self.jobs[i].vcpu, PreemptionTimer()), expect=ExitAction.RETRY)
        self._arm_timer(i)
        abort = self.machine.interrupt(i, AbortCause.TIMER)
        if abort is not None:
            self._aborted(abort)

    def _aborted(self, abort: Abort) -> None:
        i = abort.lane
        job = self.jobs[i]
        self.stats.aborts += 1
        self.stats.aborts_by_cause[str(abort.cause)] += 1
        decision = self.policy.decide(abort.status, job.attempts)
        if decision == "fallback":
            self._fallback(i)
        elif decision == "wait" and self.holder is not None:
            job.phase, job.want = "wait", "tx"
            self.stats.lock_waits += 1
        else:
            self._attempt(i)


def install_timer_tick(hv: Hypervisor) -> None:
    """The hypervisor's handler of the preemption-timer exit: a tick, nothing to do here."""
    hv.on(ExitReason.PREEMPTION_TIMER, lambda _exit: ExitAction.RETRY, first=True)


def prefetch_region(hv: Hypervisor, vcpu: VCPU, gpa: int, length: int) -> int:
    """Issue the prefetch hypercall (a :class:`~eptlab.apps.prefetch.PrefetchApp` must be
    installed) and run its steps to the end, as the vCPU would before its next instruction.
    Returns the hypercall's result."""
    vcpu.program = iter(())
    hv.handle(Exit(vcpu, Vmcall(PREFETCH_HYPERCALL, (gpa, length, 0))), expect=ExitAction.SKIP)
    result = hv.hypercall_results[-1][2]
    for segment in vcpu.program:
        if isinstance(segment, GuestAction):
            segment.action(vcpu)
    return result


__all__ = [
    "LOCK_BUSY",
    "Completion",
    "RetryPolicy",
    "Section",
    "TsxRunner",
    "TsxStats",
    "install_timer_tick",
    "prefetch_region",
]
