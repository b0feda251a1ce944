"""A single-vCPU run loop that carries out every exit action, single-stepping included.

The hv scheduler retries or skips the access that exited. Policies that trap accesses need
more: *emulate* the access in software and resume after it, or *single-step* it with the
permission restored and get control back right after it (the monitor trap flag).
:class:`GuestRunner` is that loop, shared by the applications that trap:

    engine.run(chunk) until an exit      -> action = hv.handle(exit)   (Hypervisor.on handlers)
    ExitAction.RETRY                     -> run the same access again
    ExitAction.SKIP                      -> the handler completed (or suppressed) it: go past it
    ExitAction.STEP                      -> run that one access, then a monitor-trap-flag exit
    ExitAction.STOP                      -> end the run there

Before each exit the loop tells the policy where the guest is (``policy.clock``, the stream
position) and the value the access stores when the stream carries one (``policy.operand``: the
handler's decode of the store); the handler's return value is its decision. A timer exit
takes RETRY (go on) or STOP, a monitor-trap exit RETRY, a hypercall SKIP (it is complete) or
STOP.

Guest stores can carry values (``values``: position -> 64-bit word). Chunks run with the HPA of
every access recorded, and the loop writes each performed store's value at the HPA the hardware
used, in stream order, so memory holds what the guest wrote whether the store ran in hardware,
was emulated by a handler (which writes ``operand`` itself) or was single-stepped.

Two exits the hypervisor arms for itself come from the loop, delivered through
:meth:`Hypervisor.handle` like any other: the monitor-trap-flag exit after a stepped access
(reason 37, SDM Vol. 3C §26.5.2), and, when ``policy.timer_armed``, a VMX-preemption-timer exit
(reason 52, SDM Vol. 3C §26.5.1) after every ``period`` accesses, and at the end of the stream
unless ``final_timer`` is False. Guest hypercalls sit in the stream too (``calls``: position ->
:class:`Vmcall`, executed before the access at that position).

A chunk writes its stores' values when it returns, so an access that depends on an earlier
store's value in the same chunk (a walk through a page-table entry the stream just wrote) would
not see it: ``barriers`` are positions where a chunk ends, so every store before them is in
memory when the access at the barrier runs.

Several vCPUs of one VM may share the stream (``vcpus``, and ``cpu``: per access, the index of
the vCPU that runs it); an exit is delivered on the vCPU whose access exited. The stream may
also say which instruction made each access (``ip``: the guest RIP per access); the loop writes
it into the exiting vCPU's :attr:`VCPU.rip` before delivering the exit, as the processor saves
the guest RIP in the VMCS guest-state area on every VM exit (SDM Vol. 3C §25.4.1, §28.3.3).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..arch.exits import ExitReason
from ..errors import ConfigError, EptlabError
from ..mmu.engine import Accesses
from .exits import Exit, ExitAction, MonitorTrap, PreemptionTimer, Record, Vmcall
from .vcpu import VCPU

MAX_EXITS_PER_ACCESS = 64


class Policy(Protocol):
    """What the loop tells a trapping policy before each exit (its handlers answer by their
    return value, an :class:`~eptlab.hv.exits.ExitAction`)."""

    clock: int  # stream position of the access that exited (or of the timer)
    operand: int | None  # the value the access stores, when the stream carries one

    @property
    def timer_armed(self) -> bool:
        """Whether the VMX-preemption timer runs (a timer exit every period)."""
        ...


@dataclass
class RunReport:
    """What one run of a guest program did: accesses, exits by reason, engine cycles (of every
    vCPU it ran) and the stores performed."""
    accesses: int  # accesses run (fewer than the stream's when a handler answered STOP)
    exits: Counter[ExitReason]  # this run only (exit_names() for output)
    engine_cycles: int
    performed_stores: dict[int, int]  # stream position -> HPA the hardware wrote

    @property
    def vm_exits(self) -> int:
        """VM exits of this run, every reason together."""
        return sum(self.exits.values())


class GuestRunner:
    """Runs a stream of accesses on ``vcpu`` (or on ``vcpus``, per access as ``cpu`` says;
    guest faults go to the accessing vCPU's ``guest_os``)."""

    def __init__(self, vcpu: VCPU, policy: Policy, *, vcpus: Sequence[VCPU] = ()) -> None:
        self.vcpu, self.policy = vcpu, policy
        self.vcpus = list(vcpus) or [vcpu]
        if self.vcpus[0] is not vcpu or any(v.vm is not vcpu.vm for v in self.vcpus):
            raise ConfigError("vcpus", "must start with vcpu and belong to its VM")
        self.hv = vcpu.vm.hv
        self._stores = np.zeros(0, np.int64)  # positions of the stores that carry values
        self._cpu: npt.NDArray[np.int64] | None = None  # per access: index into vcpus
        self._ip: npt.NDArray[np.int64] | None = None  # per access: the guest RIP

    def run(
        self,
        gva: npt.NDArray[np.int64],
        kind: npt.NDArray[np.int8],
        *,
        values: Mapping[int, int] | None = None,
        calls: Mapping[int, Vmcall] | None = None,
        period: int = 50_000,
        final_timer: bool = True,
        progress: Callable[[int], None] | None = None,
        barriers: Iterable[int] = (),
        cpu: npt.NDArray[np.integer] | None = None,
        ip: npt.NDArray[np.int64] | None = None,
    ) -> RunReport:
        """Run the whole stream (signed GVAs, kinds 0 read / 1 write / 2 fetch; ``cpu``: the
        index in ``vcpus`` of each access's vCPU, default the first; ``ip``: each access's
        guest RIP, default 0)."""
        if period < 1:
            raise ConfigError("period", "must be at least 1")
        n = int(gva.shape[0])
        values = values or {}
        calls = calls or {}
        if any(not 0 <= p <= n for p in calls):
            raise ConfigError("calls", f"positions must be in 0..{n}")
        for name, column in (("cpu", cpu), ("ip", ip)):
            if column is not None and column.shape != (n,):
                raise ConfigError(name, f"needs one value per access ({n})")
        if cpu is not None and n and not 0 <= int(cpu.min()) <= int(cpu.max()) < len(self.vcpus):
            raise ConfigError("cpu", f"vCPU indices must be in 0..{len(self.vcpus) - 1}")
        self._cpu = None if cpu is None else np.asarray(cpu, np.int64)
        self._ip = ip
        user = np.zeros(n, np.int8)
        ids = np.array([v.engine_id for v in self.vcpus], np.int32)
        owner = ids[self._cpu] if self._cpu is not None else np.full(n, ids[0], np.int32)
        accesses = Accesses(gva, kind, user, owner)
        self._stores = np.array(sorted(values), np.int64)
        exits_before = Counter(self.hv.exits)
        cycles_before = self._cycles()
        performed: dict[int, int] = {}
        stops = sorted(set(calls) | {b for b in barriers if 0 < b < n})
        s = 0
        pos = 0
        stopped = False
        while pos < n and not stopped:
            while s < len(stops) and stops[s] < pos:
                s += 1
            if s < len(stops) and stops[s] == pos:
                s += 1
                if pos in calls and self._deliver(calls[pos], pos) is ExitAction.STOP:
                    break
            next_call = stops[s] if s < len(stops) else n
            end = min(n, (pos // period + 1) * period, max(next_call, pos + 1))
            stop_at = self._run(accesses, pos, end, values, performed)
            if stop_at is not None:
                pos, stopped = stop_at, True
                break
            pos = end
            timer = (pos < n and pos % period == 0) or (pos == n and final_timer)
            if timer and self.policy.timer_armed:
                stopped = self._deliver(PreemptionTimer(), pos, on=pos - 1) is ExitAction.STOP
            if progress is not None and (pos % period == 0 or pos == n):
                progress(pos)
        if n in calls and pos == n and not stopped:
            self._deliver(calls[n], n)
        exits = Counter(self.hv.exits)
        exits.subtract(exits_before)
        return RunReport(pos, +exits, self._cycles() - cycles_before, performed)

    def _cycles(self) -> int:
        """The engine cycles of every vCPU the loop runs."""
        return sum(v.stats.cycles for v in self.vcpus)

    def _deliver(
        self, record: Record, position: int, operand: int | None = None, on: int | None = None
    ) -> ExitAction:
        """Hand one exit to the hypervisor, on the vCPU of the access at ``on`` (default
        ``position``) with that access's guest RIP saved in it; the handler's action, checked
        against what the exit allows (an access exit anything, the others RETRY or SKIP as
        they complete)."""
        p = self.policy
        p.clock, p.operand = position, operand
        exit_ = Exit(self._vcpu_at(position if on is None else on), record)
        action = self.hv.handle(exit_)
        allowed = _ALLOWED.get(record.reason, tuple(ExitAction))
        if action not in allowed:
            names = ", ".join(a.name for a in allowed)
            raise EptlabError(f"{exit_}: answered {action.name}; this exit takes {names}")
        return action

    def _vcpu_at(self, position: int) -> VCPU:
        """The vCPU running the access at ``position`` (clamped to the stream), its RIP set."""
        cpu, ip = self._cpu, self._ip
        n = cpu.shape[0] if cpu is not None else (ip.shape[0] if ip is not None else 0)
        if n == 0:
            return self.vcpu
        at = min(max(position, 0), n - 1)
        vcpu = self.vcpus[int(cpu[at])] if cpu is not None else self.vcpu
        if ip is not None:
            vcpu.rip = int(ip[at]) & ((1 << 64) - 1)  # given signed, like the GVAs
        return vcpu

    def _run(
        self,
        accesses: Accesses,
        start: int,
        end: int,
        values: Mapping[int, int],
        performed: dict[int, int],
    ) -> int | None:
        """Run ``accesses[start:end]``, handling exits and guest faults on the way; the
        position where a handler answered STOP, or None when the window ran to its end."""
        engine, memory = self.hv.engine, self.hv.host.memory
        window = Accesses(  # positions in the window are offset by ``start``
            accesses.gva[start:end],
            accesses.kind[start:end],
            accesses.user[start:end],
            accesses.vcpu[start:end],
        )
        stores = self._stores
        record = bool(np.searchsorted(stores, end) > np.searchsorted(stores, start))
        exits_here, last_exit = 0, -1  # exits in a row at the same access
        at = 0
        while at < len(window):
            result = engine.run(window, at, record_hpa=record)
            if result.hpa is not None:  # the stores performed, in order, at the HPA used
                first, last = np.searchsorted(stores, [start + at, start + result.stopped_at])
                for p in stores[first:last].tolist():
                    hpa = int(result.hpa[p - start])
                    memory.write_u64(hpa & ~7, values[p])
                    performed[p] = hpa
            at = result.stopped_at
            if result.done:
                return None
            position = start + at
            exits_here, last_exit = (exits_here + 1 if position == last_exit else 1), position
            if exits_here > MAX_EXITS_PER_ACCESS:
                raise EptlabError(f"access {position} did not complete after {exits_here} exits")
            if result.fault is not None:
                vcpu = self._vcpu_at(position)
                guest_os = vcpu.guest_os
                if guest_os is None or not guest_os.handle_fault(vcpu, result.fault):
                    vcpu.unresolved_faults.append(result.fault)
                    at += 1
                continue
            assert result.exit is not None
            action = self._deliver(result.exit, position, values.get(position))
            if action is ExitAction.STOP:
                return position
            if action is ExitAction.SKIP:
                at += 1
            elif action is ExitAction.STEP:
                self._step(accesses, position, values, performed)
                at += 1
        return None

    def _step(
        self,
        accesses: Accesses,
        at: int,
        values: Mapping[int, int],
        performed: dict[int, int],
    ) -> None:
        """Single-step the access at ``at`` (monitor trap flag set), then deliver the MTF exit.
        An exit or fault during the step is handled first; the MTF exit follows completion."""
        one = Accesses(
            accesses.gva[at : at + 1],
            accesses.kind[at : at + 1],
            accesses.user[at : at + 1],
            accesses.vcpu[at : at + 1],
        )
        for _ in range(MAX_EXITS_PER_ACCESS):
            result = self.hv.engine.run(one, 0, record_hpa=True)
            if result.done:
                assert result.hpa is not None
                if at in values:
                    hpa = int(result.hpa[0])
                    self.hv.host.memory.write_u64(hpa & ~7, values[at])
                    performed[at] = hpa
                break
            if result.fault is not None:
                vcpu = self._vcpu_at(at)
                guest_os = vcpu.guest_os
                if guest_os is None or not guest_os.handle_fault(vcpu, result.fault):
                    vcpu.unresolved_faults.append(result.fault)
                    break
                continue
            assert result.exit is not None
            if self._deliver(result.exit, at, values.get(at)) is not ExitAction.RETRY:
                raise EptlabError(f"access {at}: a stepped access can only be retried")
        else:
            raise EptlabError(f"stepped access {at} did not complete")
        self._deliver(MonitorTrap(), at)


@dataclass
class Passive:
    """A policy that traps nothing and arms no timer (baselines, warm-up runs)."""

    clock: int = 0
    operand: int | None = None
    timer_armed: bool = False


# what an exit that is not a trapped access allows: the timer and the monitor trap come between
# accesses (nothing to skip); a handled hypercall is complete
_ALLOWED: dict[ExitReason, tuple[ExitAction, ...]] = {
    ExitReason.PREEMPTION_TIMER: (ExitAction.RETRY, ExitAction.STOP),
    ExitReason.MONITOR_TRAP_FLAG: (ExitAction.RETRY,),
    ExitReason.VMCALL: (ExitAction.SKIP, ExitAction.STOP),
}
