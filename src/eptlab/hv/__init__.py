"""The hypervisor: VMs, vCPUs, the exit loop, the EPT manager, PML, hypercalls, scheduling."""

from .ept_manager import EptManager
from .exits import Exit, ExitAction, Hlt, PreemptionTimer, TripleFault, Vmcall, exit_names
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
    "ExitAction",
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
    "exit_names",
]
