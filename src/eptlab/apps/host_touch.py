"""Guest memory the host touches first: the host's own mapping of guest RAM (the VMM's, or the
DMA of an ``O_DIRECT`` read into it) reaches a guest-physical page before the guest does.

This is what a guest booted with ``init_on_alloc=0`` does to a new page-cache page: the guest
no longer zeroes it, so the device's write of the block is its first touch. On KVM the host
backs guest memory in its own page tables (the VMM's mapping of the memslot), and the EPT entry
is made only when the guest accesses the page: KVM's fault path finds the host page already
there and maps it. So the device's write is a host page fault in the VMM's mapping -- no VM
exit -- and the guest's first access (its copy of the page to the user buffer) still takes the
EPT violation (SDM Vol. 3C §29.3.3), but the hypervisor only maps the frame the host holds: no
allocation and no zeroing inside the exit.

:class:`HostTouch` models that split for one VM: :meth:`HostTouch.frame` gives the device the
host frame behind a GPA, backing the VM's ``backing``-sized block on the host side when neither
the EPT nor an earlier device write did; its EPT-violation handler maps that frame at the
guest's first access.
"""

from __future__ import annotations

from ..arch.bits import PAGE_SIZE
from ..arch.exits import EptViolation, ExitReason
from ..errors import AddressError
from ..hv import VM, Exit, ExitAction


class HostTouch:
    """The host side of one VM's memory: blocks the host backed that the EPT does not map yet."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.pending: dict[int, int] = {}  # block GPA -> HPA, backed by the host, not in the EPT
        self.first_touches: list[int] = []  # block GPAs the host touched first, in order
        self.mapped: list[int] = []  # block GPAs mapped at the guest's first access, in order
        vm.hv.on(ExitReason.EPT_VIOLATION, self.handle)

    def frame(self, gpa: int) -> tuple[int, bool]:
        """The HPA behind ``gpa`` for a host-side write, and whether this write backed it (the
        first touch of that block: a host page fault, no VM exit)."""
        hpa = self.vm.ept.host_address(gpa)
        if hpa is not None:
            return hpa, False
        if not 0 <= gpa < self.vm.memory:
            raise AddressError(f"GPA {gpa:#x} is outside the VM's {self.vm.memory:#x} bytes")
        size = self.vm.backing
        base = gpa & ~(size - 1)
        backed = base not in self.pending
        if backed:
            at = self.vm.placement(base, size) if self.vm.placement is not None else None
            self.pending[base] = self.vm.hv.host.alloc(size, at=at)
            self.first_touches.append(base)
            self.vm.counters["host_touch_backings"] += 1
        return self.pending[base] + (gpa - base), backed

    def handle(self, exit_: Exit) -> ExitAction | None:
        """EPT-violation handler: the guest's first access to a block the host backed maps the
        host's frame (the EPT leaf takes over the pending reference)."""
        record = exit_.record
        if not isinstance(record, EptViolation) or exit_.vcpu.vm is not self.vm:
            return None
        size = self.vm.backing
        base = record.gpa & ~(size - 1)
        hpa = self.pending.pop(base, None)
        if hpa is None:
            return None
        self.vm.ept.map(base, size, hpa=hpa)  # one more reference: the EPT leaf's
        self.vm.hv.host.release(hpa, size)  # the pending one goes
        self.mapped.append(base)
        self.vm.counters["host_touch_mappings"] += 1
        return ExitAction.RETRY  # the access runs again, now mapped

    @property
    def pending_pages(self) -> int:
        """4 KiB pages backed by the host that the guest has not accessed yet."""
        return len(self.pending) * self.vm.backing // PAGE_SIZE
