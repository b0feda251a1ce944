"""What the applications' scenarios share: booting a guest kernel with vCPUs on a VM, mapping a
buffer the guest can name by guest-physical address, cutting access streams, and building a
scenario from an experiment's parameters.

Each application keeps its own ``Scenario`` (what it varies), ``Outcome`` (what it measures) and
``play`` (how it runs), built from these pieces::

    hv = Hypervisor(seed=s.seed)
    cma = region_run(hv, region_bytes)
    vm = hv.create_vm("guest", hv.layout.guest_memory(spare + (cma or ...)))
    guest = boot_guest(vm, vcpus=2, seed=s.seed, cma=cma)
    buffer = populate(guest.kernel, guest.process, region_bytes)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError, OutOfMemory
from ..guest import GuestKernel
from ..guest.layout import KernelImage
from ..hv import VCPU, VM, Hypervisor
from ..traces.model import TraceChunk

if TYPE_CHECKING:
    from ..guest.kernel import Process

_2M = 2 << 20
S = TypeVar("S")


def small_image() -> KernelImage:
    """A 6 MiB kernel image (2 MiB each of code, read-only data and data): the scenarios' guest."""
    return KernelImage(code=_2M, rodata=_2M, data=_2M)


@dataclass(frozen=True)
class Guest:
    """A booted guest: its kernel, the process it runs and the vCPUs switched to it."""

    kernel: GuestKernel
    process: Process
    vcpus: list[VCPU]


def boot_guest(
    vm: VM,
    *,
    vcpus: int = 1,
    seed: int = 0,
    cma: int = 0,
    image: KernelImage | None = None,
    process: str = "app",
) -> Guest:
    """Boot a guest kernel on ``vm`` (``cma``: bytes it sets aside at boot for contiguous
    buffers, aged layouts), spawn one process and add ``vcpus`` vCPUs running it."""
    kernel = GuestKernel(vm, seed=seed, image=image or small_image(), cma=cma)
    proc = kernel.spawn(process)
    added = [vm.add_vcpu(cr3=proc.cr3) for _ in range(vcpus)]
    for vcpu in added:
        kernel.switch_to(vcpu, proc)
    return Guest(kernel, proc, added)


def region_run(hv: Hypervisor, region_bytes: int) -> int:
    """The contiguous run the guest must set aside at boot for a ``region_bytes`` buffer on an
    aged layout (a power of two of 2 MiB blocks, so the buddy allocator can give it), 0 on a
    contiguous one."""
    blocks = -(-region_bytes // _2M)
    return _2M << (blocks - 1).bit_length() if hv.layout.aged else 0


@dataclass(frozen=True)
class Buffer:
    """A guest buffer: its guest-virtual and guest-physical addresses and its length."""

    gva: int
    gpa: int
    length: int


def populate(kernel: GuestKernel, process: Process, length: int) -> Buffer:
    """What a guest does before it can name GPAs in a hint: reserve ``length`` bytes of its
    address space and map them now (MAP_POPULATE) to contiguous, 2 MiB-aligned guest-physical
    memory (from the kernel's boot-time contiguous run when it has one: aged layouts). Host
    backing stays lazy."""
    blocks = -(-length // _2M)
    taken = kernel.cma_take(blocks * _2M)  # the run the guest set aside at boot (aged layouts)
    if taken is not None:
        gpa = taken
    else:
        try:
            gpa = kernel.frames.alloc_run(blocks * _2M)
        except OutOfMemory:
            raise ConfigError("populate", "guest-physical memory is too fragmented") from None
    gva = kernel.mmap(process, blocks * _2M)
    process.tables.map_range(gva, gpa, blocks * _2M, user=True, xd=True)
    return Buffer(gva, gpa, length)


def cut(chunk: TraceChunk, start: int, stop: int) -> TraceChunk:
    """Accesses ``[start, stop)`` of ``chunk``."""
    return TraceChunk(chunk.address[start:stop], chunk.kind[start:stop], chunk.size[start:stop])


def from_params(cls: type[S], params: object, **overrides: Any) -> S:
    """A scenario dataclass ``cls`` whose fields take the value of the same-named attribute of
    ``params`` (an experiment's parameters) where it has one, then ``overrides``; the rest keep
    their defaults. Spares the field-by-field copy an experiment would otherwise write."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(overrides) - names
    if unknown:
        raise ConfigError("scenario", f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    values = {n: getattr(params, n) for n in names if hasattr(params, n)}
    return cls(**(values | overrides))


__all__ = [
    "Buffer",
    "Guest",
    "boot_guest",
    "cut",
    "from_params",
    "populate",
    "region_run",
    "small_image",
]
