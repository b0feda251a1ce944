"""The hypervisor: VMs, vCPUs, the exit loop, the EPT manager, PML, hypercalls, scheduling."""

from .ept_manager import EptManager
from .exits import Exit, Hlt, PreemptionTimer, TripleFault, Vmcall
from .host import HostMemory
from .hypervisor import Hypervisor, UnhandledExit
from .program import GuestAction, Hypercall, Run
from .scheduler import Scheduler
from .vcpu import VCPU
from .vm import VM

__all__ = [
    "VCPU",
    "VM",
    "EptManager",
    "Exit",
    "GuestAction",
    "Hlt",
    "HostMemory",
    "Hypercall",
    "Hypervisor",
    "PreemptionTimer",
    "Run",
    "Scheduler",
    "TripleFault",
    "UnhandledExit",
    "Vmcall",
]
