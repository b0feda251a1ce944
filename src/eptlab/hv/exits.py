"""Exits as the hypervisor sees them: the architectural record plus the vCPU it came from.

The translation hardware produces :class:`~eptlab.arch.exits.EptViolation`,
:class:`~eptlab.arch.exits.EptMisconfig` and :class:`~eptlab.arch.exits.PmlFull`; the vCPU adds
VMCALL (a hypercall with its registers) and HLT (the guest has nothing left to run); the run loop
of :mod:`eptlab.hv.guest_runner` adds the monitor-trap-flag and VMX-preemption-timer exits that
a hypervisor arms for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..arch.exits import ExitReason, VmExit

if TYPE_CHECKING:
    from .vcpu import VCPU


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
