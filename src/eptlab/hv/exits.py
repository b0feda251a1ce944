"""Exits as the hypervisor sees them: the architectural record plus the vCPU it came from.

The translation hardware produces :class:`~eptlab.arch.exits.EptViolation`,
:class:`~eptlab.arch.exits.EptMisconfig` and :class:`~eptlab.arch.exits.PmlFull`; the vCPU adds
VMCALL (a hypercall with its registers) and HLT (the guest has nothing left to run); the run loop
of :mod:`eptlab.hv.guest_runner` adds the monitor-trap-flag and VMX-preemption-timer exits that
a hypervisor arms for itself.

Every exit handler, on both engines, answers with an :class:`ExitAction` (what the vCPU does
next) or None (not mine: the next handler is asked).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from ..arch.exits import ExitReason, VmExit

if TYPE_CHECKING:
    from .vcpu import VCPU


class ExitAction(Enum):
    """What an exit handler decides, the same on the simulated engine and on KVM; a handler
    returns one of these, or None when the exit is not its business (the next one is asked).

    RETRY
        Re-enter where the exit left the guest: a faulting access runs again (the handler
        fixed its cause); after a timer, monitor-trap or log-full exit the guest just goes on.
    SKIP
        Re-enter after the instruction that exited: the handler completed it in software (an
        emulated store, a hypercall) or suppressed it.
    STEP
        Run that access once with the monitor trap flag set, then exit again (reason 37, SDM
        Vol. 3C §26.5.2). Only the simulated single-vCPU loop (:mod:`eptlab.hv.guest_runner`).
    STOP
        Do not re-enter: the run ends here.
    """

    RETRY = "retry"
    SKIP = "skip"
    STEP = "step"
    STOP = "stop"


def exit_names(counts: Counter[ExitReason]) -> dict[str, int]:
    """Exit counts keyed by reason name, in reason order: the readable form for JSON and
    reports (the counters themselves are keyed by :class:`~eptlab.arch.exits.ExitReason`)."""
    return {reason.name: n for reason, n in sorted(counts.items()) if n}


@dataclass(frozen=True, slots=True)
class Vmcall:
    """Exit reason 18. The hypercall number is RAX, arguments RBX, RCX, RDX, RSI (KVM's ABI)."""

    reason: ClassVar[ExitReason] = ExitReason.VMCALL
    number: int
    args: tuple[int, ...] = ()
    qualification: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: reason, hypercall number and arguments."""
        return {
            "reason": int(self.reason),
            "reason_name": self.reason.name,
            "number": self.number,
            "args": list(self.args),
        }


@dataclass(frozen=True, slots=True)
class Hlt:
    """Exit reason 12."""

    reason: ClassVar[ExitReason] = ExitReason.HLT
    qualification: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: the reason."""
        return {"reason": int(self.reason), "reason_name": self.reason.name}


@dataclass(frozen=True, slots=True)
class TripleFault:
    """Exit reason 2: an exception while delivering a double fault (SDM Vol. 3A §6.15,
    "Interrupt 8"); the processor would shut down. KVM reports it as KVM_EXIT_SHUTDOWN."""

    reason: ClassVar[ExitReason] = ExitReason.TRIPLE_FAULT
    qualification: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: the reason."""
        return {"reason": int(self.reason), "reason_name": self.reason.name}


@dataclass(frozen=True, slots=True)
class MonitorTrap:
    """Exit reason 37: with the monitor trap flag set, the guest ran one instruction and exits
    at the next instruction boundary (SDM Vol. 3C §26.5.2)."""

    reason: ClassVar[ExitReason] = ExitReason.MONITOR_TRAP_FLAG
    qualification: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: the reason."""
        return {"reason": int(self.reason), "reason_name": self.reason.name}


@dataclass(frozen=True, slots=True)
class PreemptionTimer:
    """Exit reason 52: the VMX-preemption timer counted down to zero (SDM Vol. 3C §26.5.1);
    a hypervisor arms it to get control back periodically (and it is how an interrupt reaches a
    long-running guest)."""

    reason: ClassVar[ExitReason] = ExitReason.PREEMPTION_TIMER
    qualification: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: the reason."""
        return {"reason": int(self.reason), "reason_name": self.reason.name}


Record = VmExit | Vmcall | Hlt | TripleFault | MonitorTrap | PreemptionTimer


@dataclass(frozen=True)
class Exit:
    """One VM exit delivered to the hypervisor."""

    vcpu: VCPU
    record: Record

    @property
    def reason(self) -> ExitReason:
        """The basic exit reason of the record."""
        return self.record.reason

    def __str__(self) -> str:
        return f"vCPU {self.vcpu.name}: {self.record}"
