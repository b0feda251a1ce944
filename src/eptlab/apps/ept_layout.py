"""EPT layout policies: how the hypervisor places guest-physical memory in host-physical memory.

A physically indexed cache takes its set index from host-physical address bits, so where the
hypervisor puts each guest page decides which guest-physical address bits a cache attacker in
the guest can read off the sets its victim touches. Three policies:

``linear``
    One contiguous host range: ``HPA = GPA + offset`` for all of guest memory, backed with
    2 MiB EPT pages. Every HPA bit follows from the GPA once the offset is known (an attacker
    learns it from its own pages), so the host frame number leaks guest-physical placement.
``random-2m``
    Each 2 MiB of guest memory gets its own 2 MiB host block at a random place (2 MiB EPT
    pages). HPA bits 0-20 equal GPA bits 0-20; only bits 21 and up are hidden.
``random-4k``
    Each 4 KiB guest page gets its own random 4 KiB host frame. HPA bits 12 and up are hidden,
    and the EPT can map nothing with 2 MiB pages (a 2 MiB EPT leaf maps 2 MiB of *contiguous*
    host memory, SDM Vol. 3C §29.3.2, Table 29-4), so every guest access needs 4 KiB EPT
    translations: smaller TLB reach and one more EPT level per walk.

Random placement comes from the host frame allocator in ``random`` mode (seeded). The linear
policy places its range at a random 2 MiB-aligned offset in the upper half of host memory and
lets the allocator hand out EPT table pages sequentially from the bottom, so the two never meet.
Backing stays lazy (first touch), as with any VM; :func:`back_range` pre-faults a range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..errors import ConfigError
from ..hv import VM, Hypervisor
from ..memory.allocator import Policy
from ..mmu.config import MmuConfig

LAYOUTS = ("linear", "random-2m", "random-4k")

U64 = npt.NDArray[np.uint64]
_2M = int(PageSize.SIZE_2M)


@dataclass(frozen=True)
class EptLayout:
    """A placement policy: the EPT page size it backs guest memory with, and the lowest
    host-physical address bit it chooses at random for each page (None: none, linear)."""

    name: str
    page: PageSize
    randomized_from: int | None

    @classmethod
    def named(cls, name: str) -> EptLayout:
        if name == "linear":
            return cls(name, PageSize.SIZE_2M, None)
        if name == "random-2m":
            return cls(name, PageSize.SIZE_2M, PageSize.SIZE_2M.bit_length() - 1)
        if name == "random-4k":
            return cls(name, PageSize.SIZE_4K, PAGE_SHIFT)
        raise ConfigError("layout", f"{name!r} is not one of {', '.join(LAYOUTS)}")

    @property
    def host_policy(self) -> Policy:
        return "sequential" if self.randomized_from is None else "random"

    def known_hpa(self, gpa: U64, offset: int | None, maxphyaddr: int = 46) -> tuple[int, U64]:
        """What someone who knows this policy (and, for ``linear``, its offset) but not its
        random choices can say about the HPA of each ``gpa``: ``(mask, value)``, the HPA bits
        in ``mask`` are ``value``'s, the others are unknown."""
        gpa = np.asarray(gpa, np.uint64)
        if self.randomized_from is None:
            if offset is None:
                raise ConfigError("offset", "a linear layout's prediction needs its offset")
            mask = (1 << maxphyaddr) - 1
            return mask, (gpa + np.uint64(offset)) & np.uint64(mask)
        mask = (1 << self.randomized_from) - 1
        return mask, gpa & np.uint64(mask)


@dataclass
class LaidOutVm:
    """A hypervisor with one VM whose guest memory is placed by ``layout``."""

    hv: Hypervisor
    vm: VM
    layout: EptLayout
    offset: int | None  # linear: HPA - GPA; None for the random layouts


def boot(
    layout: EptLayout | str,
    memory: int,
    *,
    seed: int = 0,
    mmu: MmuConfig | None = None,
    host_memory: int = 1 << 40,
    name: str = "guest",
) -> LaidOutVm:
    """A hypervisor and a lazily backed VM of ``memory`` bytes laid out by ``layout``."""
    layout = EptLayout.named(layout) if isinstance(layout, str) else layout
    if memory <= 0 or memory % _2M:
        raise ConfigError("memory", f"{memory} is not a positive multiple of 2 MiB")
    if layout.randomized_from is None and memory > host_memory // 4:
        limit = host_memory // 4
        raise ConfigError(
            "memory", f"{memory:#x}: a linear layout takes at most a quarter of host memory "
            f"({limit:#x})"
        )
    hv = Hypervisor(host_memory=host_memory, mmu=mmu, host_policy=layout.host_policy, seed=seed)
    vm = hv.create_vm(name, memory, backing=layout.page)
    offset: int | None = None
    if layout.randomized_from is None:
        rng = np.random.default_rng([seed, 0x11EA])
        low = host_memory // 2
        slots = (host_memory - low - memory) // _2M
        offset = low + int(rng.integers(slots)) * _2M
        delta = offset

        def linear(gpa: int, size: PageSize) -> int:
            return gpa + delta

        vm.placement = linear
    return LaidOutVm(hv, vm, layout, offset)


def back_range(vm: VM, gpa: int, length: int) -> int:
    """Back every EPT page of ``[gpa, gpa + length)`` now (a pre-faulted range); returns the
    pages backed."""
    step = int(vm.backing)
    first, end = gpa - gpa % step, gpa + length
    before = vm.counters["pages_backed"]
    for page in range(first, end, step):
        # VM.back leaves a mapped 4 KiB page alone; a mapped 2 MiB page must be skipped here
        if step == PAGE_SIZE or vm.ept.lookup(page) is None:
            vm.back(page)
    return vm.counters["pages_backed"] - before


def ept_leaf_sizes(vm: VM) -> set[PageSize]:
    """The page sizes of every EPT leaf the VM has."""
    return {leaf.page_size for _, leaf in vm.ept.tables.mapped()}
