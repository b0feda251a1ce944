"""Asynchronous page faults (KVM's async PF), the alternative to a prefetch hint that a KVM user
has today: when a guest task touches a page the host has not backed, the host backs it in a
worker while the guest runs another task; the faulting task waits, the others proceed.

The guest's tasks (:class:`GuestTasks`)
    A vCPU's guest kernel runs several tasks (threads of one process, one stream of accesses
    each). It runs the current task until its ``timeslice`` (in accesses) is used up, then the
    next runnable one (round robin), paying ``guest_task_switch_cycles`` per switch. The
    program it hands the vCPU is a Run of the current task followed by a scheduling point (a
    :class:`~eptlab.hv.GuestAction`, so the guest decides what runs next only after the Run is
    done); remap operations are placed after a given number of the vCPU's accesses.

The policy (:class:`AsyncPageFaults`), on an EPT violation of a not-present page (KVM:
``kvm_arch_setup_async_pf``, then ``kvm_arch_async_page_ready`` when the worker is done)
    1. *page not present*: the exit (charged by the meter), KVM injects an async-PF event and the
       guest's handler puts the task to sleep (``async_pf_event_cycles``) and switches to another
       task (``guest_task_switch_cycles``). The worker's backing is ready at the vCPU's clock now
       plus :meth:`~eptlab.apps.cycle_meter.Costs.back` (allocate, zero, map; plus the host's wait
       for the contents when memory is swapped out).
    2. the other tasks run (through the engine, observed like every access) until the vCPU's
       clock reaches that time; a task that faults the same way sleeps too (its own worker). If
       no task can run, the vCPU halts until the earliest ready page: those cycles are idle time,
       charged to the access that waited.
    3. *page ready*: the worker's page is mapped (under the EPT lock, by
       :meth:`~eptlab.apps.ept_editor.EptEditor.back`, charged to the host, not the vCPU); the
       vCPU is kicked (an exit) and gets the page-ready event, the guest wakes the task and
       switches back to it (exit + event + switch). The faulting access is then retried.
    Faults that are not first touches (copy-on-write, races with a prefetch) take the
    synchronous path of the EPT editors.

What it leaves out: KVM takes the async path only when the host fault would have to wait (a
page to read back from swap, a post-copy migration, userfaultfd); a zero-filled page is backed
synchronously. With ``backing_wait_cycles`` = 0 this model forces the async path anyway, which
shows what it costs where it does not pay. The page-ready event is delivered at once (KVM may
deliver it later, at the next entry) and the woken task runs at once (wake-up preemption); the
worker's host CPU time is counted (``host_cycles``) but competes with nothing; events of
several faults are not batched; the EPT entry written at page-ready is charged to the host.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..arch.bits import PAGE_SIZE
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..costs import active_profile
from ..errors import ConfigError
from ..hv import VCPU, Exit, ExitAction, GuestAction, Run
from ..hv.program import Segment
from ..mmu.engine import Accesses
from ..traces.model import TraceChunk
from .cycle_meter import CycleMeter
from .ept_editor import EptEditor
from .scenario import cut


def _cycles(key: str) -> int:
    return active_profile().cycles(key)


@dataclass(frozen=True)
class AsyncCosts:
    """Cycles of the guest side of an async page fault (profile keys in brackets)."""

    event_cycles: int = field(default_factory=lambda: _cycles("async_pf_event_cycles"))
    switch_cycles: int = field(default_factory=lambda: _cycles("guest_task_switch_cycles"))


@dataclass
class _Sleep:
    gpa: int
    ready: int  # the vCPU clock at which the worker's page is ready


class GuestTasks:
    """The tasks a vCPU's guest kernel runs and the program it gives the vCPU (module docs).
    ``events``: ``(after, segment)``, a segment to run once ``after`` accesses of the vCPU have
    been handed out."""

    def __init__(
        self,
        vcpu: VCPU,
        streams: Sequence[TraceChunk],
        *,
        meter: CycleMeter,
        timeslice: int = 10_000,
        events: Sequence[tuple[int, Segment]] = (),
        costs: AsyncCosts | None = None,
    ) -> None:
        if not streams or timeslice < 1:
            raise ConfigError("GuestTasks", "needs a task and a positive timeslice")
        self.vcpu, self.streams, self.meter, self.timeslice = vcpu, list(streams), meter, timeslice
        self.costs = costs or AsyncCosts()
        self.events = sorted(events, key=lambda e: e[0])
        self.cursor = [0] * len(self.streams)
        self.issued = 0  # accesses of the vCPU handed out so far (program and handler)
        self.current = 0
        self.used = 0  # of the current task's timeslice
        self.sleeping: dict[int, _Sleep] = {}
        self.switches = 0
        self.on_ready: list[tuple[int, int]] = []  # (task, gpa) woken, in order
        self.wake: Callable[[VCPU, int], None] | None = None  # set by the async policy

    def left(self, task: int) -> int:
        return len(self.streams[task]) - self.cursor[task]

    def take(self, task: int, n: int) -> TraceChunk:
        """The next ``n`` accesses of ``task`` (handed out: the cursor moves)."""
        start = self.cursor[task]
        self.cursor[task] += n
        self.issued += n
        return cut(self.streams[task], start, start + n)

    def peek(self, task: int, n: int) -> TraceChunk:
        start = self.cursor[task]
        return cut(self.streams[task], start, start + n)

    def advance(self, task: int, n: int) -> None:
        self.cursor[task] += n
        self.issued += n

    def switch(self, task: int) -> None:
        """The guest runs ``task`` next: a switch (charged to the vCPU's next access) if it is
        not the current one; a fresh timeslice if it is another or the current one's is used."""
        if task != self.current:
            self.switches += 1
            self.meter.charge(self.vcpu.engine_id, self.costs.switch_cycles)
            self.current, self.used = task, 0
        elif self.used >= self.timeslice:
            self.used = 0

    def runnable(self, exclude: int = -1) -> int | None:
        """The next task that can run (round robin from the current one), waking those whose
        page is ready; None if every task with work left sleeps (or has none)."""
        n = len(self.streams)
        order = [(self.current + k) % n for k in range(n)]
        if self.used >= self.timeslice:
            order = order[1:] + order[:1]
        for task in order:
            if task == exclude or not self.left(task):
                continue
            sleep = self.sleeping.get(task)
            if sleep is not None:
                if self.meter.clock(self.vcpu.engine_id) < sleep.ready:
                    continue
                self.wake_task(task)
            return task
        return None

    def wake_task(self, task: int) -> None:
        """Its page is ready: deliver page ready and make it runnable."""
        sleep = self.sleeping.pop(task)
        self.on_ready.append((task, sleep.gpa))
        if self.wake is not None:
            self.wake(self.vcpu, sleep.gpa)

    def idle_until_ready(self) -> bool:
        """Halt until the earliest sleeping task's page is ready (idle cycles charged to the
        vCPU) and wake it; False if nothing sleeps."""
        if not self.sleeping:
            return False
        task = min(self.sleeping, key=lambda t: self.sleeping[t].ready)
        vid = self.vcpu.engine_id
        idle = self.sleeping[task].ready - self.meter.clock(vid)
        if idle > 0:
            self.meter.charge(vid, idle)
            self.meter.idle[vid] += idle
        self.wake_task(task)
        return True

    def _halt(self, _vcpu: VCPU) -> None:
        self.idle_until_ready()

    def _due(self) -> Iterator[Segment]:
        while self.events and self.events[0][0] <= self.issued:
            yield self.events.pop(0)[1]

    def segments(self) -> Iterator[Segment]:
        """The vCPU's program: Runs of the current task, each followed by a scheduling point."""
        while True:
            yield from self._due()
            if not any(self.left(t) for t in range(len(self.streams))):
                break
            task = self.runnable()
            if task is None:
                yield GuestAction(self._halt, "halt")
                continue
            self.switch(task)
            n = min(self.timeslice - self.used, self.left(task))
            if self.events:
                n = max(1, min(n, self.events[0][0] - self.issued))
            self.used += n
            yield Run(self.take(task, n))
            yield GuestAction(_nothing, "schedule")
        for _, segment in self.events:  # remaps placed beyond the last access
            yield segment


def _nothing(_vcpu: VCPU) -> None:
    """A scheduling point: the guest decides what runs next once the Run before it is done."""


class AsyncPageFaults:
    """The async page-fault policy over the VM's EPT editors (register it after them: it is
    asked first). ``tasks``: the guest's tasks of each vCPU it serves, by engine id."""

    def __init__(
        self, editor: EptEditor, meter: CycleMeter, costs: AsyncCosts | None = None
    ) -> None:
        self.editor, self.meter = editor, meter
        self.costs = costs or AsyncCosts()
        self.tasks: dict[int, GuestTasks] = {}
        self.counters: Counter[str] = Counter()
        editor.hv.on(ExitReason.EPT_VIOLATION, self._on_ept_violation)

    def serve(self, tasks: GuestTasks) -> None:
        """Handle first touches of ``tasks.vcpu`` asynchronously."""
        tasks.wake = self._page_ready
        self.tasks[tasks.vcpu.engine_id] = tasks

    @property
    def _worker_cycles(self) -> int:
        return self.editor.costs.back(self.editor.vm.backing)

    def _first_touch(self, exit_: Exit) -> int | None:
        """The GPA of an EPT violation that is a first touch of an unbacked page, else None."""
        record = exit_.record
        vm = self.editor.vm
        if exit_.vcpu.vm is not vm or not isinstance(record, EptViolation):
            return None
        rights = EptQual.READABLE | EptQual.WRITABLE | EptQual.EXECUTABLE
        if record.qualification & rights or not 0 <= record.gpa < vm.memory:
            return None
        if vm.ept.lookup(record.gpa) is not None:
            return None  # mapped meanwhile: the editors' handler flushes and retries
        return record.gpa

    def _sleep(self, tasks: GuestTasks, task: int, gpa: int) -> int:
        """Page not present: the worker starts, the task sleeps; returns when it is ready."""
        vid = tasks.vcpu.engine_id
        self.meter.charge(vid, self.costs.event_cycles)
        ready = self.meter.clock(vid) + self._worker_cycles
        tasks.sleeping[task] = _Sleep(gpa & ~(PAGE_SIZE - 1), ready)
        self.counters["async_faults"] += 1
        return ready

    def _page_ready(self, vcpu: VCPU, gpa: int) -> None:
        """The worker is done: map the page (host work) and deliver page ready to the vCPU."""
        self.editor.back(gpa, None)
        self.meter.charge(vcpu.engine_id, self.editor.costs.exit_cycles + self.costs.event_cycles)
        self.counters["pages_ready"] += 1

    def _on_ept_violation(self, exit_: Exit) -> ExitAction | None:
        tasks = self.tasks.get(exit_.vcpu.engine_id)
        if tasks is None or self.editor.busy(exit_.vcpu):
            return None  # not served, or an exit of a prefetch's warming reads
        gpa = self._first_touch(exit_)
        if gpa is None:
            return None
        faulting = tasks.current
        self._sleep(tasks, faulting, gpa)
        while faulting in tasks.sleeping:
            self._run_others(tasks, faulting)
            sleep = tasks.sleeping.get(faulting)
            if sleep is not None and self.meter.clock(tasks.vcpu.engine_id) >= sleep.ready:
                tasks.wake_task(faulting)
            elif sleep is not None:
                tasks.idle_until_ready()  # halt until a page is ready: this one's or another's
        tasks.switch(faulting)
        return ExitAction.RETRY

    def _run_others(self, tasks: GuestTasks, faulting: int) -> None:
        """Run the other tasks while the faulting one sleeps (module docs, step 2)."""
        vcpu, engine = tasks.vcpu, self.editor.hv.engine
        vid = vcpu.engine_id
        while self.meter.clock(vid) < tasks.sleeping[faulting].ready:
            task = tasks.runnable(exclude=faulting)
            if task is None:
                return
            tasks.switch(task)
            budget = tasks.sleeping[faulting].ready - self.meter.clock(vid)
            n = max(1, min(tasks.left(task), budget // 200 + 1, 256))
            chunk = tasks.peek(task, n)
            accesses = Accesses.build(chunk.address, chunk.kind, 1, vid)
            result = engine.run(accesses, 0)
            tasks.advance(task, result.stopped_at)
            tasks.used += result.stopped_at
            self.counters["overlapped_accesses"] += result.stopped_at
            if result.done:
                continue
            if result.fault is not None:
                guest_os = vcpu.guest_os
                if guest_os is None or not guest_os.handle_fault(vcpu, result.fault):
                    vcpu.unresolved_faults.append(result.fault)
                    tasks.advance(task, 1)
                continue
            assert result.exit is not None
            exit_ = Exit(vcpu, result.exit)
            gpa = self._first_touch(exit_)
            if gpa is not None:
                self.editor.hv.exits[exit_.reason] += 1
                self._sleep(tasks, task, gpa)  # this one sleeps too
            else:
                self.editor.hv.handle(exit_, expect=ExitAction.RETRY)


__all__ = ["AsyncCosts", "AsyncPageFaults", "GuestTasks"]
