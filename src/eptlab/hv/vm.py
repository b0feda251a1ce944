"""A virtual machine: its guest-physical memory size, its EPT, its vCPUs, PML, lazy backing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..arch.exits import EptQual, EptViolation
from ..errors import AddressError, ConfigError
from ..memory.layout import LayoutConfig
from ..mmu.context import PML_ENTRIES, GuestState, Vmcs
from ..mmu.engine import InveptType
from .ept_manager import EptManager
from .exits import Exit, ExitAction
from .vcpu import VCPU

if TYPE_CHECKING:
    from .hypervisor import Hypervisor

Placement = Callable[[int, PageSize], int | None]
"""``placement(gpa, size)``: the host address for a fresh block backing the guest page."""

NOT_PRESENT = EptQual.READABLE | EptQual.WRITABLE | EptQual.EXECUTABLE


class VM:
    """A virtual machine: guest-physical memory behind its own EPT, its vCPUs, PML and invalidation.
    """
    def __init__(
        self,
        hv: Hypervisor,
        name: str,
        memory: int,
        *,
        ept_levels: int = 4,
        ept_ad: bool = False,
        mbec: bool = False,
        lazy: bool = True,
        backing: PageSize = PageSize.SIZE_4K,
        layout: LayoutConfig | str | None = None,
    ) -> None:
        """``layout``: the memory layout of this VM (None: the hypervisor's); a guest OS built
        on it takes its guest-physical allocator from it. Host placement is the host
        allocator's (the hypervisor's layout) unless :attr:`placement` says otherwise."""
        if memory <= 0 or memory % PageSize.SIZE_2M:
            raise ConfigError("memory", f"{memory} is not a positive multiple of 2 MiB")
        self.hv, self.name, self.memory = hv, name, memory
        self.ept = EptManager(
            hv.host,
            levels=ept_levels,
            maxphyaddr=hv.features.maxphyaddr,
            ad_enabled=ept_ad,
            mbec=mbec,
        )
        self.mbec, self.lazy, self.backing = mbec, lazy, PageSize(backing)
        self.layout = hv.layout if layout is None else LayoutConfig.of(layout)
        self.placement: Placement | None = None
        """Where a fresh backing block goes: ``placement(gpa, size)`` returns a host address
        (or None: the host allocator decides). An EPT layout policy sets it."""
        self.vcpus: list[VCPU] = []
        self.counters: Counter[str] = Counter()
        self.dirty_log: set[int] = set()  # GPAs drained from the PML logs
        self.pml_enabled = False

    # -- vCPUs ------------------------------------------------------------------------------------

    def add_vcpu(self, cr3: int = 0, guest: GuestState | None = None) -> VCPU:
        """Add a vCPU with its own VPID whose VMCS points at this VM's EPT."""
        guest = guest or GuestState(cr3=cr3)
        vmcs = Vmcs(eptp=self.ept.tables.eptp, vpid=self.hv.next_vpid(), mbec=self.mbec)
        vcpu = VCPU(self, len(self.vcpus), vmcs.vpid, guest, vmcs)
        self.vcpus.append(vcpu)
        if self.pml_enabled:
            self._arm_pml(vcpu)
        return vcpu

    # -- guest-physical memory --------------------------------------------------------------------

    def back(self, gpa: int) -> int:
        """Back the ``backing``-sized page holding ``gpa`` with a fresh host block (lazy
        backing: what the EPT-violation handler does on first touch). Returns the HPA."""
        if not 0 <= gpa < self.memory:
            raise AddressError(f"GPA {gpa:#x} is outside the VM's {self.memory:#x} bytes")
        size = self.backing
        base = gpa & ~(size - 1)
        if self.ept.lookup(base) is not None and size == PageSize.SIZE_4K:
            return self.ept.host_address(base) or 0
        self.counters["pages_backed"] += 1
        at = self.placement(base, size) if self.placement is not None else None
        return self.ept.map(base, size, at=at)

    def host_address(self, gpa: int, *, back: bool = True) -> int:
        """HPA of ``gpa``, backing it first when lazy (as the guest's first touch would)."""
        hpa = self.ept.host_address(gpa)
        if hpa is None:
            if not (back and self.lazy):
                raise AddressError(f"GPA {gpa:#x} is not mapped in {self.name}")
            self.counters["kernel_touch_backings"] += 1
            self.back(gpa)
            hpa = self.ept.host_address(gpa)
            assert hpa is not None
        return hpa

    def read_u64(self, gpa: int) -> int:
        """Read 8 bytes at ``gpa`` (backing the page first when lazy)."""
        return self.hv.host.memory.read_u64(self.host_address(gpa))

    def write_u64(self, gpa: int, value: int) -> None:
        """Write 8 bytes at ``gpa`` (backing the page first when lazy)."""
        self.hv.host.memory.write_u64(self.host_address(gpa), value)

    def zero_page(self, gpa: int) -> None:
        """Zero the 4 KiB page holding ``gpa``."""
        self.hv.host.memory.discard(self.host_address(gpa & ~(PAGE_SIZE - 1)) >> PAGE_SHIFT)

    def words(self, gpa: int, count: int) -> npt.NDArray[np.uint64]:
        """``count`` 8-byte words from ``gpa`` as a view of host memory (within one page)."""
        hpa = self.host_address(gpa)
        first = (hpa & (PAGE_SIZE - 1)) >> 3
        return self.hv.host.memory.frame(hpa >> PAGE_SHIFT)[first : first + count]

    def handle_lazy_backing(self, exit_: Exit) -> ExitAction | None:
        """EPT-violation handler: first touch of guest memory that is not yet backed."""
        record = exit_.record
        if not (self.lazy and isinstance(record, EptViolation)):
            return None
        if record.qualification & NOT_PRESENT or not 0 <= record.gpa < self.memory:
            return None  # a permission problem, or outside guest memory: not ours
        if self.ept.lookup(record.gpa) is not None:
            return None  # mapped: another handler's business
        self.back(record.gpa)
        self.counters["lazy_backing_exits"] += 1
        return ExitAction.RETRY

    # -- invalidation -----------------------------------------------------------------------------

    def invept(
        self, vcpus: list[VCPU] | None = None, kind: InveptType = InveptType.SINGLE_CONTEXT
    ) -> None:
        """INVEPT on the given vCPUs (default: all of this VM's: a completed shootdown)."""
        targets = self.vcpus if vcpus is None else vcpus
        self.hv.engine.invept(kind, self.ept.eptp, vcpus=[v.engine_id for v in targets])
        self.counters["invept"] += len(targets)

    def shootdown(self, initiator: VCPU | None = None) -> int:
        """TLB shootdown after an EPT change: the initiator runs INVEPT itself and sends an IPI
        to every other vCPU of the VM, each of which runs INVEPT. Returns the IPIs sent."""
        others = [v for v in self.vcpus if v is not initiator]
        self.invept()
        self.counters["shootdowns"] += 1
        self.counters["ipis"] += len(others)
        return len(others)

    # -- page-modification logging (SDM Vol. 3C §29.3.6) -----------------------------------------

    def enable_pml(self) -> None:
        """Turn on page-modification logging on every vCPU (needs EPT A/D)."""
        if not self.ept.tables.ad_enabled:
            raise ConfigError(
                "pml", "PML needs EPT accessed/dirty flags (create the VM with ept_ad=True)"
            )
        self.pml_enabled = True
        for vcpu in self.vcpus:
            self._arm_pml(vcpu)

    def _arm_pml(self, vcpu: VCPU) -> None:
        vcpu.vmcs.pml_enabled = True
        vcpu.vmcs.pml_address = self.hv.host.alloc()
        self.hv.host.memory.frame(vcpu.vmcs.pml_address >> PAGE_SHIFT)
        vcpu.vmcs.pml_index = PML_ENTRIES - 1

    def drain_pml(self, vcpu: VCPU) -> list[int]:
        """Read the vCPU's log (entries above the index), reset the index to 511, and add the
        GPAs to :attr:`dirty_log`. Returns them in logging order."""
        m = vcpu.vmcs
        first = m.pml_index + 1 if m.pml_index < PML_ENTRIES else 0
        memory = self.hv.host.memory
        logged = [
            memory.read_u64(m.pml_address + 8 * i) for i in range(PML_ENTRIES - 1, first - 1, -1)
        ]
        m.pml_index = PML_ENTRIES - 1
        self.dirty_log.update(logged)
        self.counters["pml_drained"] += len(logged)
        return logged

    def handle_pml_full(self, exit_: Exit) -> ExitAction | None:
        """PML-full handler: drain the vCPU's log into ``dirty_log`` and re-arm it."""
        if exit_.vcpu.vm is not self:
            return None
        self.drain_pml(exit_.vcpu)
        self.counters["pml_full_exits"] += 1
        return ExitAction.RETRY
