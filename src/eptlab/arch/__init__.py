"""Bit formats of x86-64 paging and VMX/EPT, per the Intel SDM. Encode/decode only, no behaviour."""

from .access import Access, Mode
from .bits import PAGE_SIZE, PageSize, bits, field, table_index
from .ept import Ept, EptEntry, Eptp, MemoryType, ept_misconfiguration
from .exits import (
    EptMisconfig,
    EptQual,
    EptViolation,
    ExitReason,
    GuestFault,
    PmlFull,
    VmExit,
)
from .paging import Cr0, Cr4, Efer, GuestEntry, PageFaultError, Pte

__all__ = [
    "PAGE_SIZE",
    "Access",
    "Cr0",
    "Cr4",
    "Efer",
    "Ept",
    "EptEntry",
    "EptMisconfig",
    "EptQual",
    "EptViolation",
    "Eptp",
    "ExitReason",
    "GuestEntry",
    "GuestFault",
    "MemoryType",
    "Mode",
    "PageFaultError",
    "PageSize",
    "PmlFull",
    "Pte",
    "VmExit",
    "bits",
    "ept_misconfiguration",
    "field",
    "table_index",
]
