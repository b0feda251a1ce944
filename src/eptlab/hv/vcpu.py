"""A virtual CPU: its guest registers, its VMCS fields, the program it runs, its guest OS."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from ..arch.exits import GuestFault
from ..mmu.context import GuestState, Vmcs
from ..mmu.stats import VcpuStats
from .exits import Exit
from .program import Segment

if TYPE_CHECKING:
    from .vm import VM


class GuestOS(Protocol):
    """The guest kernel, as far as the vCPU needs it: it resolves the guest's own faults."""

    def handle_fault(self, vcpu: VCPU, fault: GuestFault) -> bool:
        """True if the fault was resolved (the access is retried), False to give it up."""
        ...


class VCPU:
    def __init__(self, vm: VM, index: int, vpid: int, guest: GuestState, vmcs: Vmcs) -> None:
        self.vm, self.index, self.vpid = vm, index, vpid
        self.guest, self.vmcs = guest, vmcs
        self.name = f"{vm.name}/{index}"
        self.engine_id = vm.hv.engine.add_vcpu(guest, vmcs)
        self.guest_os: GuestOS | None = None
        self.program: Iterator[Segment] = iter(())
        self.unresolved_faults: list[GuestFault] = []
        self._runner: object | None = None

    def load(self, program: Iterable[Segment]) -> None:
        """Give the vCPU a program (replaces what was left of the previous one)."""
        self.program = iter(program)
        self._runner = None

    def run(self) -> Exit | None:
        """Run until the next VM exit (returned) or the end of the program (None)."""
        from .scheduler import Scheduler

        if self._runner is None:
            self._runner = Scheduler([self])
        assert isinstance(self._runner, Scheduler)
        return self._runner.run()

    @property
    def stats(self) -> VcpuStats:
        return self.vm.hv.engine.stats(self.engine_id)

    def __repr__(self) -> str:
        return f"VCPU({self.name})"
