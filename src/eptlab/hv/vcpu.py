"""A virtual CPU: its guest registers, its VMCS fields, the program it runs, its guest OS."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from ..arch.access import Access
from ..arch.exits import GuestFault
from ..errors import EptlabError
from ..mmu.context import GuestState, Vmcs
from ..mmu.engine import Accesses
from ..mmu.stats import VcpuStats
from .exits import Exit, ExitAction
from .program import Segment
from .scheduler import Scheduler

if TYPE_CHECKING:
    from .vm import VM


class GuestOS(Protocol):
    """The guest kernel, as far as the vCPU needs it: it resolves the guest's own faults."""

    def handle_fault(self, vcpu: VCPU, fault: GuestFault) -> bool:
        """True if the fault was resolved (the access is retried), False to give it up."""
        ...


class VCPU:
    """A virtual CPU: its guest registers, its VMCS fields, the program it runs and its guest OS."""
    def __init__(self, vm: VM, index: int, vpid: int, guest: GuestState, vmcs: Vmcs) -> None:
        self.vm, self.index, self.vpid = vm, index, vpid
        self.guest, self.vmcs = guest, vmcs
        self.name = f"{vm.name}/{index}"
        self.engine_id = vm.hv.engine.add_vcpu(guest, vmcs)
        self.guest_os: GuestOS | None = None
        self.program: Iterator[Segment] = iter(())
        self.unresolved_faults: list[GuestFault] = []
        self.rip = 0  # guest RIP saved at the last VM exit (SDM Vol. 3C §25.4.1), when known
        self._runner: Scheduler | None = None

    def load(self, program: Iterable[Segment]) -> None:
        """Give the vCPU a program (replaces what was left of the previous one)."""
        self.program = iter(program)
        self._runner = None

    def run(self, action: ExitAction | None = None) -> Exit | None:
        """Run until the next VM exit (returned) or the end of the program (None). ``action``
        is the handler's answer to the exit the previous call returned (None the first time):

            action = None
            while (exit_ := vcpu.run(action)) is not None:
                action = hv.handle(exit_)
        """
        if self._runner is None:
            self._runner = Scheduler(self.vm.hv.engine, [self])
        return self._runner.run(action)

    # -- single accesses with values (tests, examples, data-carrying policies) -------------------

    def access(self, gva: int, access: Access, *, user: bool = False) -> int:
        """Perform one access now, outside any program: exits go to the hypervisor's handlers
        (which must answer RETRY) and guest faults to the guest OS until it completes. Returns
        the HPA it used."""
        hv = self.vm.hv
        for _ in range(64):
            result = hv.engine.run(
                Accesses.build([gva], int(access), int(user), self.engine_id), record_hpa=True
            )
            if result.done:
                assert result.hpa is not None
                return int(result.hpa[0])
            if result.fault is not None:
                if self.guest_os is None or not self.guest_os.handle_fault(self, result.fault):
                    raise EptlabError(f"{self.name}: unresolved guest fault {result.fault}")
                continue
            assert result.exit is not None
            exit_ = Exit(self, result.exit)
            action = hv.handle(exit_)
            if action is not ExitAction.RETRY:
                raise EptlabError(f"{exit_}: answered {action.name}, but a single access "
                                  "outside a program can only be retried")
        raise EptlabError(f"{self.name}: access to {gva:#x} did not complete after 64 exits")

    def write_u64(self, gva: int, value: int, *, user: bool = False) -> None:
        """A guest store of an 8-byte value (aligned)."""
        hpa = self.access(gva, Access.WRITE, user=user)
        self.vm.hv.host.memory.write_u64(hpa & ~7, value)

    def read_u64(self, gva: int, *, user: bool = False) -> int:
        """A guest load of an 8-byte value (aligned)."""
        hpa = self.access(gva, Access.READ, user=user)
        return self.vm.hv.host.memory.read_u64(hpa & ~7)

    @property
    def stats(self) -> VcpuStats:
        """A snapshot of this vCPU's engine statistics."""
        return self.vm.hv.engine.stats(self.engine_id)

    def __repr__(self) -> str:
        return f"VCPU({self.name})"
