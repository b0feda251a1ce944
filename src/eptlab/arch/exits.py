"""VM-exit reasons, the EPT-violation exit qualification, and exit records; guest faults.

Exit records are plain frozen dataclasses shared by both engines: the simulator and the KVM
backend produce them, hypervisor handlers match on them.

Sources: Intel SDM Vol. 3C Appendix C "VMX Basic Exit Reasons" (Table C-1); §28.2.1 "Basic VM-Exit
Information", Table 28-7 "Exit Qualification for EPT Violations" (27-7 in older editions).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

from .bits import bit


class ExitReason(IntEnum):
    """Basic exit reasons (SDM Vol. 3C Table C-1), the ones eptlab produces or names."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    HLT = 12
    VMCALL = 18
    IO_INSTRUCTION = 30
    MONITOR_TRAP_FLAG = 37
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVEPT = 50
    PREEMPTION_TIMER = 52  # VMX-preemption timer expired
    INVVPID = 53
    PML_FULL = 62


class EptQual(IntFlag):
    """Exit qualification for EPT violations (SDM Vol. 3C Table 28-7); each bit's meaning is in
    :data:`EPT_QUAL_MEANING`."""

    READ = bit(0)
    WRITE = bit(1)
    FETCH = bit(2)
    READABLE = bit(3)
    WRITABLE = bit(4)
    EXECUTABLE = bit(5)
    USER_EXECUTABLE = bit(6)
    GLA_VALID = bit(7)
    GLA_TRANSLATION = bit(8)
    USER_LINEAR = bit(9)
    WRITABLE_LINEAR = bit(10)
    XD_LINEAR = bit(11)
    NMI_UNBLOCKING = bit(12)
    GUEST_PAGING_VERIFICATION = bit(15)


EPT_QUAL_MEANING: dict[EptQual, str] = {
    EptQual.READ: "the access was a data read",
    EptQual.WRITE: "the access was a data write",
    EptQual.FETCH: "the access was an instruction fetch",
    EptQual.READABLE: "AND of bit 0 (R) over the EPT entries used to translate the GPA",
    EptQual.WRITABLE: "AND of bit 1 (W)",
    EptQual.EXECUTABLE: "AND of bit 2 (X; supervisor-execute under MBEC)",
    EptQual.USER_EXECUTABLE: "AND of bit 10 (XU) under MBEC, else 0 here",
    EptQual.GLA_VALID: "the guest-linear-address field is valid",
    EptQual.GLA_TRANSLATION: "1: access to the translated address; 0: to a guest paging entry",
    EptQual.USER_LINEAR: "(bit 8 = 1) the linear address is a user-mode address",
    EptQual.WRITABLE_LINEAR: "(bit 8 = 1) the linear address is read/write",
    EptQual.XD_LINEAR: "(bit 8 = 1) the linear address is execute-disable",
    EptQual.NMI_UNBLOCKING: "NMI unblocking due to IRET",
    EptQual.GUEST_PAGING_VERIFICATION: "the access failed guest-paging verification (GPV)",
}
"""What each exit-qualification bit says (SDM Vol. 3C Table 28-7)."""


def describe_qualification(qualification: int) -> list[str]:
    """Names of the set bits, lowest first (for humans and the explorer)."""
    return [flag.name or str(int(flag)) for flag in EptQual if qualification & flag]


@dataclass(frozen=True, slots=True)
class EptViolation:
    """Exit reason 48. ``gla`` is None when qualification bit 7 is clear."""

    reason: ClassVar[ExitReason] = ExitReason.EPT_VIOLATION
    gpa: int
    gla: int | None
    qualification: int

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: reason, qualification (with the names of its bits), GPA, GLA."""
        return {
            "reason": int(self.reason),
            "reason_name": self.reason.name,
            "qualification": self.qualification,
            "qualification_bits": describe_qualification(self.qualification),
            "gpa": self.gpa,
            "gla": self.gla,
        }


@dataclass(frozen=True, slots=True)
class EptMisconfig:
    """Exit reason 49: the SDM gives only the guest-physical address (the qualification is 0).

    ``level`` and ``why`` are eptlab diagnostics: where the walk found the bad entry and which
    rule of SDM §29.3.3.1 it breaks.
    """

    reason: ClassVar[ExitReason] = ExitReason.EPT_MISCONFIG
    gpa: int
    level: int
    why: str
    qualification: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: reason, GPA, the misconfigured entry's level and value and the rule
        it breaks."""
        return {
            "reason": int(self.reason),
            "reason_name": self.reason.name,
            "qualification": self.qualification,
            "gpa": self.gpa,
            "gla": None,
            "level": self.level,
            "why": self.why,
        }


@dataclass(frozen=True, slots=True)
class PmlFull:
    """Exit reason 62: a dirty flag was about to be set with the PML index outside 0..511
    (SDM Vol. 3C §29.3.6 "Page-Modification Logging"). The dirty flag was not set."""

    reason: ClassVar[ExitReason] = ExitReason.PML_FULL
    qualification: int = 0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: reason and the GPA whose logging found the log full."""
        return {
            "reason": int(self.reason),
            "reason_name": self.reason.name,
            "qualification": self.qualification,
            "gpa": None,
            "gla": None,
        }


VmExit = EptViolation | EptMisconfig | PmlFull
"""Exits the translation hardware can produce. Later layers add their own records."""


PAGE_FAULT_VECTOR = 14
GENERAL_PROTECTION_VECTOR = 13


@dataclass(frozen=True, slots=True)
class GuestFault:
    """An exception the guest receives (not a VM exit): #PF with its error code and CR2, or #GP
    for a non-canonical address (SDM Vol. 3A §4.7, Vol. 1 §3.3.7.1)."""

    vector: int
    error_code: int
    address: int

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view: vector, error code (with the names of its bits) and CR2."""
        from .paging import PageFaultError

        return {
            "vector": self.vector,
            "error_code": self.error_code,
            "error_bits": [f.name for f in PageFaultError if self.error_code & f],
            "address": self.address,
        }
